"""Replay a trace at its arrival times, on one engine or on replicas behind a router, and store the run folder."""

import ctypes
import datetime
import gc
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from analysis.metrics import Metrics, compute_metrics_of_file
from analysis.run_store import run_metadata
from analysis.run_writer import RunWriter
from engine.engine import Engine
from simulator.cluster import ClusterRun
from simulator.trace_requests import TraceRequests
from traces.schema import Trace
from twinfer.interrupts import signal_of, signals_deferred


class ReplayProgress:
    """A progress bar: requests done, running and waiting, output tokens per second of run time, the clock."""

    def __init__(self, replicas: Sequence[Engine], total: int, description: str, cluster: ClusterRun | None = None
                 ) -> None:
        self.replicas = replicas
        self.cluster = cluster
        self.bar = tqdm(total=total, desc=description, unit="req", dynamic_ncols=True)
        self._done = 0
        self._last_refresh = 0.0

    def __call__(self, engine: Engine) -> None:
        now = time.monotonic()
        if now - self._last_refresh < 0.25:
            return
        self._last_refresh = now
        self.refresh()

    def refresh(self) -> None:
        replicas = self.replicas
        done = sum(engine.num_finished + engine.num_rejected for engine in replicas)
        self.bar.update(done - self._done)
        self._done = done
        clock_time = max(engine.clock.now() for engine in replicas)
        # A few milliseconds even for 20k requests, and the bar refreshes at most four times a second.
        tokens = sum(len(seq.token_ids) - seq.num_prompt_tokens
                     for engine in replicas for seq in engine.sequences.values())
        if self.cluster is not None:
            tokens += self.cluster.num_output_tokens_drained  # those a streaming run has written out
        self.bar.set_postfix(
            running=sum(len(engine.scheduler.running) for engine in replicas),
            waiting=sum(len(engine.scheduler.waiting) for engine in replicas),
            tok_s=f"{tokens / clock_time:.0f}" if clock_time > 0 else "-",
            t=f"{clock_time:.1f}s",
            refresh=False,
        )

    def close(self) -> None:
        self.refresh()
        self.bar.close()


@dataclass(frozen=True)
class ReplayResult:
    """A replay written to its run folder, and its metrics computed from what was written (not read back)."""

    path: Path
    metrics: Metrics
    metadata: dict
    interrupt: KeyboardInterrupt | None = None
    """What stopped the run (Ctrl-C, SIGTERM; also one that came while it was being written), else None."""

    @property
    def complete(self) -> bool:
        """Whether every request was served to its end (the run was not stopped early)."""
        return bool(self.metadata.get("complete"))


def replay(
    trace: Trace,
    replicas: Engine | Sequence[Engine],
    out_dir: str | Path,
    *,
    executor_kind: str,
    router=None,
    seed: int = 0,
    show_progress: bool = True,
    metadata: dict | None = None,
    goodput: dict[str, float] | None = None,
    percentiles=(),
) -> ReplayResult:
    """Serve the trace's requests at their arrival times, run to the end and write the run folder.

    Several replicas share the requests through the router (simulator.cluster). A simulated run streams its
    tables to disk as it goes, so its memory does not grow with the trace. Ctrl-C, SIGTERM (within
    twinfer.interrupts.signals_as_interrupts) or an error keeps what finished: the rest is recorded as aborted
    and the run marked incomplete; an error is raised again once that is written, an interrupt is returned in
    the result. Signals arriving while the run is written are held back until it is. goodput (SLOs in ms) and
    percentiles are those of the metrics returned.
    """
    replicas = [replicas] if isinstance(replicas, Engine) else list(replicas)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    # Prompts longer than every replica's max_model_len are rejected without making their tokens.
    max_prompt_len = min(engine.config.max_model_len for engine in replicas)
    # A simulation reads its prompts' tokens only to hash them for the prefix cache, or to route by them; else
    # their lengths are all it needs, and making the tokens would be a tenth of its time.
    token_contents = executor_kind != "sim" or len(replicas) > 1 or any(
        engine.config.enable_prefix_caching for engine in replicas)
    requests = TraceRequests.from_trace(trace, vocab_size=replicas[0].config.vocab_size, seed=seed,
                                        max_prompt_len=max_prompt_len, lazy=True, token_contents=token_contents)
    writer = RunWriter(out_dir, num_replicas=len(replicas))
    try:
        return _run_and_write(trace, replicas, requests, writer, router, executor_kind, seed, show_progress,
                              metadata, goodput, percentiles, started_at, wall_start)
    except BaseException:
        writer.discard()
        raise


def _run_and_write(trace, replicas, requests, writer, router, executor_kind, seed, show_progress, metadata,
                   goodput, percentiles, started_at, wall_start) -> ReplayResult:
    cluster = ClusterRun(requests, replicas, router)
    progress = None
    if show_progress:  # else no callback: a real run's step would pay for the call
        on = f" on {len(replicas)} replicas" if len(replicas) > 1 else ""
        progress = ReplayProgress(replicas, len(requests), f"replay {trace.name}{on}", cluster)
    failure: BaseException | None = None
    reason = ""
    # The run allocates millions of small objects and frees few: cyclic GC passes would only cost time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        cluster.run(on_progress=progress, writer=writer)
    except KeyboardInterrupt as interrupt:
        failure = interrupt
        name = signal.Signals(signal_of(interrupt)).name
        reason = "interrupted" if name == "SIGINT" else f"interrupted by {name}"
    except Exception as error:  # keep the finished part, then re-raise
        failure = error
        reason = f"error: {type(error).__name__}: {error}"
    finally:
        if gc_was_enabled:
            # The run's objects live on until the run is written: frozen meanwhile, the collections that
            # building the tables triggers skip them instead of scanning millions of them again and again.
            gc.freeze()
            gc.enable()
        if progress is not None:
            progress.close()

    extra = {"stopped_by": signal.Signals(signal_of(failure)).name} if isinstance(failure, KeyboardInterrupt) else {}
    with signals_deferred("twinfer: writing the run before stopping ...") as deferred:
        try:
            if failure is not None:
                cluster.abort(reason)
            cluster.finish_stream()
            writer.seal()
            _return_freed_memory()  # before the metrics pass, whose peak adds to what the run left
            metrics = compute_metrics_of_file(writer.requests_path, goodput, percentiles)
            run_meta = run_metadata(
                executor_kind=executor_kind,
                engine_config=replicas[0].config,
                trace_name=trace.name,
                trace_fingerprint=requests.fingerprint,
                complete=failure is None,
                started_at=started_at,
                wall_duration=time.perf_counter() - wall_start,
                **{
                    **cluster.metadata(),
                    "trace_source_format": trace.source_format,
                    "trace_notes": list(trace.notes),
                    "seed": seed,
                    **extra,
                    **(metadata or {}),
                },
            )
            path = writer.commit(run_meta)
        finally:
            if gc_was_enabled:
                gc.unfreeze()
    interrupt = failure if isinstance(failure, KeyboardInterrupt) else deferred.interrupt
    if isinstance(failure, KeyboardInterrupt):
        print(f"interrupted ({extra['stopped_by']}): the finished part is in {path} (marked incomplete)")
    elif failure is not None:
        raise RuntimeError(f"replay failed; the finished part is in {path} (marked incomplete)") from failure
    return ReplayResult(path, metrics, run_meta, interrupt)


def _return_freed_memory() -> None:
    """Give the memory of the run's freed objects back to the system: Arrow's pool keeps freed pages, and glibc
    keeps the pages of millions of small freed lists (a simulated week's token times) unless trimmed."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
