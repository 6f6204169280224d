"""A run folder written as the run goes: requests and steps stream into Parquet row groups in a private staging
folder, which commit() moves into place atomically (as analysis.run_store.write_run does for tables in memory).

So a simulated run's memory does not grow with its trace: what has ended is on disk. Requests are written in
the order given (a replay gives them in arrival order); steps in each replica's order, and with several
replicas merged by start time when the run is sealed (each replica's steps are already in time order, so the
merge reads one row group of each at a time).

Row groups are encoded, compressed and written on a thread of their own (Arrow lets go of the GIL meanwhile), so
on a machine with a second core the run goes on while its earlier part is written.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.run_schema import REQUESTS_SCHEMA, STEPS_SCHEMA, requests_table
from analysis.run_store import (METADATA_FILE, REQUESTS_FILE, STEPS_FILE, commit_staging, make_staging,
                                metadata_json)
from engine.stats import RequestRecord

REPLICAS_FILE = "replicas.parquet"
STEP_REPLICAS_FILE = "step_replicas.parquet"
REPLICAS_SCHEMA = pa.schema([("request_id", pa.string()), ("replica", pa.int32())])
STEP_REPLICAS_SCHEMA = pa.schema([("replica", pa.int32()), ("step", pa.int64())])
REQUESTS_PER_GROUP = 1 << 13
"""Requests buffered before a row group is written: their token times (hundreds each) stay a few MB."""
STEPS_PER_GROUP = 1 << 16
"""Steps per row group (18 numbers each): about 10 MB."""
WRITES_IN_FLIGHT = 2
"""Row groups handed to the writing thread and not yet written, at most (memory holds a few, not the run)."""
REQUESTS_DICTIONARY = ["request_id", "status", "reason"]
"""The requests columns worth a dictionary (few distinct values, or none repeated but cheap): numbers compress
better and faster without one."""


def _parquet_writer(path: Path, schema: pa.Schema, dictionary: list[str] | bool = False) -> pq.ParquetWriter:
    return pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=dictionary)


class RunWriter:
    """Streams one run's tables into a staging folder next to out_dir; commit() puts the folder in place."""

    def __init__(self, out_dir: str | os.PathLike, *, num_replicas: int = 1,
                 requests_per_group: int = REQUESTS_PER_GROUP, steps_per_group: int = STEPS_PER_GROUP) -> None:
        self.out_dir = Path(out_dir)
        self.num_replicas = num_replicas
        self.requests_per_group = requests_per_group
        self.steps_per_group = steps_per_group
        self.staging = make_staging(self.out_dir)
        self.num_requests = 0
        self._records: list[RequestRecord] = []
        self._record_replicas: list[int] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-writer")
        self._writes: deque[Future] = deque()
        self._requests = _parquet_writer(self.staging / REQUESTS_FILE, REQUESTS_SCHEMA, REQUESTS_DICTIONARY)
        self._assignment = (_parquet_writer(self.staging / REPLICAS_FILE, REPLICAS_SCHEMA, ["request_id"])
                            if num_replicas > 1 else None)
        # One steps file per replica; with one replica it is the run's steps.parquet.
        names = [STEPS_FILE] if num_replicas == 1 else [f".steps-{index}.parquet" for index in range(num_replicas)]
        self._step_paths = [self.staging / name for name in names]
        self._steps = [_parquet_writer(path, STEPS_SCHEMA) for path in self._step_paths]
        self._step_batches: list[list[pa.Table]] = [[] for _ in range(num_replicas)]
        self._num_step_rows = [0] * num_replicas
        self._sealed = False

    # ---- while the run goes

    def add_requests(self, records: list[RequestRecord], replicas: list[int] | None = None) -> None:
        """Append requests' final records (and, with several replicas, the replica that served each)."""
        self._records += records
        if self._assignment is not None:
            self._record_replicas += replicas if replicas is not None else [0] * len(records)
        if len(self._records) >= self.requests_per_group:
            self._flush_requests()

    def _flush_requests(self) -> None:
        if not self._records:
            return
        table = requests_table(self._records)
        self._write(self._requests, table, row_group_size=self.requests_per_group)
        if self._assignment is not None:
            self._write(self._assignment, pa.table(
                {"request_id": table.column("request_id"), "replica": pa.array(self._record_replicas, pa.int32())},
                schema=REPLICAS_SCHEMA))
            self._record_replicas = []
        self.num_requests += table.num_rows
        self._records = []

    def add_steps(self, columns: dict[str, np.ndarray], replica: int = 0) -> None:
        """Append a batch of one replica's steps (StepLog.drain()'s columns)."""
        if len(next(iter(columns.values()))):
            self._step_batches[replica].append(pa.Table.from_pydict(columns, schema=STEPS_SCHEMA))
            self._num_step_rows[replica] += len(next(iter(columns.values())))
            if self._num_step_rows[replica] >= self.steps_per_group:
                self._flush_steps(replica, whole_groups_only=True)

    def _flush_steps(self, replica: int, whole_groups_only: bool = False) -> None:
        # Full row groups: each group's metadata stays in memory (and in the footer) until the file is closed.
        if not self._step_batches[replica]:
            return
        table = pa.concat_tables(self._step_batches[replica])
        size = table.num_rows - table.num_rows % self.steps_per_group if whole_groups_only else table.num_rows
        self._write(self._steps[replica], table.slice(0, size), row_group_size=self.steps_per_group)
        rest = table.slice(size)
        self._step_batches[replica] = [rest] if rest.num_rows else []
        self._num_step_rows[replica] = rest.num_rows

    def _write(self, writer: pq.ParquetWriter, table: pa.Table, **options) -> None:
        """Hand a table to the writing thread (each file's tables are written in the order handed over)."""
        while len(self._writes) >= WRITES_IN_FLIGHT:
            self._writes.popleft().result()
        self._writes.append(self._thread.submit(writer.write_table, table, **options))

    def _finish_writes(self) -> None:
        """Wait until every table handed over is written (raising the first error of the thread)."""
        try:
            while self._writes:
                self._writes.popleft().result()
        finally:
            self._writes.clear()
            self._thread.shutdown(wait=True)

    # ---- at the end

    @property
    def requests_path(self) -> Path:
        """The staged requests.parquet (complete once sealed)."""
        return self.staging / REQUESTS_FILE

    def seal(self) -> None:
        """Close the tables: the last rows written, several replicas' steps merged by start time."""
        if self._sealed:
            return
        self._flush_requests()
        for replica in range(self.num_replicas):
            self._flush_steps(replica)
        self._finish_writes()
        self._requests.close()
        if self._assignment is not None:
            self._assignment.close()
        for writer in self._steps:
            writer.close()
        if self.num_replicas > 1:
            _merge_steps(self._step_paths, self.staging / STEPS_FILE, self.staging / STEP_REPLICAS_FILE,
                         self.steps_per_group)
            for path in self._step_paths:
                path.unlink()
        for path in self.staging.iterdir():  # on disk before the folder is renamed into place
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        self._sealed = True

    def commit(self, metadata: dict) -> Path:
        """Seal, write metadata.json and move the staging folder to out_dir (replacing an earlier run there)."""
        self.seal()
        text = metadata_json(metadata)
        with open(self.staging / METADATA_FILE, "wb") as file:
            file.write(text.encode())
            file.flush()
            os.fsync(file.fileno())
        commit_staging(self.staging, self.out_dir)
        return self.out_dir

    def discard(self) -> None:
        """Remove the staging folder (the run is abandoned)."""
        try:
            self._finish_writes()
        except Exception:  # noqa: BLE001 - the write that failed is what is being handled
            pass
        for writer in [self._requests, self._assignment, *self._steps]:
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - a writer left broken by the error being handled
                    pass
        shutil.rmtree(self.staging, ignore_errors=True)


