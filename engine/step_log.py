"""The engine's step records, kept compactly so millions of simulated steps stay cheap."""

import bisect
from itertools import chain

import numpy as np

from engine.stats import StepRecord

_NUMPY_TYPES = {int: np.int64, float: np.float64}
_COLUMN_TYPES = {name: _NUMPY_TYPES[kind] for name, kind in StepRecord.__annotations__.items()}
"""Each column's numpy type, from StepRecord's field types."""
_START, _DURATION = StepRecord._fields.index("start_time"), StepRecord._fields.index("duration")


class StepLog:
    """One row per engine step, in step order; reads back as StepRecord rows or numpy columns.

    Steps taken one at a time are appended as rows. A fast-forwarded run of pure-decode steps is kept
    as one record (its step times plus what the other columns are made of) and expanded with numpy
    only when the columns are read: a simulated trace has millions of such steps.
    """

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        """The steps appended one at a time (decode runs are kept apart, see append_decode_run), as plain
        tuples: the garbage collector stops tracking those, never a named tuple (full collections would
        walk every row)."""
        self._num_rows = 0
        # Decode runs, one entry per run in each list: the row where it starts, its first step number,
        # [start, end of step 0, end of step 1, ...], decoding sequences, context read by its first step,
        # blocks used before it, its steps that allocate a block (one entry per block), blocks in all,
        # its CUDA-graph batch size, and the requests waiting all along (a saturated batch with a queue).
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
        self._run_waiting: list[int] = []
        self._run_states_after_finish: dict[int, tuple[int, int]] = {}
        """(running, KV blocks used) after the last step of each run in which sequences finish, by run."""
        self._num_run_rows = 0
        self._num_run_rows_end = -1
        """The row count right after the last run (so the last row is a run's when they are equal)."""
        self._duration_overrides: dict[int, float] = {}
        self.num_drained = 0
        """Rows handed out by drain() and no longer held."""

    def drain(self, keep_last: bool = True) -> dict[str, np.ndarray]:
        """The columns of every row but the last, which the log forgets: a long run writes its steps out as it
        goes, so its memory does not grow with its length. The last row stays, as a plain row (the engine may
        still stretch it, end_last_step_at), unless keep_last is False (the run is over); num_drained counts
        the rows handed out."""
        columns = self.numpy_columns()
        if not keep_last:
            drained = self.num_drained + self._num_rows
            self.__init__()
            self.num_drained = drained
            return columns
        if self._num_rows <= 1:
            return {name: values[:0] for name, values in columns.items()}
        last = tuple(values[-1].item() for values in columns.values())
        drained = self.num_drained + self._num_rows - 1
        self.__init__()
        self._rows.append(last)
        self._num_rows = 1
        self.num_drained = drained
        return {name: values[:-1] for name, values in columns.items()}

    def append(self, record: StepRecord) -> None:
        """Add one step."""
        self._rows.append(tuple(record))
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
        state_after_finish: tuple[int, int] | None = None,
        num_waiting: int = 0,
    ) -> None:
        """Add len(times) - 1 pure-decode steps of num_seqs sequences each (num_waiting requests waiting all
        along), without preempted ones.

        Step j starts at times[j] and ends at times[j + 1]; its decode context is decode_context_tokens
        + j * num_seqs; its blocks used count kv_blocks_used plus the entries of allocation_steps <= j.
        When sequences finish in the last step, state_after_finish gives its running sequences and blocks
        used once they are gone, as the engine records any step: after the step's update.
        """
        if state_after_finish is not None:
            self._run_states_after_finish[len(self._run_rows)] = state_after_finish
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
        self._run_waiting.append(num_waiting)
        num_steps = len(times) - 1
        self._num_rows += num_steps
        self._num_run_rows += num_steps
        self._num_run_rows_end = self._num_rows

    def end_last_step_at(self, end: float) -> None:
        """Stretch the last step to end at `end`: the engine's bookkeeping after a step belongs to it.

        On a virtual clock the step already ends there, and nothing changes.
        """
        if self._num_rows == self._num_run_rows_end:  # the last step is a decode run's
            times = self._run_times[-1]
            duration = end - times[-2]
            if duration != times[-1] - times[-2]:
                self._duration_overrides[self._num_rows - 1] = duration
        else:
            row = self._rows[-1]
            duration = float(end - row[_START])
            if duration != row[_DURATION]:
                self._rows[-1] = (*row[:_DURATION], duration, *row[_DURATION + 1 :])

    def __len__(self) -> int:
        return self._num_rows

    def _row(self, index: int) -> StepRecord:
        run = bisect.bisect_right(self._run_rows, index) - 1
        if run >= 0 and index - self._run_rows[run] < len(self._run_times[run]) - 1:
            j = index - self._run_rows[run]
            times = self._run_times[run]
            num_seqs = self._run_seqs[run]
            num_running = num_seqs
            used = self._run_used[run] + sum(1 for step in self._run_allocations[run] if step <= j)
            if j == len(times) - 2 and run in self._run_states_after_finish:
                num_running, used = self._run_states_after_finish[run]
            return StepRecord(
                step=self._run_steps[run] + j,
                start_time=times[j],
                duration=self._duration_overrides.get(index, times[j + 1] - times[j]),
                num_prefill_seqs=0,
                num_prefill_tokens=0,
                num_decode_seqs=num_seqs,
                num_decode_tokens=num_seqs,
                decode_context_tokens=self._run_context[run] + j * num_seqs,
                prefill_context_tokens=0,
                prefill_attention_work=0.0,
                num_running=num_running,
                num_waiting=self._run_waiting[run],
                kv_blocks_used=used,
                kv_blocks_total=self._run_total[run],
                num_preempted=0,
                prefix_cache_hit_tokens=0,
                cuda_graph_batch_size=self._run_graph[run],
                num_batched_tokens=num_seqs,
            )
        plain = index - (self._run_rows_before[run] + len(self._run_times[run]) - 1 if run >= 0 else 0)
        return StepRecord._make(self._rows[plain])

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
        values_by_column = zip(*self._rows) if self._rows else [()] * len(_COLUMN_TYPES)
        plain = {
            name: np.array(values, dtype=dtype)
            for (name, dtype), values in zip(_COLUMN_TYPES.items(), values_by_column)
        }
        if not self._run_rows:
            return plain
        # The columns are millions of rows: each is written once, straight into its own array, with
        # hardly any temporary of that size (fresh memory costs page faults that would dominate).
        total = self._num_rows
        num_plain = total - self._num_run_rows
        num_runs = len(self._run_rows)
        run_rows = np.array(self._run_rows, dtype=np.int64)
        run_lengths = np.array([len(times) - 1 for times in self._run_times], dtype=np.int64)
        # Rows come in segments: each plain row alone, each run whole. Run r follows the plain rows
        # appended before it; plain row i follows the runs appended before it.
        plain_before_run = run_rows - np.array(self._run_rows_before, dtype=np.int64)
        run_segment = plain_before_run + np.arange(num_runs)
        plain_index = np.arange(num_plain)
        plain_segment = plain_index + np.searchsorted(plain_before_run, plain_index, side="right")
        segment_lengths = np.ones(num_plain + num_runs, dtype=np.int64)
        segment_lengths[run_segment] = run_lengths
        segment_rows = np.cumsum(segment_lengths) - segment_lengths
        plain_rows = segment_rows[plain_segment]

        def segments(plain_values: np.ndarray, run_values: list) -> np.ndarray:
            values = np.empty(num_plain + num_runs, dtype=plain_values.dtype)
            values[plain_segment] = plain_values
            values[run_segment] = run_values
            return np.repeat(values, segment_lengths)

        def zero_in_runs(name: str) -> np.ndarray:
            # Zeroed memory is only faulted in where a plain row writes a non-zero value.
            values = np.zeros(total, dtype=plain[name].dtype)
            nonzero = plain[name] != 0
            values[plain_rows[nonzero]] = plain[name][nonzero]
            return values

        result = {name: zero_in_runs(name) for name in _ZERO_IN_RUNS}
        for name, run_values in (
            ("num_decode_seqs", self._run_seqs),
            ("num_decode_tokens", self._run_seqs),
            ("num_running", self._run_seqs),
            ("num_batched_tokens", self._run_seqs),
            ("kv_blocks_total", self._run_total),
            ("cuda_graph_batch_size", self._run_graph),
            ("num_waiting", self._run_waiting),
        ):
            result[name] = segments(plain[name], run_values)
        # Position of each row within its segment (0 for plain rows).
        within = np.arange(total, dtype=np.int64)
        within -= np.repeat(segment_rows, segment_lengths)
        step = segments(plain["step"], self._run_steps)
        step += within
        result["step"] = step
        context = segments(plain["decode_context_tokens"], self._run_context)
        context += np.multiply(within, result["num_decode_seqs"], out=within)
        result["decode_context_tokens"] = context
        del within
        # Blocks used: a run's first count plus the allocations of its steps so far. Allocations are
        # counted per row, and each run's total taken back on the row after it, so one cumulative sum
        # restarts at every run.
        allocations = np.bincount(
            np.fromiter(
                chain.from_iterable(
                    (row + step for step in steps) for row, steps in zip(self._run_rows, self._run_allocations) if steps
                ),
                dtype=np.int64,
            ),
            minlength=total + 1,
        )
        allocations[run_rows + run_lengths] -= [len(steps) for steps in self._run_allocations]
        np.cumsum(allocations, out=allocations)
        used = segments(plain["kv_blocks_used"], self._run_used)
        used += allocations[:total]
        result["kv_blocks_used"] = used
        del allocations
        if self._run_states_after_finish:
            runs = np.fromiter(self._run_states_after_finish.keys(), dtype=np.int64)
            last_rows = run_rows[runs] + run_lengths[runs] - 1
            running_after, used_after = zip(*self._run_states_after_finish.values())
            result["num_running"][last_rows] = running_after
            used[last_rows] = used_after
        # Times: a run holds its start and each step's end. A plain row reads as a zero-length step here,
        # then gets its own duration.
        plain_starts = plain["start_time"].tolist()
        bounds = [0, *plain_before_run.tolist(), num_plain]
        run_times = self._run_times

        def row_times(skip_first: bool):
            for run in range(num_runs + 1):
                yield plain_starts[bounds[run] : bounds[run + 1]]
                if run < num_runs:
                    times = run_times[run]
                    yield times[1:] if skip_first else times[:-1]

        starts = np.fromiter(chain.from_iterable(row_times(False)), dtype=np.float64, count=total)
        durations = np.fromiter(chain.from_iterable(row_times(True)), dtype=np.float64, count=total)
        durations -= starts
        durations[plain_rows] = plain["duration"]
        if self._duration_overrides:
            rows = np.fromiter(self._duration_overrides.keys(), dtype=np.int64)
            durations[rows] = np.fromiter(self._duration_overrides.values(), dtype=np.float64)
        result["start_time"] = starts
        result["duration"] = durations
        return {name: result[name] for name in _COLUMN_TYPES}


_ZERO_IN_RUNS = (
    "num_prefill_seqs",
    "num_prefill_tokens",
    "prefill_context_tokens",
    "prefill_attention_work",
    "num_preempted",
    "prefix_cache_hit_tokens",
)
