"""A simulated cluster: N replicas (each an Engine over its own cost-model executor and virtual clock)
behind a router, fed a trace in arrival order, stored as one run folder.

For each request in arrival order, every replica is run up to the arrival time (Engine.run_until), the
router picks a replica from their state at that moment, and the request is added there. At the end all
replicas run to completion. With one replica this is exactly the single-engine replay.

The run folder is the normal one (requests.parquet with every request, steps.parquet with every
replica's steps ordered by start time, metadata.json with `replicas` and `router`) plus two side tables
that say which replica did what, so every reader of the normal schema keeps working:
replicas.parquet (request_id, replica) and step_replicas.parquet (replica, step), the latter one row
per steps.parquet row in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from analysis.run_schema import requests_table, steps_table
from analysis.run_store import run_metadata, trace_fingerprint, write_run
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from simulator.router import RoutedRequest, make_router
from simulator.trace_requests import trace_sampling_params
from traces.schema import Trace
from traces.tokens import trace_prompt_token_ids

REPLICAS_FILE = "replicas.parquet"
STEP_REPLICAS_FILE = "step_replicas.parquet"
REPLICAS_SCHEMA = pa.schema([("request_id", pa.string()), ("replica", pa.int32())])
STEP_REPLICAS_SCHEMA = pa.schema([("replica", pa.int32()), ("step", pa.int64())])

StopCheck = Callable[[float, Sequence[Engine]], str | None]
"""Called now and then with the cluster's time and replicas; a non-empty string stops the run early."""


@dataclass(frozen=True)
class ClusterRequests:
    """A trace's requests ready to route: ids, arrival times, prompt token ids and output lengths.

    Token ids are made once (as replay makes them, so one replica equals replay) and shared by every
    rescaled copy: a planner probing many request rates pays for them once.
    """

    name: str
    request_ids: tuple[str, ...]
    arrival_times: np.ndarray
    prompt_token_ids: tuple[np.ndarray, ...]
    output_lens: np.ndarray
    fingerprint: str = ""
    reference_rate: float | None = None
    """The mean rate that at_rate() rescales from (None: these requests' own). A window of a trace keeps the
    whole trace's, so a rate means the same arrivals as for the whole trace."""

    @classmethod
    def from_trace(cls, trace: Trace, *, vocab_size: int, seed: int = 0) -> "ClusterRequests":
        """The trace's requests with the token ids replay would give them."""
        table = trace.table
        # numpy int32 arrays (4 bytes a token, not a Python int each); lists are made as requests are added.
        tokens = tuple(trace_prompt_token_ids(trace, vocab_size=vocab_size, seed=seed))
        return cls(
            name=trace.name,
            request_ids=tuple(table.column("request_id").to_pylist()),
            arrival_times=table.column("arrival_time").to_numpy().astype(np.float64),
            prompt_token_ids=tokens,
            output_lens=table.column("output_len").to_numpy().astype(np.int64),
            fingerprint=trace_fingerprint(table),
        )

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def mean_rate(self) -> float:
        """(requests - 1) / span of arrivals, as traces.transforms.with_request_rate defines it."""
        span = float(self.arrival_times[-1] - self.arrival_times[0]) if len(self) else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")

    def head(self, count: int) -> "ClusterRequests":
        """The first `count` requests, arrival times kept."""
        return self.window(0, count)

    def window(self, start: int, count: int) -> "ClusterRequests":
        """`count` consecutive requests from position `start`, arrivals shifted to start at 0; at_rate()
        scales them as it would scale the whole trace."""
        stop = min(start + count, len(self))
        if start == 0 and stop == len(self):
            return self
        arrivals = self.arrival_times[start:stop]
        return dataclasses.replace(
            self,
            request_ids=self.request_ids[start:stop],
            arrival_times=arrivals - arrivals[0],
            prompt_token_ids=self.prompt_token_ids[start:stop],
            output_lens=self.output_lens[start:stop],
            fingerprint=f"{self.fingerprint}[{start}:{stop}]",
            reference_rate=self._reference_rate,
        )

    def busiest_window(self, count: int) -> "ClusterRequests":
        """The `count` consecutive requests arriving fastest: where a trace is hardest to serve."""
        if count >= len(self):
            return self
        spans = self.arrival_times[count - 1:] - self.arrival_times[: len(self) - count + 1]
        return self.window(int(np.argmin(spans)), count)

    @property
    def _reference_rate(self) -> float:
        return self.reference_rate if self.reference_rate is not None else self.mean_rate

    def at_rate(self, rate: float) -> "ClusterRequests":
        """Arrival times scaled so the mean rate is `rate` requests/s (with_request_rate's rule); for a
        window, so that the whole trace's mean rate would be `rate`."""
        if not rate > 0 or not np.isfinite(rate):
            raise ValueError(f"request rate must be a positive number, got {rate!r}")
        current = self._reference_rate
        if not np.isfinite(current):
            raise ValueError(f"{self.name}: {len(self)} requests with no time span cannot be set to a rate")
        return dataclasses.replace(self, arrival_times=self.arrival_times * (current / rate))


