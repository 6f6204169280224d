"""The engine's step records, kept as typed columns so millions of simulated steps stay cheap."""

import dataclasses
from array import array

import numpy as np

from engine.stats import StepRecord

COLUMNS = [field.name for field in dataclasses.fields(StepRecord)]
FLOAT_COLUMNS = {"start_time", "duration", "prefill_attention_work"}


class StepLog:
    """One row per engine step, in step order; reads back as StepRecord rows or numpy columns."""

    def __init__(self) -> None:
        self.columns: dict[str, array] = {
            name: array("d" if name in FLOAT_COLUMNS else "q") for name in COLUMNS
        }
        self._appenders = [self.columns[name].append for name in COLUMNS]

    def append(self, *values) -> None:
        """Add one step, values in StepRecord's field order."""
        for append, value in zip(self._appenders, values):
            append(value)

    def extend(self, **columns) -> None:
        """Add many steps at once: every column given as a sequence of equal length."""
        for name in COLUMNS:
            self.columns[name].extend(columns[name])

    def set_last_duration(self, duration: float) -> None:
        self.columns["duration"][-1] = duration

    def __len__(self) -> int:
        return len(self.columns["step"])

    def _row(self, index: int) -> StepRecord:
        return StepRecord(*(self.columns[name][index] for name in COLUMNS))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("step index out of range")
        return self._row(index)

    def __iter__(self):
        for index in range(len(self)):
            yield self._row(index)

    def numpy_columns(self) -> dict[str, np.ndarray]:
        """Every column as a numpy array (copies, so the log can keep growing)."""
        return {
            name: np.frombuffer(column, dtype=np.float64 if name in FLOAT_COLUMNS else np.int64).copy()
            for name, column in self.columns.items()
        }
