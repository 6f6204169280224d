"""The server's request log: every request the engine accepted, as a run folder in the replay's schema
(requests.parquet, steps.parquet, metadata.json), written on demand and when the server stops."""

import datetime
import time
from pathlib import Path

from analysis.run_schema import requests_table, steps_table
from analysis.run_store import run_metadata, write_run
from engine.engine import Engine


class RequestLog:
    """Where and with what metadata the server writes its run folder."""

    def __init__(self, out_dir: str | Path, executor_kind: str, metadata: dict) -> None:
        self.out_dir = Path(out_dir)
        self.executor_kind = executor_kind
        self.metadata = metadata
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._wall_start = time.perf_counter()

    @staticmethod
    def snapshot(engine: Engine) -> tuple:
        """The engine's two tables as they stand (call on the thread that steps the engine), and whether every
        request has ended."""
        records = list(engine.request_records.values())
        complete = not engine.has_unfinished()
        return requests_table(records), steps_table(engine.step_records), complete

    def write(self, engine: Engine, snapshot: tuple) -> Path:
        """Write a snapshot as the run folder (atomically replacing the last one)."""
        requests, steps, complete = snapshot
        metadata = run_metadata(
            executor_kind=self.executor_kind,
            engine_config=engine.config,
            trace_name="server requests",
            complete=complete,
            started_at=self.started_at,
            wall_duration=time.perf_counter() - self._wall_start,
            clock_origin=getattr(engine.clock, "origin", None),  # a client's run on this machine lines up with it
            **self.metadata,
        )
        return write_run(self.out_dir, requests, steps, metadata)
