"""Series a report draws, computed from a run's tables: CDF points, binned time series, request timelines.

Each function bounds its output size (points, bins, requests) so a report of any run stays small and
quick to build; the report only draws these tables.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.metrics import run_window

DEFAULT_BINS = 300
STEP_SERIES_COLUMNS = ("num_running", "num_waiting", "num_batched_tokens", "num_prefill_tokens", "num_decode_tokens")


def cdf_points(values, max_points: int = 400) -> pa.Table:
    """The empirical CDF as (value, fraction) points, at most max_points of them (quantiles when thinned)."""
    samples = np.sort(np.asarray(values, dtype=np.float64))
    samples = samples[np.isfinite(samples)]
    n = samples.size
    if n == 0:
        return pa.table({"value": pa.array([], pa.float64()), "fraction": pa.array([], pa.float64())})
    if n <= max_points:
        return pa.table({"value": samples, "fraction": np.arange(1, n + 1) / n})
    # Evenly spaced ranks keep the shape; the last rank keeps the maximum (the tail matters most).
    ranks = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return pa.table({"value": samples[ranks], "fraction": (ranks + 1) / n})


def _bin_edges(start: float, end: float, num_bins: int) -> np.ndarray:
    if not end > start:
        end = start + 1.0
    return np.linspace(start, end, num_bins + 1)


def run_time_range(requests: pa.Table, steps: pa.Table) -> tuple[float, float]:
    """From the first arrival (or step) to the last finish (or step end), in seconds."""
    starts, ends = [], []
    if requests.num_rows:
        start, end = run_window(requests)
        starts.append(start)
        ends.append(end)
    if steps.num_rows:
        starts.append(pc.min(steps.column("start_time")).as_py())
        ends.append(pc.max(pc.add(steps.column("start_time"), steps.column("duration"))).as_py())
    starts = [s for s in starts if s is not None]
    ends = [e for e in ends if e is not None]
    start = min(starts) if starts else 0.0
    return start, max(ends + [start])


def throughput_series(
    requests: pa.Table, start: float, end: float, num_bins: int = DEFAULT_BINS
) -> pa.Table:
    """Output tokens per second and finished requests per second, in num_bins bins of [start, end]."""
    edges = _bin_edges(start, end, num_bins)
    width = edges[1] - edges[0]
    token_times = pc.list_flatten(requests.column("token_times")).to_numpy(zero_copy_only=False)
    tokens, _ = np.histogram(token_times, bins=edges)
    finished = requests.filter(pc.equal(requests.column("status"), "finished"))
    finish_times = pc.drop_null(finished.column("finish_time")).to_numpy(zero_copy_only=False)
    done, _ = np.histogram(finish_times, bins=edges)
    return pa.table(
        {
            "time": (edges[:-1] + edges[1:]) / 2,
            "output_tokens_per_s": tokens / width,
            "finished_requests_per_s": done / width,
        }
    )


def step_series(steps: pa.Table, start: float, end: float, num_bins: int = DEFAULT_BINS) -> pa.Table:
    """Engine state over time: each column's step-duration-weighted mean per bin, NaN where no step ran."""
    edges = _bin_edges(start, end, num_bins)
    columns = {"time": (edges[:-1] + edges[1:]) / 2}
    if steps.num_rows == 0:
        for name in STEP_SERIES_COLUMNS + ("kv_cache_usage",):
            columns[name] = np.full(num_bins, np.nan)
        return pa.table(columns)
    start_times = steps.column("start_time").to_numpy()
    weights = np.maximum(steps.column("duration").to_numpy(), 1e-12)
    bins = np.clip(np.searchsorted(edges, start_times, side="right") - 1, 0, num_bins - 1)
    total_weight = np.bincount(bins, weights=weights, minlength=num_bins)
    has_steps = total_weight > 0

    def weighted_mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(bins, weights=weights * values, minlength=num_bins)
        return np.where(has_steps, sums / np.where(has_steps, total_weight, 1.0), np.nan)

    for name in STEP_SERIES_COLUMNS:
        columns[name] = weighted_mean(steps.column(name).to_numpy().astype(np.float64))
    used = steps.column("kv_blocks_used").to_numpy().astype(np.float64)
    total = steps.column("kv_blocks_total").to_numpy().astype(np.float64)
    columns["kv_cache_usage"] = weighted_mean(np.where(total > 0, used / np.maximum(total, 1), 0.0))
    return pa.table(columns)


