"""The engine's step loop on a thread of its own, for an asyncio server.

The event loop never touches the engine: it hands requests and aborts to the driver thread through a
queue, and the thread applies them between steps. After every step the thread collects each completion's new
output (tokens, the text the engine's detokenizer has released, logprobs; how it ended) and hands them to the
event loop in one batch (one wake-up per step, however many requests), where they go to the queue each request
was added with. A request with n > 1 is one engine request of n completions (the engine shares their prefill);
each completion's deltas carry its index. Asynchronous scheduling is the engine's own (Engine.step).
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

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs
from engine.sequence import Sequence

# The thread waiting for a GPU step gets the interpreter back within this long of the step's end, not the
# default 5 ms, while the event loop's thread is busy writing responses.
SWITCH_INTERVAL_S = 0.0005


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
    sequence: Sequence | None = None
    """The ended completion's sequence (its times, for metrics); None until it ends."""
    error: str | None = None
    """Why the engine refused or lost the request (then nothing more comes for any of its completions)."""


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

    def __init__(self, engine: Engine, on_finish: Callable[[Sequence], None] | None = None) -> None:
        """on_finish is called on the event loop with each request's sequence when it ends (metrics)."""
        self.engine = engine
        self.on_finish = on_finish
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
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="twinfer-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """True while the thread serves requests (not stopped, no failed step)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped and self.error is None

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: asyncio.Queue,
            prompt: str | None = None) -> None:
        """Queue a request arriving now (params.n completions); its Deltas are put on sink (which several
        requests may share)."""
        self._put(("add", request_id, sink, prompt_token_ids, params, self.engine.clock.now(), prompt))

    def abort(self, request_id: str, reason: str) -> None:
        """Stop every completion of a request (each one's last delta has finish reason abort, their blocks are
        freed); a no-op once ended."""
        try:
            self._put(("abort", request_id, reason))
        except EngineUnavailable:
            pass  # every request has been ended already

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

    def stop(self, reason: str = "server shutdown") -> None:
        """Abort every unfinished request, end the thread and wait for it (blocking)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(("stop", reason))
        self._thread.join()

    def _deliver(self, batch: list[tuple[asyncio.Queue, Delta]]) -> None:
        on_finish = self.on_finish
        for sink, delta in batch:
            sink.put_nowait(delta)
            if on_finish is not None and delta.sequence is not None:
                on_finish(delta.sequence)

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
        """Hand every completion's new output, and the ends of finished ones, to the event loop."""
        batch = []
        ended = []
        for sequence_id, active in self._active.items():
            delta = _delta(active)
            if delta is not None:
                batch.append((active.sink, delta))
                if delta.finish_reason is not None:
                    ended.append(sequence_id)
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
        delta.sequence = seq
    return delta
