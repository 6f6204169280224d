"""Arrival processes for traces without timestamps and for synthetic workloads; all seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not np.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a positive number of requests per second, got {rate!r}")


@dataclass(frozen=True)
class Poisson:
    """Exponential gaps at `rate` requests per second (vLLM's --request-rate with burstiness 1)."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def arrival_times(self, count: int, seed: int) -> np.ndarray:
        """`count` arrival times in seconds, the first at 0."""
        gaps = np.random.default_rng(seed).exponential(1.0 / self.rate, size=max(count - 1, 0))
        return _from_gaps(gaps, count)


@dataclass(frozen=True)
class Gamma:
    """Gamma gaps with mean 1/rate and coefficient of variation cv: cv > 1 burstier than Poisson, < 1 smoother.

    vLLM's --burstiness is the gamma shape, 1/cv**2."""

    rate: float
    cv: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)
        if isinstance(self.cv, bool) or not isinstance(self.cv, (int, float)) or not np.isfinite(self.cv) or self.cv <= 0:
            raise ValueError(f"cv must be a positive number, got {self.cv!r}")

    def arrival_times(self, count: int, seed: int) -> np.ndarray:
        """`count` arrival times in seconds, the first at 0."""
        shape = 1.0 / self.cv**2
        gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (self.rate * shape), size=max(count - 1, 0))
        return _from_gaps(gaps, count)


@dataclass(frozen=True)
class ConstantRate:
    """Evenly spaced arrivals at `rate` requests per second."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def arrival_times(self, count: int, seed: int) -> np.ndarray:
        """`count` arrival times in seconds, the first at 0."""
        return np.arange(count, dtype=np.float64) / self.rate


@dataclass(frozen=True)
class AllAtOnce:
    """Every request arrives at time 0 (vLLM's --request-rate inf): an offline throughput run."""

    def arrival_times(self, count: int, seed: int) -> np.ndarray:
        """`count` zeros."""
        return np.zeros(count, dtype=np.float64)


ArrivalProcess = Poisson | Gamma | ConstantRate | AllAtOnce

SPEC_FORMS = "poisson:RATE, gamma:RATE:CV, constant:RATE or all-at-once"


def parse_arrival_process(spec: str) -> ArrivalProcess:
    """The process a command-line spec names: poisson:RATE, gamma:RATE:CV, constant:RATE or all-at-once."""
    kind, *numbers = spec.strip().lower().split(":")
    try:
        values = [float(number) for number in numbers]
    except ValueError:
        raise ValueError(f"arrival process {spec!r}: numbers expected after the name; forms: {SPEC_FORMS}") from None
    shapes = {"poisson": (Poisson, 1), "gamma": (Gamma, 2), "constant": (ConstantRate, 1), "all-at-once": (AllAtOnce, 0)}
    if kind not in shapes or len(values) != shapes[kind][1]:
        raise ValueError(f"unknown arrival process {spec!r}; forms: {SPEC_FORMS}")
    return shapes[kind][0](*values)


def _from_gaps(gaps: np.ndarray, count: int) -> np.ndarray:
    times = np.zeros(count, dtype=np.float64)
    if count > 1:
        np.cumsum(gaps, out=times[1:])
    return times
