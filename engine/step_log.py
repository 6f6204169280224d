"""The engine's step records, kept as typed columns so millions of simulated steps stay cheap."""

import bisect
import dataclasses
from array import array
from itertools import chain

import numpy as np

from engine.stats import StepRecord

COLUMNS = [field.name for field in dataclasses.fields(StepRecord)]
FLOAT_COLUMNS = {"start_time", "duration", "prefill_attention_work"}


class StepLog:
    """One row per engine step, in step order; reads back as StepRecord rows or numpy columns.

    Steps taken one at a time are appended as rows. A fast-forwarded run of pure-decode steps is kept
    as one record (its step times plus what the other columns are made of) and expanded with numpy
    only when the columns are read: a simulated trace has millions of such steps.
    """

    def __init__(self) -> None:
        self.columns: dict[str, array] = {
            name: array("d" if name in FLOAT_COLUMNS else "q") for name in COLUMNS
        }
        """The rows appended one at a time (decode runs are kept apart, see append_decode_run)."""
        self._appenders = [self.columns[name].append for name in COLUMNS]
        self._num_rows = 0
        # Decode runs, one entry per run in each list: the row where it starts, its first step number,
        # [start, end of step 0, end of step 1, ...], decoding sequences, context read by its first step,
        # blocks used before it, its steps that allocate a block (one entry per block), blocks in all,
        # and its CUDA-graph batch size.
        self._run_rows: list[int] = []
        self._run_rows_before: list[int] = []
        """Rows of earlier runs, for each run (to find a plain row's index)."""
        self._run_steps: list[int] = []
        self._run_times: list[list[float]] = []
        self._run_seqs: list[int] = []
        self._run_context: list[int] = []
        self._run_used: list[int] = []
        self._run_allocations: list[list[int]] = []
        self._run_total: list[int] = []
        self._run_graph: list[int] = []
        self._num_run_rows = 0
        self._duration_overrides: dict[int, float] = {}

    def append(self, *values) -> None:
        """Add one step, values in StepRecord's field order."""
        for append, value in zip(self._appenders, values):
            append(value)
        self._num_rows += 1

    def append_decode_run(
        self,
        first_step: int,
        times: list[float],
        num_seqs: int,
        decode_context_tokens: int,
        kv_blocks_used: int,
        allocation_steps: list[int],
        kv_blocks_total: int,
        cuda_graph_batch_size: int,
    ) -> None:
        """Add len(times) - 1 pure-decode steps of num_seqs sequences each, without waiting or preempted ones.

        Step j starts at times[j] and ends at times[j + 1]; its decode context is decode_context_tokens
        + j * num_seqs; its blocks used count kv_blocks_used plus the entries of allocation_steps <= j.
        """
        self._run_rows.append(self._num_rows)
        self._run_rows_before.append(self._num_run_rows)
        self._run_steps.append(first_step)
        self._run_times.append(times)
        self._run_seqs.append(num_seqs)
        self._run_context.append(decode_context_tokens)
        self._run_used.append(kv_blocks_used)
        self._run_allocations.append(allocation_steps)
        self._run_total.append(kv_blocks_total)
        self._run_graph.append(cuda_graph_batch_size)
        num_steps = len(times) - 1
        self._num_rows += num_steps
        self._num_run_rows += num_steps

    def _last_run_covers_end(self) -> bool:
        return bool(self._run_rows) and self._run_rows[-1] + len(self._run_times[-1]) - 1 == self._num_rows

    @property
    def last_start_time(self) -> float:
        """When the last step started."""
        if self._last_run_covers_end():
            return self._run_times[-1][-2]
        return self.columns["start_time"][-1]

    def set_last_duration(self, duration: float) -> None:
        if self._last_run_covers_end():
            self._duration_overrides[self._num_rows - 1] = duration
        else:
            self.columns["duration"][-1] = duration

    def __len__(self) -> int:
        return self._num_rows

    def _row(self, index: int) -> StepRecord:
        run = bisect.bisect_right(self._run_rows, index) - 1
        if run >= 0 and index - self._run_rows[run] < len(self._run_times[run]) - 1:
            j = index - self._run_rows[run]
            times = self._run_times[run]
            num_seqs = self._run_seqs[run]
            duration = self._duration_overrides.get(index, times[j + 1] - times[j])
            used = self._run_used[run] + sum(1 for step in self._run_allocations[run] if step <= j)
            return StepRecord(
                self._run_steps[run] + j, times[j], duration, 0, 0, num_seqs, num_seqs,
                self._run_context[run] + j * num_seqs, 0, 0.0, num_seqs, 0, used, self._run_total[run], 0, 0,
                self._run_graph[run], num_seqs,
            )  # fmt: skip
        plain = index - (self._run_rows_before[run] + len(self._run_times[run]) - 1 if run >= 0 else 0)
        return StepRecord(*(self.columns[name][plain] for name in COLUMNS))

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
        plain = {
            name: np.frombuffer(column, dtype=np.float64 if name in FLOAT_COLUMNS else np.int64)
            for name, column in self.columns.items()
        }
        if not self._run_rows:
            return {name: values.copy() for name, values in plain.items()}
        total = self._num_rows
        lengths = np.array([len(times) - 1 for times in self._run_times], dtype=np.int64)
        run_starts = np.array(self._run_rows, dtype=np.int64)
        num_run_rows = int(lengths.sum())
        # Row j of run r lands at run_starts[r] + j; offset[r] is where run r begins among run rows.
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        within = np.arange(num_run_rows, dtype=np.int64) - np.repeat(offsets, lengths)
        run_rows = np.repeat(run_starts, lengths) + within
        is_plain = np.ones(total, dtype=bool)
        is_plain[run_rows] = False

        def column(name: str, run_values: np.ndarray) -> np.ndarray:
            values = np.empty(total, dtype=run_values.dtype)
            values[is_plain] = plain[name]
            values[run_rows] = run_values
            return values

        def per_run(values: list) -> np.ndarray:
            return np.repeat(np.array(values, dtype=np.int64), lengths)

        # Times: each run's list holds its start and every step's end; a step ends where the next starts.
        times = np.fromiter(chain.from_iterable(self._run_times), dtype=np.float64, count=num_run_rows + len(lengths))
        last_of_run = offsets + lengths + np.arange(len(lengths))
        starts = np.delete(times, last_of_run)
        ends = np.delete(times, last_of_run - lengths)
        seqs = per_run(self._run_seqs)
        allocation_rows = np.fromiter(
            chain.from_iterable(
                (offset + step for step in steps)
                for offset, steps in zip(offsets.tolist(), self._run_allocations)
                if steps
            ),
            dtype=np.int64,
        )
        allocated = np.bincount(allocation_rows, minlength=num_run_rows).cumsum()
        allocated_before_run = np.concatenate(([0], allocated))[offsets]
        zeros = np.zeros(num_run_rows, dtype=np.int64)
        result = {
            "step": column("step", per_run(self._run_steps) + within),
            "start_time": column("start_time", starts),
            "duration": column("duration", ends - starts),
            "num_prefill_seqs": column("num_prefill_seqs", zeros),
            "num_prefill_tokens": column("num_prefill_tokens", zeros),
            "num_decode_seqs": column("num_decode_seqs", seqs),
            "num_decode_tokens": column("num_decode_tokens", seqs),
            "decode_context_tokens": column("decode_context_tokens", per_run(self._run_context) + within * seqs),
            "prefill_context_tokens": column("prefill_context_tokens", zeros),
            "prefill_attention_work": column("prefill_attention_work", np.zeros(num_run_rows)),
            "num_running": column("num_running", seqs),
            "num_waiting": column("num_waiting", zeros),
            "kv_blocks_used": column(
                "kv_blocks_used",
                per_run(self._run_used) + allocated - np.repeat(allocated_before_run, lengths),
            ),
            "kv_blocks_total": column("kv_blocks_total", per_run(self._run_total)),
            "num_preempted": column("num_preempted", zeros),
            "prefix_cache_hit_tokens": column("prefix_cache_hit_tokens", zeros),
            "cuda_graph_batch_size": column("cuda_graph_batch_size", per_run(self._run_graph)),
            "num_batched_tokens": column("num_batched_tokens", seqs),
        }
        if self._duration_overrides:
            rows = np.fromiter(self._duration_overrides.keys(), dtype=np.int64)
            result["duration"][rows] = np.fromiter(self._duration_overrides.values(), dtype=np.float64)
        return result