@dataclass
class ClusterResult:
    """The replicas after the run, which replica served each request, and why the run stopped early (if)."""

    replicas: list[Engine]
    router_name: str
    request_ids: tuple[str, ...]
    assignment: list[int]
    """Replica of each request, in arrival order (-1 for requests never routed: an early stop)."""
    stopped: str | None = None
    notes: dict = field(default_factory=dict)

    def request_records(self) -> list:
        """Every routed request's record, in arrival order."""
        per_replica = [engine.request_records for engine in self.replicas]
        return [
            per_replica[replica][request_id]
            for request_id, replica in zip(self.request_ids, self.assignment)
            if replica >= 0
        ]

    def requests_per_replica(self) -> list[int]:
        """How many requests each replica was given."""
        counts = np.bincount(np.asarray([r for r in self.assignment if r >= 0], dtype=np.int64),
                             minlength=len(self.replicas))
        return counts.tolist()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix-cache hit tokens over looked-up tokens, pooled over replicas."""
        hits = sum(engine.block_manager.num_hit_tokens for engine in self.replicas)
        queries = sum(engine.block_manager.num_query_tokens for engine in self.replicas)
        return hits / queries if queries else 0.0

    def tables(self) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
        """requests, steps (all replicas, by start time), replicas side table, step_replicas side table."""
        requests = requests_table(self.request_records())
        routed = [(rid, r) for rid, r in zip(self.request_ids, self.assignment) if r >= 0]
        replicas = pa.table(
            {"request_id": [rid for rid, _ in routed], "replica": [r for _, r in routed]}, schema=REPLICAS_SCHEMA
        )
        step_tables = [steps_table(engine.step_records) for engine in self.replicas]
        steps = pa.concat_tables(step_tables)
        owners = np.concatenate([np.full(t.num_rows, i, dtype=np.int32) for i, t in enumerate(step_tables)])
        # Stable sort by start time, ties by replica, so the merged timeline reads in order.
        order = np.lexsort((owners, steps.column("start_time").to_numpy()))
        steps = steps.take(pa.array(order))
        step_replicas = pa.table(
            {"replica": pa.array(owners[order]), "step": steps.column("step")}, schema=STEP_REPLICAS_SCHEMA
        )
        return requests, steps, replicas, step_replicas


def simulate_cluster(
    requests: ClusterRequests,
    replicas: list[Engine],
    router,
    *,
    stop_check: StopCheck | None = None,
    check_every: int = 0,
    drain_interval: float = 1.0,
    on_arrival: Callable[[int], None] | None = None,
) -> ClusterResult:
    """Route every request to a replica at its arrival time and run all replicas to the end.

    stop_check, when given, is asked every `check_every` arrivals (default: about 100 times over the
    arrivals) and every `drain_interval` simulated seconds after the last arrival; a reason it returns
    stops the run there (the planner uses this to give up on a rate that has already broken its SLO).
    """
    if not replicas:
        raise ValueError("a cluster needs at least one replica")
    count = len(requests)
    if check_every <= 0:
        check_every = max(1, count // 100)
    assignment = [-1] * count
    params_cache: dict[int, SamplingParams] = {}
    stopped = None
    ids, arrivals, tokens, output_lens = (
        requests.request_ids, requests.arrival_times, requests.prompt_token_ids, requests.output_lens
    )
    for index in range(count):
        arrival = float(arrivals[index])
        for engine in replicas:
            engine.run_until(arrival)
        request = RoutedRequest(ids[index], arrival, tokens[index])
        replica = router.route(request, replicas) if len(replicas) > 1 else 0
        output_len = int(output_lens[index])
        params = params_cache.get(output_len)
        if params is None:
            params = params_cache[output_len] = trace_sampling_params(output_len)
        replicas[replica].add_request(
            prompt_token_ids=tokens[index].tolist(), sampling_params=params, arrival_time=arrival, request_id=ids[index]
        )
        assignment[index] = replica
        if on_arrival is not None:
            on_arrival(index)
        if stop_check is not None and (index + 1) % check_every == 0:
            stopped = stop_check(arrival, replicas)
            if stopped:
                break

    if not stopped:
        if stop_check is None:
            for engine in replicas:
                engine.run()
        else:
            stopped = _drain_with_checks(replicas, stop_check, drain_interval)
    return ClusterResult(
        replicas=replicas,
        router_name=getattr(router, "name", type(router).__name__),
        request_ids=ids,
        assignment=assignment,
        stopped=stopped or None,
    )


def _drain_with_checks(replicas: list[Engine], stop_check: StopCheck, interval: float) -> str | None:
    horizon = max(engine.clock.now() for engine in replicas)
    while any(engine.has_unfinished() for engine in replicas):
        horizon += interval
        for engine in replicas:
            if engine.has_unfinished():
                engine.run_until(horizon)
        reason = stop_check(horizon, replicas)
        if reason:
            return reason
    return None


def write_cluster_run(result: ClusterResult, out_dir: str | os.PathLike, *, metadata: dict) -> Path:
    """The run folder of a cluster simulation, plus replicas.parquet and step_replicas.parquet."""
    requests, steps, replicas, step_replicas = result.tables()
    path = write_run(out_dir, requests, steps, metadata)
    for name, table in ((REPLICAS_FILE, replicas), (STEP_REPLICAS_FILE, step_replicas)):
        staging = path / f".{name}.writing"
        pq.write_table(table, staging)
        os.replace(staging, path / name)
    return path


def read_replica_assignment(run_path: str | os.PathLike) -> pa.Table:
    """replicas.parquet of a cluster run: which replica served each request."""
    path = Path(run_path) / REPLICAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_path} is not a cluster run: no {REPLICAS_FILE}")
    return pq.read_table(path).select(REPLICAS_SCHEMA.names).cast(REPLICAS_SCHEMA)


def cluster_metadata(result: ClusterResult, *, engine_config, trace_name: str, fingerprint: str,
                     started_at: str, wall_duration: float, extra: dict, router=None) -> dict:
    """The run metadata of a cluster simulation: the usual keys plus replicas, router and per-replica counts."""
    router_stats = (router.num_affinity, router.num_fallback) if hasattr(router, "num_fallback") else None
    return run_metadata(
        executor_kind="sim",
        engine_config=engine_config,
        trace_name=trace_name,
        trace_fingerprint=fingerprint,
        complete=result.stopped is None,
        started_at=started_at,
        wall_duration=wall_duration,
        **{
            "replicas": len(result.replicas),
            "router": result.router_name,
            "requests_per_replica": result.requests_per_replica(),
            "num_kv_blocks": result.replicas[0].block_manager.num_blocks,
            "prefix_cache_hit_rate": result.prefix_cache_hit_rate,
            "stopped_early": result.stopped,
            **({"prefix_affinity": {"home": router_stats[0], "fallback": router_stats[1]}} if router_stats else {}),
            **extra,
        },
    )


def build_replicas(build_one: Callable[[], Engine], count: int) -> list[Engine]:
    """`count` independent engines; the builder's notes and warnings are shown for the first one only."""
    if count < 1:
        raise ValueError(f"--replicas must be at least 1, got {count}")
    engines = [build_one()]
    for _ in range(count - 1):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engines.append(build_one())
    return engines


