"""Latency objectives: parsing --slo (vLLM's --goodput form METRIC:MS, at one percentile), judging a simulation against them, stopping it once one is broken."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from simulator.trace_requests import TraceRequests

SLO_METRICS = ("ttft", "tpot", "e2el", "itl")


@dataclass(frozen=True)
class Slo:
    """One latency objective: the `percentile` of `metric` must be at most `limit_ms` milliseconds."""

    metric: str
    percentile: float
    limit_ms: float

    def __post_init__(self) -> None:
        if self.metric not in SLO_METRICS:
            raise ValueError(f"SLO metric {self.metric!r} unknown: expected one of {', '.join(SLO_METRICS)}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"SLO {self.metric}: percentile must be in (0, 100], got {self.percentile}")
        if not (math.isfinite(self.limit_ms) and self.limit_ms > 0):
            raise ValueError(f"SLO {self.name}: limit must be a positive number of ms, got {self.limit_ms}")

    @property
    def name(self) -> str:
        """As written on the command line: ttft_p99, tpot_p99.9, ..."""
        return f"{self.metric}_p{self.percentile:g}"


DEFAULT_SLO_PERCENTILE = 99.0


def parse_slos(items, percentile: float = DEFAULT_SLO_PERCENTILE) -> tuple[Slo, ...]:
    """vLLM's --goodput form, METRIC:MS items (e.g. ["ttft:2000", "tpot:100"] or "ttft:2000 tpot:100"), each an
    objective on that percentile of the metric; a clear error names the bad item, and the old form's new spelling."""
    if isinstance(items, str):
        items = [items]
    parts = [part for item in items for part in str(item).replace(",", " ").split()]
    slos = []
    for item in parts:
        name, sep, value = item.partition(":")
        if "=" in item and not sep:
            metric, _, old_percentile = name.partition("=")[0].partition("_p")
            new = f"{metric}:{item.partition('=')[2]}"
            at = f" --slo-percentile {old_percentile}" if old_percentile else ""
            raise ValueError(f"--slo {item!r} is the old form; write vLLM's METRIC:MS, e.g. --slo {new}{at}")
        try:
            if not sep:
                raise ValueError
            slo = Slo(name.strip().lower(), float(percentile), float(value))
        except ValueError as error:
            detail = f": {error}" if str(error) else ""
            raise ValueError(
                f"--slo item {item!r} is not METRIC:MS (e.g. --slo ttft:2000 tpot:100; metrics "
                f"{', '.join(SLO_METRICS)}){detail}"
            ) from None
        slos.append(slo)
    if not slos:
        raise ValueError("--slo names no objective; e.g. --slo ttft:2000 tpot:100")
    if len({slo.name for slo in slos}) != len(slos):
        raise ValueError(f"--slo names an objective twice: {' '.join(parts)!r}")
    return tuple(slos)


class SloMonitor:
    """Stops a simulation as soon as an SLO is certainly broken, or a request is rejected.

    A percentile p of n samples (numpy's linear interpolation) exceeds a limit as soon as at least
    n - floor(p/100 * (n - 1)) samples do. TTFT and E2EL have lower bounds before they are known (time
    since arrival), so a queue that has grown too long is caught while it grows; TPOT counts once known.
    """

    def __init__(self, slos: Sequence[Slo], requests: TraceRequests) -> None:
        self.slos = [slo for slo in slos if slo.metric in ("ttft", "tpot", "e2el")]
        num_requests = len(requests)
        num_tpot = int(np.count_nonzero(requests.output_lens > 1))
        self._threshold = []
        for slo in self.slos:
            n = num_tpot if slo.metric == "tpot" else num_requests
            self._threshold.append(n - math.floor(slo.percentile / 100 * (n - 1)) if n else math.inf)
        self._limits = [slo.limit_ms / 1000 for slo in self.slos]
        self.fewest_violators = min(self._threshold, default=math.inf)
        """Requests over a limit that break an SLO (the smallest such count over the SLOs watched)."""
        self._settled = [0] * len(self.slos)
        self._open: list = []
        self._seen: list[int] = []

    def __call__(self, now: float, replicas: Sequence) -> str | None:
        """A reason to stop, or None."""
        if len(self._seen) < len(replicas):
            self._seen.extend([0] * (len(replicas) - len(self._seen)))
        for index, engine in enumerate(replicas):
            if engine.num_rejected:
                record = next(r for r in engine.request_records.values() if r.status == "rejected")
                return f"{engine.num_rejected} request(s) rejected ({record.reason})"
            count = len(engine.sequences)
            if count > self._seen[index]:
                # The newest, read from the end: a copy of every sequence served so far, each call, cost a
                # whole-trace check a second.
                added = list(islice(reversed(engine.sequences.values()), count - self._seen[index]))
                added.reverse()
                self._open.extend(added)
                self._seen[index] = count
        pending = [0] * len(self.slos)
        still_open = []
        for seq in self._open:
            finished = seq.finish_time is not None
            first = seq.first_token_time
            for k, slo in enumerate(self.slos):
                value = _latency(slo.metric, seq, now, finished, first)
                if value is not None and value > self._limits[k]:
                    if finished:
                        self._settled[k] += 1
                    else:
                        pending[k] += 1
            if not finished:
                still_open.append(seq)
        self._open = still_open
        for k, slo in enumerate(self.slos):
            violators = self._settled[k] + pending[k]
            if violators >= self._threshold[k]:
                return f"{slo.name} > {slo.limit_ms:g} ms ({violators} requests over it)"
        return None


def _latency(metric: str, seq, now: float, finished: bool, first: float | None) -> float | None:
    """The request's latency, a lower bound of it while unknown, or None when nothing is known yet."""
    if metric == "ttft":
        return (first if first is not None else max(now, seq.arrival_time)) - seq.arrival_time
    if metric == "e2el":
        return (seq.finish_time if finished else max(now, seq.arrival_time)) - seq.arrival_time
    if finished and first is not None:  # tpot
        outputs = len(seq.token_ids) - seq.num_prompt_tokens
        return (seq.finish_time - first) / (outputs - 1) if outputs > 1 else None
    return None


def slo_values(slos: Sequence[Slo], replicas: Sequence, now: float) -> dict[str, float]:
    """Each SLO's percentile in ms over the requests (vLLM's definitions, as analysis.metrics), plus the
    p99 of TTFT, TPOT and E2EL for the curves. Unfinished requests count TTFT/E2EL lower bounds."""
    ttft, tpot, e2el, gaps = [], [], [], []
    want_itl = any(slo.metric == "itl" for slo in slos)
    for engine in replicas:
        for seq in engine.sequences.values():
            finished = seq.finish_time is not None
            first = seq.first_token_time
            ttft.append(_latency("ttft", seq, now, finished, first))
            e2el.append(_latency("e2el", seq, now, finished, first))
            value = _latency("tpot", seq, now, finished, first)
            if value is not None:
                tpot.append(value)
            if want_itl and finished and len(seq.token_times) > 1:
                gaps.append(np.diff(seq.token_times))
    samples = {"ttft": ttft, "tpot": tpot, "e2el": e2el,
               "itl": np.concatenate(gaps) if gaps else []}

    def percentile(metric: str, p: float) -> float:
        values = np.asarray(samples[metric], dtype=np.float64)
        return float(np.percentile(values, p)) * 1000 if values.size else 0.0

    values = {slo.name: percentile(slo.metric, slo.percentile) for slo in slos}
    for metric in ("ttft", "tpot", "e2el"):
        values.setdefault(f"{metric}_p99", percentile(metric, 99))
    return values