def step_event_rates(steps: pa.Table, start: float, end: float, num_bins: int = DEFAULT_BINS) -> pa.Table:
    """Preemptions per second and prefix-cache hit tokens per second, in num_bins bins of [start, end] (each step
    counted in the bin it starts in)."""
    edges = _bin_edges(start, end, num_bins)
    width = edges[1] - edges[0]
    columns = {"time": (edges[:-1] + edges[1:]) / 2}
    start_times = steps.column("start_time").to_numpy() if steps.num_rows else np.empty(0)
    for name, column in (("preemptions_per_s", "num_preempted"), ("prefix_hit_tokens_per_s", "prefix_cache_hit_tokens")):
        values = steps.column(column).to_numpy().astype(np.float64) if steps.num_rows else np.empty(0)
        sums, _ = np.histogram(start_times, bins=edges, weights=values)
        columns[name] = sums / width
    return pa.table(columns)


def length_histogram(lengths, num_bins: int = 40) -> pa.Table:
    """Counts of lengths (tokens) in num_bins equal bins from 0 to the largest; (bin_start, bin_end, count)."""
    values = np.asarray(lengths, dtype=np.float64)
    top = float(values.max()) if values.size else 1.0
    edges = np.linspace(0.0, max(top, 1.0), num_bins + 1)
    counts, _ = np.histogram(values, bins=edges)
    return pa.table({"bin_start": edges[:-1], "bin_end": edges[1:], "count": counts.astype(np.int64)})


def request_timeline(requests: pa.Table, itl_threshold: float, max_requests: int = 200) -> pa.Table:
    """Bars for up to max_requests consecutive finished requests (by arrival, from the middle of the run):
    the wait to the first token ("ttft"), then runs of token gaps at or under the threshold ("itl_ok") or
    over it ("itl_slow"); num_tokens is how many tokens each bar produced."""
    finished = requests.filter(pc.equal(requests.column("status"), "finished"))
    finished = finished.take(pc.sort_indices(finished, [("arrival_time", "ascending")]))
    if finished.num_rows > max_requests:
        # Consecutive requests overlap in time, so their bars show batching and queueing; the middle of
        # the run is past the warm-up.
        first = (finished.num_rows - max_requests) // 2
        finished = finished.slice(first, max_requests)
    rows: dict[str, list] = {"row": [], "request_id": [], "kind": [], "start": [], "end": [], "num_tokens": []}

    def add(row: int, request_id: str, kind: str, start: float, end: float, num_tokens: int = 0) -> None:
        rows["row"].append(row)
        rows["request_id"].append(request_id)
        rows["kind"].append(kind)
        rows["start"].append(float(start))
        rows["end"].append(float(end))
        rows["num_tokens"].append(int(num_tokens))

    request_ids = finished.column("request_id").to_pylist()
    arrivals = finished.column("arrival_time").to_numpy()
    token_lists = finished.column("token_times")
    for row in range(finished.num_rows):
        times = np.asarray(token_lists[row].values, dtype=np.float64) if token_lists[row].is_valid else np.empty(0)
        if times.size == 0:
            continue
        add(row, request_ids[row], "ttft", arrivals[row], times[0], 1)
        if times.size < 2:
            continue
        slow = np.diff(times) > itl_threshold
        # Consecutive gaps of the same kind merge into one bar, so a bar count grows with changes, not tokens.
        change = np.flatnonzero(np.diff(slow.astype(np.int8))) + 1
        bounds = np.concatenate([[0], change, [slow.size]])
        for first, last in zip(bounds[:-1], bounds[1:]):
            add(row, request_ids[row], "itl_slow" if slow[first] else "itl_ok", times[first], times[last], last - first)
    return pa.table(
        {
            "row": pa.array(rows["row"], pa.int64()),
            "request_id": pa.array(rows["request_id"], pa.string()),
            "kind": pa.array(rows["kind"], pa.string()),
            "start": pa.array(rows["start"], pa.float64()),
            "end": pa.array(rows["end"], pa.float64()),
            "num_tokens": pa.array(rows["num_tokens"], pa.int64()),
        }
    )
