"""Serving a trace: by one engine, or by N replicas (each an Engine over its own executor and clock) behind
a router, stored as one run folder. `twinfer replay`, `twinfer simulate --replicas N` and the planner's
probes all serve a trace here.

With several replicas, for each request in arrival order every replica is run up to the arrival time
(Engine.run_until), the router picks a replica from their state at that moment, and the request is added
there; at the end all replicas run to completion. One replica is run the same way when the run is checked
as it goes (the planner's probes); otherwise every request is queued at once and the engine admits each at
its arrival time, which gives the same run.

The run folder is the normal one (requests.parquet with every request, steps.parquet with every
replica's steps ordered by start time, metadata.json). With several replicas the metadata adds `replicas`
and `router`, and two side tables say which replica did what, so every reader of the normal schema keeps
working: replicas.parquet (request_id, replica) and step_replicas.parquet (replica, step), the latter one
row per steps.parquet row in the same order.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.run_schema import requests_table, steps_table
from analysis.run_store import write_run
from engine.clock import WallClock
from engine.engine import Engine
from simulator.router import RoutedRequest
from simulator.trace_requests import TraceRequests

REPLICAS_FILE = "replicas.parquet"
STEP_REPLICAS_FILE = "step_replicas.parquet"
REPLICAS_SCHEMA = pa.schema([("request_id", pa.string()), ("replica", pa.int32())])
STEP_REPLICAS_SCHEMA = pa.schema([("replica", pa.int32()), ("step", pa.int64())])

StopCheck = Callable[[float, Sequence[Engine]], str | None]
"""Called now and then with the cluster's time and replicas; a non-empty string stops the run early."""


