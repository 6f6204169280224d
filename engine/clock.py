"""Time for the engine loop: the wall clock for real executors, a jumping virtual clock for the simulator."""

import time


class WallClock:
    """Seconds since the clock was made; advancing waits for nothing, since real work took the time."""

    def __init__(self) -> None:
        self._origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._origin

    @property
    def origin(self) -> float:
        """Time zero on time.perf_counter's clock (system-wide on Linux: another process's times line up)."""
        return self._origin

    def restart(self) -> None:
        """Make this moment time zero (call just before the first request may arrive)."""
        self._origin = time.perf_counter()

    def advance(self, duration: float) -> float:
        """The real step already took its time: just read the clock."""
        return self.now()

    def sleep_until(self, when: float) -> None:
        delay = when - self.now()
        if delay > 0:
            time.sleep(delay)


class VirtualClock:
    """A clock that moves only when told: by a predicted step duration, or to the next arrival."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, duration: float) -> float:
        self._now += duration
        return self._now

    def sleep_until(self, when: float) -> None:
        if when > self._now:
            self._now = when


Clock = WallClock | VirtualClock
