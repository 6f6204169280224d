"""A stand-in for the time module, so code that reads the wall clock runs the same on any machine.

Its clock moves only when told: by sleep(), or by advance() (an executor's step "taking" its time). Put it
in place of a module's `time` with monkeypatch.setattr(module, "time", fake_time).
"""

import time


class FakeTime:
    """perf_counter(), monotonic() and sleep() on a clock that only sleep() and advance() move."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def perf_counter(self) -> float:
        return self.now

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)  # the rest of the module (strftime, ...) as it is


def timed(executor_class, fake_time: FakeTime, step_seconds: float):
    """A subclass of executor_class whose every step takes step_seconds on fake_time, whatever it really took."""

    class TimedExecutor(executor_class):
        def execute(self, scheduler_output):
            result = super().execute(scheduler_output)
            fake_time.advance(step_seconds)
            return result

    return TimedExecutor
