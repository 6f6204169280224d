"""The engine's step loop on a thread of its own, for an asyncio server.

The event loop never touches the engine: it hands requests and aborts to the driver thread through a
queue, and the thread applies them between steps. After every step the thread collects each completion's new
output (tokens, the text the engine's detokenizer has released, logprobs; how it ended) and hands them to the
event loop in one batch (one wake-up per step, however many requests), where they go to the queue each request
was added with. A request with n > 1 is one engine request of n completions (the engine shares their prefill);
each completion's deltas carry its index. Asynchronous scheduling is the engine's own (Engine.step).

`twinfer serve` runs the same driver on the main thread of an engine process (engine_process.py), whose batches go
down a pipe instead of to an event loop; `--no-engine-process` and tests run it on a thread of the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs
from engine.sequence import Sequence
from twinfer.serving.request_log import RequestLog

SWITCH_INTERVAL_S = 0.0005
"""How soon a thread waiting for the interpreter gets it (shorten_switch_interval)."""


def shorten_switch_interval() -> None:
    """A thread waiting for the interpreter (the event loop, a pipe's reader) gets it within SWITCH_INTERVAL_S of
    asking while another thread runs Python (the engine's steps), not the default 5 ms."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


@dataclass(slots=True)
class Delta:
    """New output of one completion of an engine request since its last delta, and how it ended when it has
    (vLLM's CompletionOutput in its DELTA form)."""

    request_id: str
    """The engine request (as added; the parent of its n completions)."""
    index: int
    """Which of the request's n completions."""
    token_ids: list[int]
    text: str = ""
    """The text the engine's detokenizer released (it holds back what may begin a stop string, and cuts the
    text at one); "" when the engine has no tokenizer."""
    logprobs: list[TokenLogprobs] | None = None
    """One entry per new token, when the request asks for logprobs."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """The prompt's, on the completion's first delta with tokens, when the request asks for them."""
    finish_reason: str | None = None
    """stop, length or abort once the completion has ended."""
    stop_reason: int | str | None = None
    """The stop token or stop string that ended it."""
    ended: "EndedRequest | None" = None
    """The ended completion's counts and times (for usage and metrics); None until it ends."""
    error: str | None = None
    """Why the engine refused or lost the request (then nothing more comes for any of its completions)."""


@dataclass(frozen=True, slots=True)
class EndedRequest:
    """What the server's metrics and usage read of an ended completion (a Sequence's counts and times, on the
    engine's clock): small and picklable, so it crosses from an engine process too."""

    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    max_tokens: int
    finish_reason: object
    """engine.sequence.FinishReason, or None when it ended otherwise."""
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    token_times: list[float]
    finish_time: float | None

    @classmethod
    def of(cls, seq: Sequence) -> "EndedRequest":
        return cls(seq.num_prompt_tokens, seq.num_cached_tokens or 0, seq.num_output_tokens,
                   seq.sampling_params.max_tokens, seq.finish_reason, seq.arrival_time, seq.first_scheduled_time,
                   seq.first_token_time, list(seq.token_times), seq.finish_time)


class EngineUnavailable(RuntimeError):
    """The driver is stopped or its engine failed: no request can be served."""


@dataclass(slots=True)
class _Active:
    """One running completion and how much of it has been handed on."""

    sequence: Sequence
    sink: asyncio.Queue
    request_id: str
    index: int
    prompt_logprobs_of: Sequence | None
    """The completion that computes the prompt's logprobs (the first), until they have been handed on."""
    num_sent: int = 0
    num_chars_sent: int = 0


class EngineDriver:
    """Runs an engine's steps on a thread while the event loop adds, streams and aborts requests."""

    def __init__(self, engine: Engine, on_finish: Callable[[EndedRequest], None] | None = None,
                 send: Callable[[list], None] | None = None) -> None:
        """on_finish is called on the event loop with each completion's EndedRequest when it ends (metrics).
        send: where the thread's batches of (sink, Delta) go instead of an event loop (an engine process's pipe)."""
        self.engine = engine
        self.on_finish = on_finish
        self._send_batch = send
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Active] = {}
        """Running completions by their sequence's request id."""
        self._num_open: dict[str, int] = {}
        """Engine requests with completions still running, and how many."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None
        """Why the engine stopped serving, when a step raised."""
        self._stopped = False
        self._lock = threading.Lock()
        """Held to queue a command and to stop taking them, so no command is queued after the last drain."""
        self.num_preemptions = 0
        """Preemptions over every step so far (read by the metrics)."""
        self._num_steps_counted = 0

    # ---- the event loop's side

    def start(self) -> None:
        """Start the thread; call from the event loop that will read the deltas."""
        self._loop = asyncio.get_running_loop()
        shorten_switch_interval()
        self._thread = threading.Thread(target=self._run, name="twinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """True while the thread serves requests (not stopped, no failed step)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped and self.error is None

    @property
    def config(self):
        """The engine's EngineConfig (max_model_len, vocab_size, ...)."""
        return self.engine.config

    @property
    def tokenizer(self):
        """The engine's tokenizer (it decodes outputs and applies stop strings), or None."""
        return self.engine.tokenizer

    def truncate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        return self.engine.truncate_prompt(prompt_token_ids, params)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink,
            prompt: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request arriving now, or at arrival_time on the engine's clock (params.n completions); its
        Deltas are put on sink (which several requests may share)."""
        if arrival_time is None:
            arrival_time = self.engine.clock.now()
        self._put(("add", request_id, sink, prompt_token_ids, params, arrival_time, prompt))

    def abort(self, request_id: str, reason: str) -> None:
        """Stop every completion of a request (each one's last delta has finish reason abort, their blocks are
        freed); a no-op once ended."""
        try:
            self._put(("abort", request_id, reason))
        except EngineUnavailable:
            pass  # every request has been ended already

    async def state(self) -> dict:
        """The engine's state for /metrics, read between two steps."""
        return await self.call(lambda engine: {**engine_state(engine), "preemptions": self.num_preemptions})

    async def write_request_log(self, log) -> tuple:
        """Write the request log (a RequestLog) as the engine stands: (path, number of requests, complete)."""
        snapshot = await self.call(RequestLog.snapshot)
        path = await asyncio.to_thread(log.write, self.engine, snapshot)
        return path, snapshot[0].num_rows, snapshot[2]

    def close(self, log=None) -> Path | None:
        """Stop (every unfinished request aborted) and write the request log when given; its path."""
        self.stop()
        if log is None:
            return None
        return log.write(self.engine, RequestLog.snapshot(self.engine))

    async def call(self, function: Callable[[Engine], object]):
        """function(engine) run on the driver thread between two steps; its result."""
        return await asyncio.wrap_future(self.run_on_thread(function))

    def run_on_thread(self, function: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Queue function(engine) to run on the driver thread between two steps (from any thread); the
        future of its result. The engine takes no step while it runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", function, future))
        return future

    def _put(self, command: tuple) -> None:
        with self._lock:
            if not self.is_running:
                raise EngineUnavailable(self.error or "the engine is not running")
            self._commands.put(command)

    def run_here(self, before: Callable[[], None] | None = None) -> None:
        """Run the step loop on the calling thread until stopped (an engine process's main thread); before() runs
        once the driver takes commands."""
        self._thread = threading.current_thread()
        if before is not None:
            before()
        self._run()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to abort every unfinished request and end, without waiting for it."""
        self._commands.put(("stop", reason))

    def stop(self, reason: str = "server shutdown") -> None:
        """Abort every unfinished request, end the thread and wait for it (blocking)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(("stop", reason))
        self._thread.join()

    def _deliver(self, batch: list[tuple[asyncio.Queue, Delta]]) -> None:
        deliver(batch, self.on_finish)

    # ---- the driver thread

    def _run(self) -> None:
        engine = self.engine
        commands = self._commands
        try:
            while True:
                if not engine.has_unfinished() and not self._apply(commands.get()):
                    break
                if not commands.empty() and not self._drain(commands):
                    break
                if engine.has_unfinished():
                    engine.step()
                    self._publish()
        except Exception as error:  # a failed step: every request in the engine is lost
            self.error = f"the engine failed: {type(error).__name__}: {error}"
            traceback.print_exc()
        with self._lock:
            self._stopped = True
        self._fail_all(self.error or "the server is shutting down")

    def _drain(self, commands: queue.SimpleQueue) -> bool:
        while not commands.empty():
            if not self._apply(commands.get_nowait()):
                return False
        return True

    def _apply(self, command: tuple) -> bool:
        """Apply one command; False when it stops the thread."""
        kind = command[0]
        engine = self.engine
        if kind == "add":
            _, request_id, sink, prompt_token_ids, params, arrival_time, prompt = command
            try:
                engine.add_request(prompt_token_ids=prompt_token_ids, sampling_params=params,
                                   arrival_time=arrival_time, request_id=request_id, prompt=prompt)
            except (ValueError, TypeError) as error:  # this request's fault: the engine goes on
                self._send([(sink, Delta(request_id, 0, [], error=str(error)))])
                return True
            completions = engine.parents.get(request_id)
            if completions is None:
                added = engine.requests[request_id]
                if not isinstance(added, Sequence):  # rejected (it can never fit the KV cache): answered at once
                    self._send([(sink, Delta(request_id, 0, [], error=added.reason))])
                    return True
                completions = [added]
            # The first completion computes the prompt, and its prompt logprobs, for all of them.
            first = completions[0] if params.prompt_logprobs is not None else None
            for index, seq in enumerate(completions):
                self._active[seq.request_id] = _Active(seq, sink, request_id, index, first)
            self._num_open[request_id] = len(completions)
        elif kind == "abort":
            _, request_id, reason = command
            if request_id in self._num_open:
                engine.abort(request_id, reason)
                self._publish()
        elif kind == "call":
            _, function, future = command
            try:
                future.set_result(function(engine))
            except Exception as error:
                future.set_exception(error)
        elif kind == "stop":
            engine.abort_all(command[1])
            self._publish()
            return False
        return True

    def _publish(self) -> None:
        """Hand every completion's new output, and the ends of finished ones, to the event loop: first tokens
        first, in a batch of their own sent before the running streams' deltas are even made (their text
        detokenized, the batch pickled for an engine process), so that a new request's first token, its TTFT,
        waits behind nothing of the streams already running."""
        ended: list[str] = []
        firsts: list[tuple] = []
        running = []
        for sequence_id, active in self._active.items():
            if active.num_sent:
                running.append((sequence_id, active))
            else:
                _take_delta(sequence_id, active, firsts, ended)
        if firsts:
            self._send(firsts)
        batch: list[tuple] = []
        for sequence_id, active in running:
            _take_delta(sequence_id, active, batch, ended)
        for sequence_id in ended:
            request_id = self._active.pop(sequence_id).request_id
            self._num_open[request_id] -= 1
            if not self._num_open[request_id]:
                del self._num_open[request_id]
        steps = self.engine.step_records
        for index in range(self._num_steps_counted, len(steps)):
            self.num_preemptions += steps[index].num_preempted
        self._num_steps_counted = len(steps)
        if batch:
            self._send(batch)

    def _send(self, batch: list) -> None:
        if self._send_batch is not None:
            self._send_batch(batch)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:
            pass  # the event loop is closed: nobody is reading any more

    def _fail_all(self, reason: str) -> None:
        """Answer every request still open and every command still queued: nothing more will be served."""
        batch = [(active.sink, Delta(active.request_id, active.index, [], error=reason))
                 for active in self._active.values()]
        self._active.clear()
        self._num_open.clear()
        while not self._commands.empty():
            command = self._commands.get_nowait()
            if command[0] == "add":
                batch.append((command[2], Delta(command[1], 0, [], error=reason)))
            elif command[0] == "call":
                command[2].set_exception(EngineUnavailable(reason))
        if batch:
            self._send(batch)



def _take_delta(sequence_id: str, active: _Active, batch: list, ended: list[str]) -> None:
    """Add the completion's delta, if it has one, to batch; its sequence id to ended when it has ended."""
    delta = _delta(active)
    if delta is not None:
        batch.append((active.sink, delta))
        if delta.finish_reason is not None:
            ended.append(sequence_id)


def _delta(active: _Active) -> Delta | None:
    """The completion's output since its last delta (None when there is none): tokens, the text its detokenizer
    released, logprobs; how it ended once it has."""
    seq = active.sequence
    num_outputs = seq.num_output_tokens
    finished = seq.finish_time is not None
    if num_outputs <= active.num_sent and not finished:
        return None
    start = seq.num_prompt_tokens + active.num_sent
    delta = Delta(active.request_id, active.index, seq.token_ids[start:seq.num_prompt_tokens + num_outputs].tolist())
    if seq.logprobs is not None:
        delta.logprobs = seq.logprobs[active.num_sent:num_outputs]
    active.num_sent = num_outputs
    if seq.detokenizer is not None:
        text = seq.detokenizer.text(finished)
        delta.text = text[active.num_chars_sent:]
        active.num_chars_sent = len(text)
    first = active.prompt_logprobs_of
    if first is not None and (delta.token_ids or finished) and first.prompt_logprobs is not None:
        delta.prompt_logprobs = list(first.prompt_logprobs)
        active.prompt_logprobs_of = None
    if finished:
        delta.finish_reason = str(seq.finish_reason)
        delta.stop_reason = seq.stop_reason
        delta.ended = EndedRequest.of(seq)
    return delta


def deliver(batch: list[tuple[asyncio.Queue, Delta]], on_finish: Callable[[EndedRequest], None] | None) -> None:
    """On the event loop: each delta onto its request's queue, and each ended completion to on_finish."""
    for sink, delta in batch:
        sink.put_nowait(delta)
        if on_finish is not None and delta.ended is not None:
            on_finish(delta.ended)


def engine_state(engine: Engine) -> dict:
    """What /metrics reports of the engine (read between two steps): requests running and waiting, KV-cache
    usage, prefix-cache queries and hits in tokens (the driver counts preemptions)."""
    block_manager = engine.block_manager
    return {"running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting) + engine.num_pending,
            "kv_cache_usage": block_manager.usage,
            "prefix_cache_queries": block_manager.num_query_tokens,
            "prefix_cache_hits": block_manager.num_hit_tokens}