def simulate_cluster_cli(args) -> int:
    """`twinfer simulate --replicas N --router R`: simulate, write the run folder and print the summary."""
    from analysis.metrics import compute_metrics
    from analysis.run_store import read_run
    from analysis.summary import parse_goodput, print_summary, save_result_json
    from simulator.simulated_engine import build_simulated_engine
    from twinfer.cli.options import engine_args_from, load_trace

    trace = load_trace(args)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    engine_args = engine_args_from(args)
    built: list[tuple] = []

    def build_one() -> Engine:
        built.append(build_simulated_engine(engine_args, gpu=args.gpu, profile=args.profile))
        return built[-1][0]

    replicas = build_replicas(build_one, args.replicas)
    engine_metadata = built[0][1]
    requests = ClusterRequests.from_trace(trace, vocab_size=replicas[0].config.vocab_size, seed=args.seed)
    router = make_router(args.router, block_size=replicas[0].config.block_size)
    with tqdm(total=len(requests), desc=f"simulate {trace.name} x{args.replicas}", unit="req",
              disable=args.no_progress, dynamic_ncols=True, mininterval=0.5) as bar:
        result = simulate_cluster(requests, replicas, router, on_arrival=lambda _: bar.update())
    metadata = cluster_metadata(
        result,
        engine_config=replicas[0].config,
        trace_name=trace.name,
        fingerprint=requests.fingerprint,
        started_at=started_at,
        wall_duration=time.perf_counter() - wall_start,
        router=router,
        extra={
            "trace_source_format": trace.source_format,
            "trace_notes": list(trace.notes),
            "seed": args.seed,
            **engine_metadata,
        },
    )
    path = write_cluster_run(result, args.out, metadata=metadata)
    print(f"run written to {path}")
    counts = result.requests_per_replica()
    print(f"{args.replicas} replicas behind {args.router}: requests per replica {counts}, "
          f"prefix-cache hit rate {result.prefix_cache_hit_rate:.1%}")
    if hasattr(router, "num_fallback"):
        print(f"prefix affinity: {router.num_affinity} requests sent home, {router.num_fallback} to the "
              f"least-loaded replica because home was overloaded")
    metrics = compute_metrics(read_run(path), goodput=parse_goodput(args.goodput) if args.goodput else None)
    print_summary(metrics)
    if args.save_result:
        save_result_json(metrics, args.save_result)
        print(f"result JSON: {args.save_result}")
    return 0
