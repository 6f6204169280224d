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
from analysis.run_writer import REPLICAS_FILE, REPLICAS_SCHEMA, STEP_REPLICAS_FILE, STEP_REPLICAS_SCHEMA, RunWriter
from engine.clock import WallClock
from engine.engine import Engine
from engine.sequence import RequestStatus
from engine.stats import RequestRecord
from simulator.router import RoutedRequest
from simulator.trace_requests import TraceRequests, trace_sampling_params

ADD_BATCH = 1024
"""Streaming: requests are added this many at a time, whenever fewer than this many wait for their arrival."""
DRAIN_EVERY = 4096
"""Streaming: ended requests are handed to the writer once this many have piled up in an engine."""

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
        # Streaming (run(writer=...)): the requests added and not yet written, by id, the ended ones waiting for
        # an earlier one to end (records are written in arrival order), and where each engine's count stands.
        self.writer: RunWriter | None = None
        self._live: dict[str, int] = {}
        self._ended: dict[int, tuple[RequestRecord, int]] = {}
        self._next_to_write = 0
        self._num_drained = [0] * len(self.replicas)
        self._abort_reason: str | None = None
        self.num_output_tokens_drained = 0
        """Streaming: output tokens of the requests the engines have handed over (for progress)."""

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
        writer: RunWriter | None = None,
    ) -> "ClusterRun":
        """Serve every request at its arrival time and run the replicas to the end.

        stop_check, when given, is asked every `check_every` arrivals (default: about 100 times over the
        arrivals) and every `drain_interval` simulated seconds after the last arrival; a reason it returns
        stops the run there (the planner uses this to give up on a rate that has already broken its SLO).
        on_progress is called with the engine concerned after each step or routed arrival.

        writer: write the run into it (finish_stream() writes what is left at the end). On a virtual clock the
        run streams: requests are added a batch at a time ahead of their arrival and ended ones written out as
        it goes, so memory holds the requests in the system, not the trace's. A real engine is given every
        request first and writes at the end, so that its steps never wait on the adding.
        """
        if writer is not None:
            if stop_check is not None:
                raise ValueError("a streamed run cannot stop early: give either a writer or a stop_check")
            self.writer = writer
        if len(self.replicas) == 1 and stop_check is None:
            if writer is None or isinstance(self.replicas[0].clock, WallClock):
                self._queue_all_then_run(on_progress)
            else:
                self._stream_one(on_progress)
        else:
            self._route_at_arrivals(stop_check, check_every, drain_interval, on_progress)
        return self

    def _add(self, replica: int, index: int) -> None:
        request_id = self.requests.request_ids[index]
        if self.writer is not None:
            self._live[request_id] = index
        self.requests.add(self.replicas[replica], index)
        self.assignment[index] = replica

    def _stream_one(self, on_progress) -> None:
        # Requests are added in batches whenever few wait for their arrival: the engine always knows the next
        # arrival (so a decode fast-forward never runs past one) and never holds more than a batch ahead.
        engine = self.replicas[0]
        count = len(self.requests)
        next_index = 0
        while True:
            while next_index < count and engine.num_pending < ADD_BATCH:
                stop = min(next_index + ADD_BATCH, count)
                for index in range(next_index, stop):
                    self._add(0, index)
                next_index = stop
            if not engine.step():
                break
            if on_progress is not None:
                on_progress(engine)
            self._drain(0)

    def _drain(self, replica: int, final: bool = False) -> None:
        """Streaming: hand the engine's ended requests (in arrival order) and its steps to the writer, when
        enough have piled up or at the end."""
        engine = self.replicas[replica]
        if final or engine.num_finished + engine.num_rejected - self._num_drained[replica] >= DRAIN_EVERY:
            records = engine.pop_ended_records()
            self._num_drained[replica] += len(records)
            self.num_output_tokens_drained += sum(record.output_len for record in records)
            live, ended = self._live, self._ended
            for record in records:
                ended[live.pop(record.request_id)] = (record, replica)
            self._write_ready()
        if final or len(engine.step_records) >= DRAIN_EVERY * 4:
            steps = engine.step_records.drain(keep_last=not final)
            self.writer.add_steps(steps, replica)

    def _write_ready(self, upto: int | None = None) -> None:
        """Write the ended records that come next in arrival order; with upto, also make aborted records for the
        requests before it that have none (never added: an interrupted run)."""
        ended, index = self._ended, self._next_to_write
        records, replicas = [], []
        while True:
            entry = ended.pop(index, None)
            if entry is None:
                if upto is None or index >= upto:
                    break
                # Never added (an interrupted run), or its record lost to an interrupt while being handed over:
                # it still gets its row, aborted.
                entry = (self._never_added_record(index), max(self.assignment[index], 0))
                self.assignment[index] = entry[1]
            records.append(entry[0])
            replicas.append(entry[1])
            index += 1
            if len(records) >= DRAIN_EVERY:
                self.writer.add_requests(records, replicas)
                records, replicas = [], []
        self._next_to_write = index
        if records:
            self.writer.add_requests(records, replicas)

    def _never_added_record(self, index: int) -> RequestRecord:
        """The record of a request an interrupted run never reached, as Engine.abort_all would leave it."""
        requests = self.requests
        arrival = float(requests.arrival_times[index])
        now = max(engine.clock.now() for engine in self.replicas)
        return RequestRecord(
            request_id=requests.request_ids[index],
            arrival_time=arrival,
            prompt_len=requests.prompt_len(index),
            max_tokens=trace_sampling_params(int(requests.output_lens[index])).max_tokens,
            finish_time=max(now, arrival),
            status=RequestStatus.ABORTED,
            reason=f"{RequestStatus.ABORTED}: {self._abort_reason}",
        )

    def finish_stream(self) -> None:
        """Streaming: write every record and step still held (after the run, or after abort())."""
        for replica in range(len(self.replicas)):
            self._drain(replica, final=True)
        self._write_ready(upto=len(self.requests))

    def _queue_all_then_run(self, on_progress) -> None:
        # The engine admits each request at its arrival time itself: a real engine's steps then never wait
        # on routing, and the run is the one routing request by request gives (tests/test_cluster.py).
        engine = self.replicas[0]
        for index in range(len(self.requests)):
            self._add(0, index)
        if isinstance(engine.clock, WallClock):
            engine.clock.restart()  # time zero of a real run: every request queued, the first may arrive
        engine.run(on_step=on_progress)

    def _route_at_arrivals(self, stop_check, check_every, drain_interval, on_progress) -> None:
        requests, replicas, router = self.requests, self.replicas, self.router
        count = len(requests)
        if check_every <= 0:
            check_every = max(1, count // 100)
        ids, arrivals, tokens = requests.request_ids, requests.arrival_times, requests.prompt_token_ids
        streaming = self.writer is not None
        for index in range(count):
            arrival = float(arrivals[index])
            for engine in replicas:
                engine.run_until(arrival)
            replica = 0
            if len(replicas) > 1:
                replica = router.route(RoutedRequest(ids[index], arrival, tokens[index]), replicas)
            self._add(replica, index)
            if on_progress is not None:
                on_progress(replicas[replica])
            if streaming:
                self._drain(replica)
            if stop_check is not None and (index + 1) % check_every == 0:
                self.stopped = stop_check(arrival, replicas) or None
                if self.stopped:
                    return
        if stop_check is None:
            for replica, engine in enumerate(replicas):
                while engine.step():
                    if on_progress is not None:
                        on_progress(engine)
                    if streaming:
                        self._drain(replica)
        else:
            self.stopped = _drain_with_checks(replicas, stop_check, drain_interval)

    def abort(self, reason: str) -> None:
        """Stop now: every request not finished is recorded as aborted with the reason (those never routed,
        on the first replica), so the run still holds a row for each request of the trace."""
        if self.writer is not None:
            # Those never added get their records when written (finish_stream), not engine state now.
            self._abort_reason = reason
            for engine in self.replicas:
                engine.abort_all(reason)
            return
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