class ClusterRun:
    """A trace's requests served by one engine or by replicas behind a router: which replica took each
    request, and why the run stopped early (if it did)."""

    def __init__(self, requests: TraceRequests, replicas: Sequence[Engine], router=None) -> None:
        if not replicas:
            raise ValueError("a cluster needs at least one replica")
        if router is None and len(replicas) > 1:
            raise ValueError(f"{len(replicas)} replicas need a router to share the requests")
        self.requests = requests
        self.replicas = list(replicas)
        self.router = router
        self.assignment = [-1] * len(requests)
        """Replica of each request, in arrival order (-1 for requests never routed: an early stop)."""
        self.stopped: str | None = None

    @property
    def router_name(self) -> str | None:
        """The router's CLI name (None: one engine, no router)."""
        return None if self.router is None else getattr(self.router, "name", type(self.router).__name__)

    def run(
        self,
        *,
        stop_check: StopCheck | None = None,
        check_every: int = 0,
        drain_interval: float = 1.0,
        on_progress: Callable[[Engine], None] | None = None,
    ) -> "ClusterRun":
        """Serve every request at its arrival time and run the replicas to the end.

        stop_check, when given, is asked every `check_every` arrivals (default: about 100 times over the
        arrivals) and every `drain_interval` simulated seconds after the last arrival; a reason it returns
        stops the run there (the planner uses this to give up on a rate that has already broken its SLO).
        on_progress is called with the engine concerned after each step or routed arrival.
        """
        if len(self.replicas) == 1 and stop_check is None:
            self._queue_all_then_run(on_progress)
        else:
            self._route_at_arrivals(stop_check, check_every, drain_interval, on_progress)
        return self

    def _queue_all_then_run(self, on_progress) -> None:
        # The engine admits each request at its arrival time itself: a real engine's steps then never wait
        # on routing, and the run is the one routing request by request gives (tests/test_cluster.py).
        engine = self.replicas[0]
        for index in range(len(self.requests)):
            self.requests.add(engine, index)
            self.assignment[index] = 0
        if isinstance(engine.clock, WallClock):
            engine.clock.restart()  # time zero of a real run: every request queued, the first may arrive
        engine.run(on_step=on_progress)

    def _route_at_arrivals(self, stop_check, check_every, drain_interval, on_progress) -> None:
        requests, replicas, router = self.requests, self.replicas, self.router
        count = len(requests)
        if check_every <= 0:
            check_every = max(1, count // 100)
        ids, arrivals, tokens = requests.request_ids, requests.arrival_times, requests.prompt_token_ids
        for index in range(count):
            arrival = float(arrivals[index])
            for engine in replicas:
                engine.run_until(arrival)
            replica = 0
            if len(replicas) > 1:
                replica = router.route(RoutedRequest(ids[index], arrival, tokens[index]), replicas)
            requests.add(replicas[replica], index)
            self.assignment[index] = replica
            if on_progress is not None:
                on_progress(replicas[replica])
            if stop_check is not None and (index + 1) % check_every == 0:
                self.stopped = stop_check(arrival, replicas) or None
                if self.stopped:
                    return
        if stop_check is None:
            for engine in replicas:
                engine.run(on_step=on_progress)
        else:
            self.stopped = _drain_with_checks(replicas, stop_check, drain_interval)

    def abort(self, reason: str) -> None:
        """Stop now: every request not finished is recorded as aborted with the reason (those never routed,
        on the first replica), so the run still holds a row for each request of the trace."""
        # A request interrupted while being added may be in its replica already.
        owners = {request_id: replica for replica, engine in enumerate(self.replicas)
                  for request_id in engine.request_records}
        for index, replica in enumerate(self.assignment):
            if replica < 0:
                request_id = self.requests.request_ids[index]
                if request_id not in owners:
                    self.requests.add(self.replicas[0], index)
                self.assignment[index] = owners.get(request_id, 0)
        for engine in self.replicas:
            engine.abort_all(reason)

    def request_records(self) -> list:
        """Every routed request's record, in arrival order."""
        per_replica = [engine.request_records for engine in self.replicas]
        return [
            per_replica[replica][request_id]
            for request_id, replica in zip(self.requests.request_ids, self.assignment)
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

    def metadata(self) -> dict:
        """What the run's metadata says of the serving: KV blocks, prefix-cache hits and, with several
        replicas, the router, each replica's share and why the run stopped early (if)."""
        metadata = {
            "num_kv_blocks": self.replicas[0].block_manager.num_blocks,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
        }
        if len(self.replicas) > 1:
            metadata.update(replicas=len(self.replicas), router=self.router_name,
                            requests_per_replica=self.requests_per_replica(), stopped_early=self.stopped)
            if hasattr(self.router, "num_fallback"):
                router = self.router
                metadata["prefix_affinity"] = {"home": router.num_affinity, "fallback": router.num_fallback}
        return metadata

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """requests (arrival order) and steps (all replicas', by start time)."""
        requests = requests_table(self.request_records())
        if len(self.replicas) == 1:
            return requests, steps_table(self.replicas[0].step_records)
        return requests, self._merged_steps()[0]

    def _merged_steps(self) -> tuple[pa.Table, pa.Table]:
        """Every replica's steps by start time, and the step_replicas side table saying whose each is."""
        step_tables = [steps_table(engine.step_records) for engine in self.replicas]
        steps = pa.concat_tables(step_tables)
        owners = np.concatenate([np.full(t.num_rows, i, dtype=np.int32) for i, t in enumerate(step_tables)])
        # Stable sort by start time, ties by replica, so the merged timeline reads in order.
        order = np.lexsort((owners, steps.column("start_time").to_numpy()))
        steps = steps.take(pa.array(order))
        step_replicas = pa.table(
            {"replica": pa.array(owners[order]), "step": steps.column("step")}, schema=STEP_REPLICAS_SCHEMA
        )
        return steps, step_replicas

    def write(self, out_dir: str | os.PathLike, metadata: dict) -> Path:
        """The run folder; with several replicas also replicas.parquet and step_replicas.parquet."""
        if len(self.replicas) == 1:
            return write_run(out_dir, *self.tables(), metadata)
        requests = requests_table(self.request_records())
        steps, step_replicas = self._merged_steps()
        path = write_run(out_dir, requests, steps, metadata)
        routed = [(rid, r) for rid, r in zip(self.requests.request_ids, self.assignment) if r >= 0]
        replicas = pa.table(
            {"request_id": [rid for rid, _ in routed], "replica": [r for _, r in routed]}, schema=REPLICAS_SCHEMA
        )
        for name, table in ((REPLICAS_FILE, replicas), (STEP_REPLICAS_FILE, step_replicas)):
            staging = path / f".{name}.writing"
            pq.write_table(table, staging)
            os.replace(staging, path / name)
        return path


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


def read_replica_assignment(run_path: str | os.PathLike) -> pa.Table:
    """replicas.parquet of a cluster run: which replica served each request."""
    path = Path(run_path) / REPLICAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_path} is not a cluster run: no {REPLICAS_FILE}")
    return pq.read_table(path).select(REPLICAS_SCHEMA.names).cast(REPLICAS_SCHEMA)


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
