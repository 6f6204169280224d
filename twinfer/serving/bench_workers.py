"""`twinfer bench serve --num-workers N`: the trace's requests sent from N client processes, each on an event loop
of its own (as guidellm's workers), so the client is not the bottleneck of what it measures.

Reading a streamed chunk costs the client about 30 us of CPU on the development machine (the socket's wake-up,
aiohttp's read, the JSON; benchmarks/serve_chunk_cost.py); every engine step brings one chunk per running stream at
once, and a new request's first chunk, or its sending, waits behind the others on one loop. N loops share that out.

Request i goes to worker i mod N (the trace in arrival order: each worker sees the same arrival process, thinned).
Every worker sends at the trace's times from one start on time.perf_counter's clock (system-wide on Linux), so the
merged run is one run, with one clock origin. Records come back as requests end (the progress bar counts them all);
--max-concurrency is split over the workers (each holds its share, so together they never exceed it). Ctrl-C stops
the workers: the records they had handed back are kept, the rest recorded as interrupted by the caller.
"""

import asyncio
import multiprocessing
import queue
import signal
import time
import traceback
from collections.abc import Callable

from engine.stats import RequestRecord
from twinfer.serving.bench_serve import BenchServeOptions, event_loop_factory, replay
from twinfer.serving.http_request import HttpRequest

START_MARGIN_S = 0.05
"""How far ahead of now the common start is set once every worker is ready (time for all of them to wake)."""
READY_TIMEOUT_S = 120.0
"""How long a worker may take to start (import aiohttp and this package, in a fresh interpreter)."""


def concurrency_shares(max_concurrency: int | None, num_workers: int) -> list[int | None]:
    """Each worker's share of --max-concurrency: as equal as can be, summing to it (None: no limit)."""
    if max_concurrency is None:
        return [None] * num_workers
    base, extra = divmod(max_concurrency, num_workers)
    return [base + (worker < extra) for worker in range(num_workers)]


def replay_in_workers(requests: list[HttpRequest], options: BenchServeOptions,
                      on_record: Callable[[RequestRecord], None]) -> float:
    """Replay the requests from options.num_workers processes; each record goes to on_record (in this process) as
    its request ends. Returns the common start (perf_counter)."""
    num_workers = options.num_workers
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's threads or loops
    results = context.Queue()
    start_at = context.Value("d", 0.0)
    go = context.Event()
    shares = concurrency_shares(options.max_concurrency, num_workers)
    workers = [context.Process(target=_worker_main, name=f"twinfer-bench-worker-{worker}", daemon=True,
                               args=(worker, requests[worker::num_workers], options, shares[worker], results,
                                     start_at, go, _loop_name()))
               for worker in range(num_workers)]
    for worker in workers:
        worker.start()
    try:
        _wait_for(results, workers, "ready", on_record, timeout=READY_TIMEOUT_S)
        start_at.value = time.perf_counter() + START_MARGIN_S
        go.set()
        _wait_for(results, workers, "done", on_record, timeout=None)
        for worker in workers:
            worker.join()
        return start_at.value
    finally:
        for worker in workers:  # interrupted, or one failed: none left sending
            if worker.is_alive():
                worker.terminate()
                worker.join()


def _wait_for(results, workers: list, what: str, on_record: Callable[[RequestRecord], None],
              timeout: float | None) -> None:
    """Take messages until every worker has said `what`, handing records on; a worker that fails or dies
    raises."""
    waiting = set(range(len(workers)))
    deadline = None if timeout is None else time.monotonic() + timeout
    while waiting:
        try:
            message = results.get(timeout=0.5)
        except queue.Empty:
            for worker in waiting:
                if not workers[worker].is_alive():
                    raise RuntimeError(f"bench serve worker {worker} exited (exit code {workers[worker].exitcode}) "
                                       f"before it was {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"bench serve workers {sorted(waiting)} were not {what} within {timeout:.0f} s")
            continue
        kind = message[0]
        if kind == "record":
            on_record(message[1])
        elif kind == "failed":
            raise RuntimeError(f"bench serve worker {message[1]} failed: {message[2]}")
        elif kind == what:
            waiting.discard(message[1])


def _loop_name() -> str:
    """The event loop this process would use, for the workers to use the same."""
    return "asyncio" if event_loop_factory() is None else "uvloop"


def _worker_main(worker: int, requests: list[HttpRequest], options: BenchServeOptions, max_concurrency: int | None,
                 results, start_at, go, loop_name: str) -> None:
    """A worker: say it is ready, wait for the common start, send its requests, hand each record back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    try:
        loop_factory = event_loop_factory() if loop_name == "uvloop" else None
        results.put(("ready", worker))
        go.wait()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(replay(requests, options, lambda record: results.put(("record", record)), start_at.value,
                              max_concurrency))
    except BaseException as error:  # noqa: BLE001 (the parent raises it)
        results.put(("failed", worker, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        return
    results.put(("done", worker))
