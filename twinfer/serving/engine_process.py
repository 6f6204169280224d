"""The engine in a process of its own, behind EngineDriver's surface, so the server's event loop never waits for
the interpreter lock that the engine's Python holds (vLLM runs its engine core in a process apart for this reason).

With the engine on a thread of the server's process, every wake-up of the event loop (a request arriving, a step's
tokens to send) waited up to a switch interval for the lock while the engine's thread scheduled and launched
steps: on an H200 with Qwen3-0.6B that was 1.5-2.2 ms each way, most of the HTTP path's TTFT overhead.

The child builds the engine from EngineArgs and runs an EngineDriver on its main thread; a reader thread turns the
parent's commands into the driver's. The driver's batches of deltas (one per step) go back through a pipe, keyed by
request id, that the event loop here watches itself: a batch wakes the loop directly, not a reader thread that
then has to take the interpreter lock and wake the loop in turn (on this CPU that second hand-over was ~0.15-0.2 ms
of the ~0.45-0.6 ms from the engine's first token to the loop, benchmarks/serve_way_out.py). Arrivals cross on
time.perf_counter's clock (system-wide on Linux): stamped here, moved onto the engine's clock there. Ctrl-C belongs
to the parent: the child ignores SIGINT, and stops when told, on SIGTERM, or when the parent's end of the pipe closes;
it writes the request log itself (the engine's records never cross).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from engine.engine import Engine
from engine.engine_args import EngineArgs
from engine.sampling_params import SamplingParams
from twinfer.serving.engine_driver import (
    Delta,
    EngineDriver,
    EngineUnavailable,
    deliver,
    engine_state,
    shorten_switch_interval,
)

STOP_TIMEOUT_S = 120.0
"""How long closing waits for the child to abort its requests, write its log and exit before killing it."""


@dataclass(frozen=True)
class RequestLogSpec:
    """Where the engine process writes the request log, and what its metadata adds to the engine's own."""

    out_dir: str
    executor_kind: str
    metadata: dict


@dataclass(frozen=True)
class _Ready:
    config: object
    num_blocks: int
    clock_origin: float


