"""Replay a trace through an engine at its arrival times and store the run folder."""

import datetime
import gc
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from analysis.run_schema import requests_table, steps_table
from analysis.run_store import run_metadata, trace_fingerprint, write_run
from engine.engine import Engine
from simulator.trace_requests import add_trace_requests
from traces.schema import Trace


class ReplayProgress:
    """A progress bar: requests done, running and waiting, output tokens per second of run time, the clock."""

    def __init__(self, total: int, enabled: bool, description: str) -> None:
        self.bar = tqdm(total=total, desc=description, unit="req", disable=not enabled, dynamic_ncols=True)
        self._done = 0
        self._last_refresh = 0.0

    def __call__(self, engine: Engine) -> None:
        if self.bar.disable:
            return  # no bar: the refresh's sum over every sequence would cost a real run's step its time
        now = time.monotonic()
        if now - self._last_refresh < 0.25:
            return
        self._last_refresh = now
        self.refresh(engine)

    def refresh(self, engine: Engine) -> None:
        done = engine.num_finished + engine.num_rejected
        self.bar.update(done - self._done)
        self._done = done
        clock_time = engine.clock.now()
        # A few milliseconds even for 20k requests, and the bar refreshes at most four times a second.
        tokens = sum(len(seq.token_ids) - seq.num_prompt_tokens for seq in engine.sequences.values())
        self.bar.set_postfix(
            running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting),
            tok_s=f"{tokens / clock_time:.0f}" if clock_time > 0 else "-",
            t=f"{clock_time:.1f}s",
            refresh=False,
        )

    def close(self, engine: Engine) -> None:
        self.refresh(engine)
        self.bar.close()


def replay(
    trace: Trace,
    engine: Engine,
    out_dir: str | Path,
    *,
    executor_kind: str,
    vocab_size: int,
    seed: int = 0,
    show_progress: bool = True,
    metadata: dict | None = None,
    before_start: Callable[[], None] | None = None,
) -> Path:
    """Feed the trace's requests at their arrival times, run to the end and write the run folder.

    Ctrl-C or an error keeps what finished: the rest is recorded as aborted and the run marked incomplete.
    """
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    total = add_trace_requests(engine, trace, vocab_size=vocab_size, seed=seed)
    if before_start is not None:
        before_start()
    progress = ReplayProgress(total, show_progress, f"replay {trace.name}")
    complete = True
    failure: BaseException | None = None
    # The run allocates millions of small objects and frees few: cyclic GC passes would only cost time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        engine.run(on_step=progress)
    except KeyboardInterrupt as interrupt:
        complete = False
        failure = interrupt
        engine.abort_all("interrupted")
    except Exception as error:  # keep the finished part, then re-raise
        complete = False
        failure = error
        engine.abort_all(f"error: {type(error).__name__}: {error}")
    finally:
        if gc_was_enabled:
            # The run's objects live on until the run is written: frozen meanwhile, the collections that
            # building the tables triggers skip them instead of scanning millions of them again and again.
            gc.freeze()
            gc.enable()
        progress.close(engine)

    run_meta = run_metadata(
        executor_kind=executor_kind,
        engine_config=engine.config,
        trace_name=trace.name,
        trace_fingerprint=trace_fingerprint(trace.table),
        complete=complete,
        started_at=started_at,
        wall_duration=time.perf_counter() - wall_start,
        **{
            "num_kv_blocks": engine.block_manager.num_blocks,
            "prefix_cache_hit_rate": engine.block_manager.hit_rate,
            "trace_source_format": trace.source_format,
            "trace_notes": list(trace.notes),
            "seed": seed,
            **(metadata or {}),
        },
    )
    try:
        path = write_run(
            out_dir,
            requests_table(list(engine.request_records.values())),
            steps_table(engine.step_records),
            run_meta,
        )
    finally:
        if gc_was_enabled:
            gc.unfreeze()
    if isinstance(failure, KeyboardInterrupt):
        print(f"interrupted: the finished part is in {path} (marked incomplete)")
    elif failure is not None:
        raise RuntimeError(f"replay failed; the finished part is in {path} (marked incomplete)") from failure
    return path
