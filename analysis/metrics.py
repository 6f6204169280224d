"""vLLM's serving metrics (TTFT, TPOT, ITL, E2EL, throughput, goodput) as pure functions of a run's tables.

Definitions follow vLLM's benchmark_serving: latencies are taken over completed requests only; TPOT is
(e2e - ttft) / (output_len - 1) for requests with more than one output token; ITL pools the gaps between
consecutive tokens of every completed request; percentiles are numpy's linear interpolation.

Duration: vLLM divides by the benchmark's wall time, from sending the first request to receiving the last
response. A run's equivalent is the last finish time minus the first arrival time (over every request in
the table, so an idle start before the first arrival is not counted and a rejected request still opens the
window; requests an interrupted run never reached do not extend it). Rejected and aborted requests count as
failed, never in latencies or throughput.
"""

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.exact_quantiles import BatchStatistics
from engine.sequence import RequestStatus

STORED_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
"""SLO names accepted for goodput, as in vLLM's --goodput; values in milliseconds."""


@dataclass(frozen=True)
class Distribution:
    """Summary statistics of one latency over requests or token gaps, in seconds."""

    count: int
    mean: float
    std: float
    median: float
    p90: float
    p95: float
    p99: float
    p99_9: float
    samples: np.ndarray | None = field(repr=False, compare=False)
    """The values themselves; None when they were too many to hold (then only known_percentiles are known)."""
    known_percentiles: dict[float, float] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, values) -> "Distribution":
        """Statistics of the values; all zero for no values, as vLLM reports an empty metric."""
        samples = np.asarray(values, dtype=np.float64)
        if samples.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, samples)
        p50, p90, p95, p99, p999 = np.percentile(samples, STORED_PERCENTILES)
        return cls(
            count=int(samples.size),
            mean=float(samples.mean()),
            std=float(samples.std()),
            median=float(p50),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            p99_9=float(p999),
            samples=samples,
        )

    @classmethod
    def of_statistics(cls, statistics: BatchStatistics, percentiles=()) -> "Distribution":
        """Statistics of values read in batches (too many to hold), with these percentiles besides the stored."""
        wanted = sorted(set(STORED_PERCENTILES) | {float(p) for p in percentiles})
        known = statistics.percentiles(wanted) if statistics.count else {p: 0.0 for p in wanted}
        return cls(
            count=statistics.count,
            mean=statistics.mean,
            std=statistics.std,
            median=known[50.0],
            p90=known[90.0],
            p95=known[95.0],
            p99=known[99.0],
            p99_9=known[99.9],
            samples=None,
            known_percentiles=known,
        )

    def percentile(self, p: float) -> float:
        """Any percentile (0..100) of the samples, in seconds; 0 when there are none."""
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be within 0..100, got {p}")
        if self.samples is None:
            if float(p) not in self.known_percentiles:
                raise ValueError(f"percentile {p} was not computed: these values were read in batches, with "
                                 f"percentiles {sorted(self.known_percentiles)}")
            return self.known_percentiles[float(p)]
        if self.samples.size == 0:
            return 0.0
        return float(np.percentile(self.samples, p))


@dataclass(frozen=True)
class Metrics:
    """A run's vLLM serving metrics; times in seconds (the summary prints milliseconds)."""

    num_requests: int
    completed: int
    failed: int
    """Rejected plus aborted requests."""
    num_rejected: int
    num_aborted: int
    num_unfinished: int
    """Requests still waiting or running when the run stopped (an incomplete run)."""
    total_input_tokens: int
    total_output_tokens: int
    start_time: float
    end_time: float
    duration: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    max_output_tokens_per_s: float
    """Most output tokens in any one-second bucket from the first arrival (vLLM's peak throughput)."""
    max_concurrent_requests: int
    goodput_slos_ms: dict[str, float] | None = None
    num_good: int | None = None
    request_goodput: float | None = None


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _status_is(table: pa.Table, *statuses: RequestStatus) -> np.ndarray:
    """Which rows have one of these statuses, as booleans (no array of millions of strings is made)."""
    mask = pc.is_in(table.column("status"), value_set=pa.array([status.value for status in statuses]))
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name).cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)