def _merge_steps(paths: list[Path], out: Path, owners_out: Path, rows_per_group: int) -> None:
    """K-way merge of replicas' step files (each in start-time order) into one, ties by replica, a row group of
    each file at a time; step_replicas.parquet says whose each row is."""
    readers = [pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows_per_group) for path in paths]
    buffers: list[pa.Table | None] = [None] * len(paths)
    exhausted = [False] * len(paths)
    with _parquet_writer(out, STEPS_SCHEMA) as steps_writer, \
            _parquet_writer(owners_out, STEP_REPLICAS_SCHEMA) as owners_writer:
        while True:
            for index, reader in enumerate(readers):
                if not exhausted[index] and (buffers[index] is None or buffers[index].num_rows == 0):
                    batch = next(reader, None)
                    if batch is None:
                        exhausted[index] = True
                        buffers[index] = None
                    else:
                        buffers[index] = pa.Table.from_batches([batch], schema=STEPS_SCHEMA)
            live = [index for index, table in enumerate(buffers) if table is not None and table.num_rows]
            if not live:
                return
            # Every row up to the earliest last start time among replicas still reading is final: no later
            # batch of theirs can start before it.
            bound = min(buffers[index].column("start_time")[-1].as_py() for index in live if not exhausted[index]) \
                if any(not exhausted[index] for index in live) else float("inf")
            parts, owners = [], []
            for index in live:
                table = buffers[index]
                starts = table.column("start_time").to_numpy()
                take = int(np.searchsorted(starts, bound, side="right"))
                parts.append(table.slice(0, take))
                owners.append(np.full(take, index, dtype=np.int32))
                buffers[index] = table.slice(take)
            merged = pa.concat_tables(parts)
            owner = np.concatenate(owners)
            order = np.lexsort((owner, merged.column("start_time").to_numpy()))
            merged = merged.take(pa.array(order))
            steps_writer.write_table(merged)
            owners_writer.write_table(pa.table({"replica": pa.array(owner[order]), "step": merged.column("step")},
                                               schema=STEP_REPLICAS_SCHEMA))
