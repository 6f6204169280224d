"""One trace request sent to an OpenAI-compatible /v1/completions endpoint and timed token by token.

The prompt goes as token ids (the API's other prompt form), so its length and its prefix blocks are exactly
the trace's, as in an in-process replay; the completion is greedy with EOS ignored and max_tokens the trace's
output length. Streamed with usage and vLLM's return_token_ids, so each chunk's tokens are counted (a server
without it is taken to send one token per chunk with text, as vLLM's benchmark assumes).
"""

import json
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field

import aiohttp

from engine.sequence import RequestStatus
from engine.stats import RequestRecord


@dataclass
class HttpRequest:
    """A request to send: its id, when it arrives (seconds from the run's start), prompt and output length."""

    request_id: str
    arrival_time: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class _Progress:
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0


def request_body(request: HttpRequest, model: str) -> dict:
    """The JSON body of a trace request."""
    return {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict, request: HttpRequest, model: str,
                       start: float) -> RequestRecord:
    """Send one request, stream its answer and return its record (times in seconds from start, perf_counter)."""
    record = RequestRecord(request_id=request.request_id, arrival_time=request.arrival_time,
                           prompt_len=len(request.prompt_token_ids), max_tokens=request.max_tokens)
    progress = _Progress()
    # Encoded before the clock starts (0.1-0.2 ms for a 1,000-token prompt): the request's TTFT is the server's.
    payload = json.dumps(request_body(request, model)).encode()
    headers = {**headers, "Content-Type": "application/json"}
    record.first_scheduled_time = time.perf_counter() - start  # sent (after any client-side concurrency wait)
    try:
        async with session.post(url, data=payload, headers=headers) as response:
            if response.status != 200:
                record.status = RequestStatus.REJECTED if 400 <= response.status < 500 else RequestStatus.ABORTED
                record.reason = f"HTTP {response.status}: {_error_message(await response.text())}"
                record.finish_time = time.perf_counter() - start
                return record
            await read_stream(response.content.iter_any(), start, progress)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        record.status = RequestStatus.ABORTED
        record.reason = f"{RequestStatus.ABORTED}: {type(error).__name__}: {error}"
    record.finish_time = time.perf_counter() - start
    record.first_token_time = progress.first_token_time
    record.token_times = progress.token_times
    record.output_len = (progress.completion_tokens if progress.completion_tokens is not None
                         else len(progress.token_times))
    record.cached_tokens = progress.cached_tokens
    if record.status == RequestStatus.WAITING:  # not failed above
        if progress.finish_reason is None:
            record.status = RequestStatus.ABORTED
            record.reason = f"{RequestStatus.ABORTED}: the stream ended without a finish reason"
        else:
            record.status = RequestStatus.FINISHED
            record.reason = progress.finish_reason
    return record


async def read_stream(received: AsyncIterable[bytes], start: float, progress: _Progress) -> None:
    """Read a stream of server-sent events (the body's bytes as they come) up to [DONE] or its end, each chunk's
    tokens timed when the bytes holding it arrived. Split into events here, not read line by line through
    aiohttp's reader (two passes through its buffer code per chunk, on the loop that times every stream), and the
    chunks one read brings came together, so they are timed together."""
    pending = b""
    async for data in received:
        now = time.perf_counter() - start
        pending += data
        held = b""
        if b"\r" in pending:  # SSE allows CRLF and CR line ends (sse-starlette sends CRLF)
            if pending.endswith(b"\r"):  # maybe the first half of a CRLF: kept for the next read
                pending, held = pending[:-1], b"\r"
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = pending.split(b"\n\n")
        pending = events.pop() + held
        for event in events:
            if _take_event(event, now, progress):
                return
    if pending.strip():
        _take_event(pending, time.perf_counter() - start, progress)


def _take_event(event: bytes, now: float, progress: _Progress) -> bool:
    """One event's data lines; True at [DONE]."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue  # comments, event names, ids
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        _take_chunk(json.loads(data), now, progress)
    return False


def _take_chunk(chunk: dict, now: float, progress: _Progress) -> None:
    if "error" in chunk:
        raise ValueError(f"the server sent an error mid-stream: {chunk['error'].get('message')}")
    for choice in chunk.get("choices") or ():
        token_ids = choice.get("token_ids")
        count = len(token_ids) if token_ids is not None else (1 if choice.get("text") else 0)
        if count:
            if progress.first_token_time is None:
                progress.first_token_time = now
            progress.token_times.extend([now] * count)
        if choice.get("finish_reason"):
            progress.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        progress.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        progress.cached_tokens = details.get("cached_tokens") or 0


def _error_message(text: str) -> str:
    """The message of an OpenAI error body, else the text itself (cut short)."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
