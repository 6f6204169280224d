"""Exact order statistics of values too many to hold at once, read again in batches (a few passes).

A float64's bits, flipped so that unsigned order is numeric order, are selected 16 bits at a time: each pass
histograms the next 16 bits of the values still in the running for each wanted rank, and a group small enough
is gathered and partitioned outright. So the answer is exactly the value a sort would put at that rank, in at
most five passes whatever the values, with memory of a histogram and one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

_SIGN = np.uint64(1 << 63)
_DIGIT_BITS = 16
_GATHER_AT_MOST = 1 << 20
"""A group of at most this many values (8 MB) is gathered and partitioned instead of histogrammed again."""
_GATHER_ALL_AT_MOST = 1 << 23
"""Values few enough (64 MB) are all gathered at once and partitioned: one pass (there is one group then, not one
per rank)."""


def _keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys in the values' numeric order (negative floats have their bits inverted)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _value(key: int) -> float:
    key = np.uint64(key)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


class BatchStatistics:
    """Count, mean, standard deviation and values at chosen ranks of the values that batches() yields (called
    once per pass; it must yield the same values each time, NaN excluded)."""

    def __init__(self, batches: Callable[[], Iterable[np.ndarray]]) -> None:
        self._batches = batches
        count = 0
        sums = []
        for batch in batches():
            count += batch.size
            sums.append(float(batch.sum()))
        self.count = count
        self.mean = math.fsum(sums) / count if count else 0.0
        self._std: float | None = None

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default), from a second pass."""
        if self._std is None:
            mean = self.mean
            squares = [float(np.square(batch - mean).sum()) for batch in self._batches()]
            self._std = math.sqrt(math.fsum(squares) / self.count) if self.count else 0.0
        return self._std

    def at_ranks(self, ranks: Iterable[int]) -> dict[int, float]:
        """The value a sort would put at each 0-based rank."""
        # Per rank: (bits still to decide, the decided high bits, the rank among values sharing them, their count).
        pending = {rank: (64, 0, rank, self.count) for rank in sorted(set(ranks))}
        for rank in pending:
            if not 0 <= rank < self.count:
                raise IndexError(f"rank {rank} out of range for {self.count} values")
        found: dict[int, float] = {}
        while pending:
            groups: dict[tuple[int, int], list[int]] = {}
            for rank, (shift, prefix, _, _) in pending.items():
                groups.setdefault((shift, prefix), []).append(rank)
            gather = {group for group, members in groups.items()
                      if pending[members[0]][3] <= (_GATHER_ALL_AT_MOST if group[0] == 64 else _GATHER_AT_MOST)}
            gathered: dict[tuple[int, int], list[np.ndarray]] = {group: [] for group in gather}
            histograms = {group: np.zeros(1 << _DIGIT_BITS, dtype=np.int64) for group in groups if group not in gather}
            for batch in self._batches():
                keys = _keys(batch)
                for shift, prefix in groups:
                    selected = keys if shift == 64 else keys[(keys >> np.uint64(shift)) == np.uint64(prefix)]
                    if (shift, prefix) in gather:
                        gathered[(shift, prefix)].append(selected)
                    else:
                        digits = (selected >> np.uint64(shift - _DIGIT_BITS)) & np.uint64((1 << _DIGIT_BITS) - 1)
                        histograms[(shift, prefix)] += np.bincount(digits.astype(np.int64), minlength=1 << _DIGIT_BITS)
            for group, members in groups.items():
                shift, prefix = group
                if group in gather:
                    keys = np.concatenate(gathered[group]) if gathered[group] else np.empty(0, np.uint64)
                    within = [pending[rank][2] for rank in members]
                    keys.partition(within)
                    for rank, index in zip(members, within):
                        found[rank] = _value(int(keys[index]))
                        del pending[rank]
                    continue
                counts = histograms[group]
                before = np.cumsum(counts) - counts
                for rank in members:
                    within = pending[rank][2]
                    digit = int(np.searchsorted(before, within, side="right") - 1)
                    new_prefix = (prefix << _DIGIT_BITS) | digit
                    new_shift = shift - _DIGIT_BITS
                    if new_shift == 0:  # every bit decided: the key itself
                        found[rank] = _value(new_prefix)
                        del pending[rank]
                    else:
                        pending[rank] = (new_shift, new_prefix, within - int(before[digit]), int(counts[digit]))
        return found

    def percentiles(self, percentiles: Iterable[float]) -> dict[float, float]:
        """numpy.percentile's linear interpolation, exactly, for each percentile (0..100)."""
        percentiles = list(percentiles)
        if not self.count:
            return {p: 0.0 for p in percentiles}
        positions = {p: (self.count - 1) * (p / 100) for p in percentiles}
        ranks = set()
        for position in positions.values():
            low = math.floor(position)
            ranks.update((low, min(low + 1, self.count - 1)))
        values = self.at_ranks(ranks)
        result = {}
        for p, position in positions.items():
            low = math.floor(position)
            below, above = values[low], values[min(low + 1, self.count - 1)]
            fraction = position - low
            # numpy's _lerp: from the nearer end, so the result stays within [below, above].
            difference = above - below
            result[p] = above - difference * (1 - fraction) if fraction >= 0.5 else below + difference * fraction
        return result