def inter_token_latencies(requests: pa.Table) -> np.ndarray:
    """Gaps between consecutive token times of each request, pooled over the table's requests."""
    token_times = requests.column("token_times")
    lengths = pc.fill_null(pc.list_value_length(token_times), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(token_times).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    if flat.size < 2:
        return np.empty(0)
    gaps = np.diff(flat)
    # A gap that spans two requests starts at the first token of the next one.
    starts = np.cumsum(lengths)[:-1]
    starts = starts[(starts > 0) & (starts < flat.size)]
    keep = np.ones(gaps.size, dtype=bool)
    keep[starts - 1] = False
    return gaps[keep]


def _peak_output_tokens_per_s(requests: pa.Table, start_time: float) -> float:
    flat = pc.list_flatten(requests.column("token_times")).to_numpy(zero_copy_only=False)
    if flat.size == 0:
        return 0.0
    buckets = np.floor(flat - start_time).astype(np.int64)
    buckets = buckets[buckets >= 0]
    if buckets.size == 0:
        return 0.0
    return float(np.bincount(buckets).max())


def _peak_concurrency(arrivals: np.ndarray, finishes: np.ndarray) -> int:
    if arrivals.size == 0:
        return 0
    # Half-open [arrival, finish): at equal times a departure goes before an arrival. So just after the i-th
    # arrival (in time order), i + 1 have arrived and those finished at or before it have left.
    arrivals = np.sort(arrivals)
    left = np.searchsorted(np.sort(finishes), arrivals, side="right")
    return int((np.arange(1, arrivals.size + 1) - left).max())


def run_window(requests: pa.Table) -> tuple[float, float]:
    """The benchmark window of a requests table: first arrival to last finish, in seconds."""
    arrivals = _float_column(requests, "arrival_time")
    finishes = _float_column(requests, "finish_time")
    start_time = float(np.nanmin(arrivals)) if arrivals.size else 0.0
    # An interrupted run records the requests still to come as aborted at their arrival time, however far
    # in the future: they never reached the engine, so they do not stretch the window past the interruption.
    never_arrived = (
        _status_is(requests, RequestStatus.ABORTED) & np.isnan(_float_column(requests, "first_scheduled_time"))
        & ~(finishes > arrivals)
    )
    finishes = finishes[np.isfinite(finishes) & ~never_arrived]
    end_time = float(finishes.max()) if finishes.size else start_time
    return start_time, max(end_time, start_time)


def check_goodput_slos(slos_ms: dict[str, float]) -> dict[str, float]:
    """The SLO dict validated: known metric names, non-negative numbers of milliseconds."""
    checked = {}
    for name, value in slos_ms.items():
        if name not in GOODPUT_METRICS:
            raise ValueError(f"unknown goodput SLO {name!r}: expected one of {', '.join(GOODPUT_METRICS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"goodput SLO {name} must be a non-negative number of milliseconds, got {value!r}")
        checked[name] = float(value)
    return checked


def compute_metrics(run, goodput: dict[str, float] | None = None, *, itl: Distribution | None = None,
                    max_output_tokens_per_s: float | None = None) -> Metrics:
    """vLLM's metrics of a run (a Run or its requests table); goodput maps ttft/tpot/e2el to SLOs in ms.

    itl and max_output_tokens_per_s, when given, are used instead of reading the token_times column (which a
    table read without it lacks: compute_metrics_of_file reads it in batches)."""
    requests: pa.Table = run if isinstance(run, pa.Table) else run.requests
    done = _status_is(requests, RequestStatus.FINISHED)
    # Columns are taken one at a time and masked, not the table filtered whole: a simulated week has millions of rows.
    completed = requests.filter(pa.array(done)) if itl is None or max_output_tokens_per_s is None else None

    start_time, end_time = run_window(requests)
    duration = max(end_time - start_time, 0.0)

    ttft = _float_column(requests, "ttft")[done]
    tpot = _float_column(requests, "tpot")[done]
    e2el = _float_column(requests, "e2e")[done]
    output_lens = _column(requests, "output_len").astype(np.int64)[done]
    total_input = int(_column(requests, "prompt_len").astype(np.int64)[done].sum())
    total_output = int(output_lens.sum())

    def per_second(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    num_good = request_goodput = slos = None
    if goodput:
        slos = check_goodput_slos(goodput)
        good = np.ones(int(done.sum()), dtype=bool)
        # As vLLM: a request with a single output token has TPOT 0 for goodput.
        measured = {"ttft": ttft, "tpot": np.where(np.isnan(tpot), 0.0, tpot), "e2el": e2el}
        for name, limit_ms in slos.items():
            good &= measured[name] <= limit_ms / 1000.0
        num_good = int(good.sum())
        request_goodput = per_second(num_good)

    return Metrics(
        num_requests=requests.num_rows,
        completed=int(done.sum()),
        failed=int(_status_is(requests, RequestStatus.REJECTED, RequestStatus.ABORTED).sum()),
        num_rejected=int(_status_is(requests, RequestStatus.REJECTED).sum()),
        num_aborted=int(_status_is(requests, RequestStatus.ABORTED).sum()),
        num_unfinished=int(_status_is(requests, RequestStatus.WAITING, RequestStatus.RUNNING).sum()),
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        start_time=start_time,
        end_time=end_time,
        duration=duration,
        request_throughput=per_second(int(done.sum())),
        output_throughput=per_second(total_output),
        total_token_throughput=per_second(total_input + total_output),
        ttft=Distribution.of(ttft[~np.isnan(ttft)]),
        tpot=Distribution.of(tpot[(output_lens > 1) & ~np.isnan(tpot)]),
        itl=itl if itl is not None else Distribution.of(inter_token_latencies(completed)),
        e2el=Distribution.of(e2el[~np.isnan(e2el)]),
        max_output_tokens_per_s=(max_output_tokens_per_s if max_output_tokens_per_s is not None
                                 else _peak_output_tokens_per_s(completed, start_time)),
        max_concurrent_requests=_peak_concurrency(
            _float_column(requests, "arrival_time")[done], _float_column(requests, "finish_time")[done]
        ),
        goodput_slos_ms=slos,
        num_good=num_good,
        request_goodput=request_goodput,
    )


_METRIC_COLUMNS = ("status", "arrival_time", "first_scheduled_time", "finish_time", "prompt_len", "output_len",
                   "ttft", "tpot", "e2e")
"""The columns compute_metrics reads besides token_times."""
_TOKEN_TIME_BATCH = 2048
"""Requests whose token times are read at once (a few hundred thousand values, a few MB)."""
_GAPS_HELD_AT_MOST = 1 << 23
"""Token gaps kept in memory between the ITL passes (64 MB) instead of read again from the file."""


def compute_metrics_of_file(path, goodput: dict[str, float] | None = None, percentiles=()) -> Metrics:
    """compute_metrics of a requests.parquet without holding its token times: they are read a row group at a
    time (a simulated week has hundreds of millions), the ITL percentiles found exactly in a few passes."""
    import pyarrow.parquet as pq

    from analysis.run_store import check_values

    # pre_buffer would keep every row group read so far in memory: the token times are read once per pass.
    file = pq.ParquetFile(path, pre_buffer=False)
    check_values(file.read(columns=["request_id"]), str(path))  # each id once; then let go of the ids
    requests = file.read(columns=list(_METRIC_COLUMNS))
    check_values(requests, str(path))
    start_time, _ = run_window(requests)

    def token_times():
        for batch in file.iter_batches(batch_size=_TOKEN_TIME_BATCH, columns=["status", "token_times"]):
            done = pc.equal(batch.column("status"), RequestStatus.FINISHED.value)
            table = pa.Table.from_batches([batch]).filter(done)
            check_values(table.select(["token_times"]), str(path))
            yield table

    def gaps_of(table: pa.Table) -> np.ndarray:
        values = inter_token_latencies(table)
        return values[~np.isnan(values)]

    # The first pass keeps the gaps when they are few (a simulated hour's), so the ITL passes read no file.
    held: list[np.ndarray] | None = []
    num_held = 0
    peak = np.zeros(0, dtype=np.int64)
    for table in token_times():
        flat = pc.list_flatten(table.column("token_times")).to_numpy(zero_copy_only=False)
        buckets = np.floor(flat - start_time).astype(np.int64)
        counts = np.bincount(buckets[buckets >= 0])
        if counts.size > peak.size:
            counts[: peak.size] += peak
            peak = counts
        else:
            peak[: counts.size] += counts
        if held is not None:
            held.append(gaps_of(table))
            num_held += held[-1].size
            if num_held > _GAPS_HELD_AT_MOST:
                held = None

    def gaps():
        if held is not None:
            yield from held
            return
        for table in token_times():
            yield gaps_of(table)

    itl = Distribution.of_statistics(BatchStatistics(gaps), percentiles)
    return compute_metrics(requests, goodput, itl=itl, max_output_tokens_per_s=float(peak.max()) if peak.size else 0.0)
