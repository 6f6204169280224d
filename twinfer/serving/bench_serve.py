"""Replay a trace against an OpenAI-compatible server at its arrival times, as `vllm bench serve` does, and
store the run in twinfer's schema (executor "http": requests only, no steps: the server's steps are its own).

Every request is sent at its arrival time, or later when --max-concurrency requests are already open (then
it waits, and that wait counts in its TTFT, as the trace's user would see it; its send time is stored as
first_scheduled_time). Ctrl-C keeps what finished: the rest are recorded as aborted and the run marked
incomplete. With num_workers > 1 the requests are sent from that many processes (bench_workers), merged into one run.
"""

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pyarrow as pa
from tqdm import tqdm

from analysis.run_schema import STEPS_SCHEMA, requests_table
from analysis.run_store import run_metadata, write_run
from engine.sequence import RequestStatus
from engine.stats import RequestRecord
from simulator.trace_requests import TraceRequests
from traces.schema import Trace
from twinfer.serving.http_request import HttpRequest, send_request


@dataclass(frozen=True)
class BenchServeOptions:
    """Where to send the trace and how."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    max_concurrency: int | None = None
    request_rate: float | None = None
    """vLLM's --request-rate, recorded (the arrival times already follow it)."""
    burstiness: float = 1.0
    show_progress: bool = True
    timeout_s: float = 6 * 3600
    """A request's whole time, as vLLM's benchmark allows."""
    num_workers: int = 1
    """Client processes, each sending its share of the requests on an event loop of its own (bench_workers)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be a positive integer, got {self.max_concurrency}")
        if not (isinstance(self.num_workers, int) and self.num_workers >= 1):
            raise ValueError(f"--num-workers must be a positive integer, got {self.num_workers!r}")
        if self.max_concurrency is not None and self.max_concurrency < self.num_workers:
            raise ValueError(f"--max-concurrency {self.max_concurrency} is split over --num-workers "
                             f"{self.num_workers}: give each worker at least one")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")


def trace_http_requests(trace: Trace, vocab_size: int, seed: int) -> tuple[list[HttpRequest], str]:
    """The trace's requests with the same prompt token ids an in-process replay makes (same seed and
    vocabulary), and the fingerprint a replay records."""
    requests = TraceRequests.from_trace(trace, vocab_size=vocab_size, seed=seed)
    http_requests = [
        HttpRequest(requests.request_ids[index], float(requests.arrival_times[index]),
                    requests.prompt_token_ids[index].tolist(), max(int(requests.output_lens[index]), 1))
        for index in range(len(requests))
    ]
    return http_requests, requests.fingerprint


async def replay(requests: list[HttpRequest], options: BenchServeOptions, on_record: Callable[[RequestRecord], None],
                 start: float, max_concurrency: int | None) -> None:
    """Send every request at its time after start (perf_counter), at most max_concurrency open at once; each
    record goes to on_record as its request ends."""
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=options.timeout_s)

    async def one(request: HttpRequest) -> None:
        await _sleep_until(start + request.arrival_time)
        if limit is None:
            record = await send_request(session, options.url, headers, request, options.model, start)
        else:
            async with limit:
                record = await send_request(session, options.url, headers, request, options.model, start)
        on_record(record)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 20) as session:
        await asyncio.gather(*(one(request) for request in requests))


SPIN_S = 0.002
"""The last stretch before a request's time is waited by yielding to the event loop, not by its timer."""


async def _sleep_until(when: float) -> None:
    """Return at perf_counter time `when`, never before: uvloop's timers count whole milliseconds and fire up to
    about 1 ms early or late, so the timer sleeps until SPIN_S before and the loop is yielded to from there (other
    streams are served meanwhile)."""
    delay = when - time.perf_counter()
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    while time.perf_counter() < when:
        await asyncio.sleep(0)


def event_loop_factory():
    """uvloop's event loop where it is installed (uvicorn serves on it too), else asyncio's: the client's own
    latency is part of every TTFT and ITL it times."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def bench_serve(trace: Trace, options: BenchServeOptions, out_dir: str | Path, *, vocab_size: int, seed: int = 0,
                metadata: dict | None = None) -> Path:
    """Replay the trace against the server and write the run folder; returns its path."""
    requests, fingerprint = trace_http_requests(trace, vocab_size, seed)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    records: dict[str, RequestRecord] = {}
    progress = tqdm(total=len(requests), desc=f"bench serve {options.model}", unit="req", dynamic_ncols=True,
                    disable=not options.show_progress)

    def on_record(record: RequestRecord) -> None:
        records[record.request_id] = record
        progress.update(1)

    failure: BaseException | None = None
    clock_origin = None
    try:
        if options.num_workers > 1:
            from twinfer.serving.bench_workers import replay_in_workers  # it builds on this module

            clock_origin = replay_in_workers(requests, options, on_record)
        else:
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                clock_origin = time.perf_counter()
                runner.run(replay(requests, options, on_record, clock_origin, options.max_concurrency))
    except KeyboardInterrupt as interrupt:
        failure = interrupt
    finally:
        progress.close()
    wall_duration = time.perf_counter() - wall_start
    for request in requests:  # never sent, or still open when interrupted
        if request.request_id not in records:
            records[request.request_id] = RequestRecord(
                request_id=request.request_id, arrival_time=request.arrival_time,
                prompt_len=len(request.prompt_token_ids), max_tokens=request.max_tokens,
                status=RequestStatus.ABORTED, reason=f"{RequestStatus.ABORTED}: interrupted",
                finish_time=max(request.arrival_time, wall_duration))
    run_meta = run_metadata(
        executor_kind="http",
        model=options.model,
        trace_name=trace.name,
        trace_fingerprint=fingerprint,
        complete=failure is None,
        started_at=started_at,
        wall_duration=wall_duration,
        base_url=options.base_url,
        endpoint=options.endpoint,
        max_concurrency=options.max_concurrency,
        num_workers=options.num_workers,
        # JSON has no infinity: vLLM's result JSON writes the string "inf" too.
        request_rate="inf" if options.request_rate == float("inf") else options.request_rate,
        burstiness=options.burstiness,
        trace_source_format=trace.source_format,
        trace_notes=list(trace.notes),
        seed=seed,
        # time zero on time.perf_counter's clock: a server's request log on this machine states its own, so
        # a request's times on both sides line up (what the client saw against what the server did)
        clock_origin=clock_origin,
        **(metadata or {}),
    )
    ordered = [records[request.request_id] for request in requests]
    path = write_run(out_dir, requests_table(ordered), pa.Table.from_pylist([], schema=STEPS_SCHEMA), run_meta)
    if failure is not None:
        print(f"interrupted: the finished part is in {path} (marked incomplete)")
    return path
