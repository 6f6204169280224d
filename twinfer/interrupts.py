"""SIGTERM handled as SIGINT, and both held back while a run is written, so that an interrupted run keeps its
finished part and says how it was stopped (exit status 128 + the signal's number, as a shell reports it)."""

import signal
import threading
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C is SIGINT; `kill` and most job schedulers send SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        """SIGINT or SIGTERM."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process killed by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def signal_of(interrupt: KeyboardInterrupt) -> int:
    """The signal behind an interrupt (a plain KeyboardInterrupt is SIGINT's)."""
    return interrupt.signum if isinstance(interrupt, Interrupted) else int(signal.SIGINT)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_as_interrupts():
    """Within the block, SIGINT and SIGTERM raise Interrupted (SIGTERM would otherwise kill the process with
    nothing written). Only the main thread can own signal handlers; elsewhere nothing changes."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class DeferredSignals:
    """What arrived while signals were held back (signals_deferred)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def interrupt(self) -> Interrupted | None:
        """The first signal held back, as the Interrupted it would have raised; None if none came."""
        return None if self.signum is None else Interrupted(self.signum)


@contextmanager
def signals_deferred(message: str = ""):
    """Within the block, SIGINT and SIGTERM are noted (the message printed once) instead of stopping the work:
    a run's tables are built and written whole. The caller reads the DeferredSignals yielded afterwards."""
    deferred = DeferredSignals()
    if not _in_main_thread():
        yield deferred
        return

    def note(signum, frame):
        if deferred.signum is None:
            deferred.signum = signum
            if message:
                print(message, flush=True)

    previous = {signum: signal.signal(signum, note) for signum in HANDLED}
    try:
        yield deferred
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