class EngineProcess:
    """An engine stepping in a child process; add, abort, state and the request log as EngineDriver has them."""

    def __init__(self, engine_args: EngineArgs, *, tokenizer: str | None = None,
                 request_log: RequestLogSpec | None = None, start_timeout: float | None = None) -> None:
        """Start the child and wait until its engine is built (errors there are raised here, by message).
        tokenizer: a model folder or Hub id whose tokenizer both processes load (None: the engine has none)."""
        from engine.tokenizer import load_tokenizer

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        commands_in, self._commands = context.Pipe(duplex=False)
        self._outputs, outputs_out = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, name="twinfer-engine",
                                        args=(engine_args, tokenizer, request_log, commands_in, outputs_out))
        self._process.start()
        commands_in.close()
        outputs_out.close()
        self.keeps_request_log = request_log is not None
        self.on_finish = None
        self.error: str | None = None
        self._send_lock = threading.Lock()
        self._sinks: dict[str, asyncio.Queue] = {}
        self._num_open: dict[str, int] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched = False
        """True while the event loop watches the outputs pipe."""
        self._stopped = threading.Event()
        self._log_path: Path | None = None
        try:
            if not self._outputs.poll(start_timeout):
                raise RuntimeError(f"the engine process did not start within {start_timeout} s")
            message = self._outputs.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited ({self._process.exitcode}) before its engine was built")
        except BaseException:  # Ctrl-C while the model loads, or the timeout: no child left behind
            self._kill()
            raise
        if message[0] == "failed":
            self._process.join()
            raise RuntimeError(f"the engine process failed to start: {message[1]}")
        ready: _Ready = message[1]
        self.config = ready.config
        self.num_blocks = ready.num_blocks
        self.clock_origin = ready.clock_origin
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None

    # ---- EngineDriver's surface, on the event loop

    def start(self) -> None:
        """Start handing the child's deltas to the running event loop (which reads them off the pipe)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._outputs.fileno(), self._on_readable)
        self._watched = True

    @property
    def is_running(self) -> bool:
        return self._process.is_alive() and not self._stopped.is_set() and self.error is None

    def truncate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        # Engine.truncate_prompt reads only .config, which this has too: one rule for both kinds of server.
        return Engine.truncate_prompt(self, prompt_token_ids, params)

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink,
            prompt: str | None = None) -> None:
        """Send a request arriving now (params.n completions); its Deltas are put on sink."""
        if not self.is_running:
            raise EngineUnavailable(self.error or "the engine is not running")
        self._sinks[request_id] = sink
        self._num_open[request_id] = params.n
        self._send(("add", request_id, prompt_token_ids, params, time.perf_counter(), prompt))

    def abort(self, request_id: str, reason: str) -> None:
        """Stop every completion of a request (its blocks are freed there); a no-op once ended."""
        if request_id in self._sinks and self.is_running:
            try:
                self._send(("abort", request_id, reason))
            except EngineUnavailable:
                pass

    async def state(self) -> dict:
        """The engine's state for /metrics (engine_driver.engine_state's keys), read between two steps."""
        return await self._ask("state")

    async def write_request_log(self, log=None) -> tuple:
        """Have the child write its request log as the engine stands: (path, number of requests, complete)."""
        if not self.keeps_request_log:
            raise ValueError("this engine process keeps no request log")
        path, num_requests, complete = await self._ask("log")
        return Path(path), num_requests, complete

    def close(self, log=None) -> Path | None:
        """Stop the child (every unfinished request aborted, its request log written) and wait for it; the log's
        path. Blocking: call it off the event loop."""
        if self._process.is_alive() and not self._stopped.is_set():
            try:
                self._send(("stop", "server shutdown"))
            except EngineUnavailable:
                pass
        if self._watched and self._loop.is_running():  # the loop reads up to the child's last word
            self._stopped.wait(STOP_TIMEOUT_S)
        else:  # never started, or the loop has ended: read up to the child's last word here
            self._unwatch()
            while not self._stopped.is_set() and self._take(self._outputs_message(), self._call_soon):
                pass
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._kill()
        return self._log_path


    # ---- the pipes

    def _send(self, command: tuple) -> None:
        with self._send_lock:
            try:
                self._commands.send(command)
            except (BrokenPipeError, OSError) as error:
                raise EngineUnavailable(self.error or f"the engine process is gone ({error})") from None

    async def _ask(self, what: str):
        if not self.is_running:
            raise EngineUnavailable(self.error or "the engine is not running")
        token = next(self._tokens)
        future = self._loop.create_future()
        self._replies[token] = future
        self._send((what, token))
        return await future

    def _on_readable(self) -> None:
        """On the event loop, when the child has written: take every message the pipe holds. Each is written whole
        at once, so a message begun is read to its end without waiting on the child."""
        try:
            while self._watched and self._outputs.poll(0):
                if not self._take(self._outputs_message(), _call_now):
                    return
        except OSError:  # the pipe is closed: close() has ended this process's side
            self._unwatch()

    def _outputs_message(self) -> tuple:
        """The child's next message; ("gone",) once its end of the pipe has closed."""
        try:
            return self._outputs.recv()
        except (EOFError, OSError):
            return ("gone",)

    def _take(self, message: tuple, dispatch) -> bool:
        """Act on one message of the child's (dispatch(callback, *args) runs it on the event loop); False once the
        child has said it stopped or has gone."""
        kind = message[0]
        if kind == "deltas":
            dispatch(self._deliver, message[1])
        elif kind == "reply":
            dispatch(self._answer, message[1], message[2], message[3])
        elif kind == "unavailable":  # asked while the child's engine stops: no answer will come
            dispatch(self._answer, message[1], None, message[2])
        elif kind == "stopped":
            _, path, error = message
            self._log_path = Path(path) if path is not None else None
            if error is not None:
                self.error = error
            self._unwatch()
            self._stopped.set()
            dispatch(self._fail_all, error or "the server is shutting down")
            return False
        elif kind == "gone":
            self._unwatch()
            if self._stopped.is_set():
                pass
            elif dispatch is _call_now:  # on the event loop: the child's exit is waited for off it
                threading.Thread(target=self._lost, name="twinfer-engine-exit", daemon=True).start()
            else:
                self._lost()
            return False
        return True

    def _lost(self) -> None:
        """The child closed its pipe without saying it stopped: fail everything, with its exit code."""
        self._process.join(5)
        self.error = f"the engine process exited unexpectedly (exit code {self._process.exitcode})"
        self._stopped.set()
        self._call_soon(self._fail_all, self.error)

    def _unwatch(self) -> None:
        if self._watched:
            self._watched = False
            try:
                self._loop.remove_reader(self._outputs.fileno())
            except (RuntimeError, OSError, ValueError):
                pass  # the loop is closed, or the pipe is: nothing is watched any more

    def _call_soon(self, callback, *args) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is reading any more

    def _deliver(self, batch: list[tuple[str, Delta]]) -> None:
        routed = []
        for request_id, delta in batch:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue
            routed.append((sink, delta))
            if delta.error is not None:
                self._forget(request_id)
            elif delta.finish_reason is not None:
                self._num_open[request_id] -= 1
                if not self._num_open[request_id]:
                    self._forget(request_id)
        deliver(routed, self.on_finish)

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._num_open.pop(request_id, None)

    def _answer(self, token: int, ok: bool, value) -> None:
        future = self._replies.pop(token, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(RuntimeError(value) if ok is False else EngineUnavailable(value))

    def _fail_all(self, reason: str) -> None:
        """Answer every open request and question: nothing more comes from the engine."""
        batch = [(sink, Delta(request_id, 0, [], error=reason)) for request_id, sink in self._sinks.items()]
        self._sinks.clear()
        self._num_open.clear()
        deliver(batch, None)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        self._replies.clear()

    def _kill(self) -> None:
        self._process.kill()
        self._process.join()


def _call_now(callback, *args) -> None:
    callback(*args)


def _child_main(engine_args: EngineArgs, tokenizer: str | None, log_spec: RequestLogSpec | None,
                commands, outputs) -> None:
    """The engine process: build the engine, say so, then step it until told to stop (or orphaned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C: it tells this process to stop
    shorten_switch_interval()  # the command reader waits for the interpreter while the engine steps
    try:
        from engine.tokenizer import load_tokenizer
        from twinfer.cli.replay import real_engine_and_metadata
        from twinfer.serving.request_log import RequestLog

        engine, metadata = real_engine_and_metadata(engine_args)
        engine.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        log = (RequestLog(log_spec.out_dir, log_spec.executor_kind, {**metadata, **log_spec.metadata})
               if log_spec is not None else None)
        engine.clock.restart()  # the log's times count from the server's start
    except BaseException as error:  # noqa: BLE001 (reported to the parent, which raises it)
        traceback.print_exc()
        outputs.send(("failed", f"{type(error).__name__}: {error}"))
        return
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            try:
                outputs.send(message)
            except (BrokenPipeError, OSError):
                pass  # the parent is gone; the reader sees the commands pipe close and stops the engine

    driver = EngineDriver(engine, send=lambda batch: send(("deltas", batch)))
    # A SIGTERM sent to the whole process group (systemd's default stop, `kill -- -PGID`) reaches this process
    # too: it stops as when the parent says so, its requests aborted and its request log written, instead of dying.
    signal.signal(signal.SIGTERM, lambda signum, frame: driver.request_stop("server shutdown"))
    outputs.send(("ready", _Ready(engine.config, engine.block_manager.num_blocks, engine.clock.origin)))

    def answer(token: int, done) -> None:
        error = done.exception()
        if error is None:
            send(("reply", token, True, done.result()))
        elif isinstance(error, EngineUnavailable):  # queued as the driver stopped
            send(("unavailable", token, str(error)))
        else:
            send(("reply", token, False, f"{type(error).__name__}: {error}"))

    def reply(token: int, function) -> None:
        driver.run_on_thread(function).add_done_callback(lambda done: answer(token, done))

    log_lock = threading.Lock()
    """Held while a log is written: one on demand and the last one never overlap."""

    def write_log(token: int) -> None:
        """The tables taken between two steps; written on a thread of their own while the engine steps on (a
        Parquet write on the engine's thread would pause every stream)."""
        def written(done) -> None:
            if done.exception() is not None:
                answer(token, done)
                return

            def write() -> None:
                requests, steps, complete = snapshot = done.result()
                try:
                    with log_lock:
                        path = log.write(engine, snapshot)
                    send(("reply", token, True, (str(path), requests.num_rows, complete)))
                except Exception as error:  # noqa: BLE001 (the asker gets it)
                    send(("reply", token, False, f"{type(error).__name__}: {error}"))

            threading.Thread(target=write, name="twinfer-request-log", daemon=True).start()

        driver.run_on_thread(RequestLog.snapshot).add_done_callback(written)

    def read_commands() -> None:
        origin = engine.clock.origin
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):
                command = ("stop", "the server process is gone")
            kind = command[0]
            try:
                if kind == "add":
                    _, request_id, token_ids, params, sent_at, prompt = command
                    driver.add(request_id, token_ids, params, request_id, prompt, arrival_time=sent_at - origin)
                elif kind == "abort":
                    driver.abort(command[1], command[2])
                elif kind == "state":
                    reply(command[1], lambda current: {**engine_state(current),
                                                       "preemptions": driver.num_preemptions})
                elif kind == "log":
                    if log is None:
                        send(("reply", command[1], False, "this engine process keeps no request log"))
                    else:
                        write_log(command[1])
                elif kind == "stop":
                    driver.request_stop(command[1])
                    return
            except EngineUnavailable as error:  # the driver has stopped (told to, or its engine failed)
                if kind == "add":
                    send(("deltas", [(command[1], Delta(command[1], 0, [], error=str(error)))]))
                elif kind in ("state", "log"):  # answered now, not when the child's last log is written
                    send(("unavailable", command[1], str(error)))

    driver.run_here(before=lambda: threading.Thread(target=read_commands, name="twinfer-engine-commands",
                                                    daemon=True).start())
    path = None
    if log is not None:
        try:
            with log_lock:
                path = str(log.write(engine, RequestLog.snapshot(engine)))
        except Exception as error:  # noqa: BLE001 (the parent reports it)
            driver.error = driver.error or f"the request log could not be written: {error}"
    send(("stopped", path, driver.error))
