"""Reshaping a trace for a run: time scale or target rate, slices by time or count, length caps."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from traces.schema import Trace


def time_scale_note(factor: float) -> str:
    """The note scale_time leaves on a trace (and a run keeps in its metadata's trace_notes)."""
    return f"arrival times scaled by {factor:g}"


def scale_time(trace: Trace, factor: float) -> Trace:
    """Multiply every inter-arrival time by `factor` (the first arrival stays): 0.5 replays twice as fast."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"time scale factor must be a positive number, got {factor!r}")
    return _replace(trace, _scaled(trace.table, factor), time_scale_note(factor))


def with_request_rate(trace: Trace, rate: float) -> Trace:
    """Scale arrival times so the mean rate, (requests - 1) / duration, becomes `rate` requests per second."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"request rate must be a positive number, got {rate!r}")
    if len(trace) < 2 or trace.duration <= 0:
        raise ValueError(
            f"trace {trace.name!r} has no time span ({len(trace)} requests over {trace.duration:g} s): "
            "a request rate cannot be set by scaling it; draw arrivals from an arrival process instead"
        )
    current = (len(trace) - 1) / trace.duration
    note = f"arrival times rescaled from {current:.4g} to {rate:g} requests/s"
    return _replace(trace, _scaled(trace.table, current / rate), note)


def with_arrivals(trace: Trace, arrivals, seed: int = 0) -> Trace:
    """The same requests, in the same order, at arrival times drawn from an arrival process."""
    times = pa.array(arrivals.arrival_times(len(trace), seed), pa.float64())
    return _replace(trace, _set(trace.table, "arrival_time", times), f"arrival times redrawn from {arrivals} with seed {seed}")


def slice_time(trace: Trace, start: float = 0.0, end: float | None = None) -> Trace:
    """Requests arriving in [start, end) seconds, their arrival times made relative to `start`."""
    end = math.inf if end is None else end
    if not (math.isfinite(start) and start >= 0) or not end > start:
        raise ValueError(f"time window must satisfy 0 <= start < end, got [{start}, {end})")
    arrivals = trace.table.column("arrival_time").to_numpy()
    first, last = np.searchsorted(arrivals, [start, end], side="left")
    table = trace.table.slice(first, last - first)
    table = _set(table, "arrival_time", pc.subtract(table.column("arrival_time"), pa.scalar(float(start))))
    return _replace(trace, table, f"sliced to arrivals in [{start:g}, {end:g}) s: {table.num_rows} of {len(trace)}")


def slice_count(trace: Trace, count: int, start: int = 0) -> Trace:
    """`count` requests from position `start` in arrival order, arrival times kept."""
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be non-negative, got count={count} start={start}")
    table = trace.table.slice(start, count)
    return _replace(trace, table, f"sliced to requests {start}..{start + table.num_rows - 1}: {table.num_rows} of {len(trace)}")


def cap_lengths(trace: Trace, *, max_prompt_len: int | None = None, max_output_len: int | None = None) -> Trace:
    """Clip prompt and output lengths to the caps; the number of requests clipped goes into the notes."""
    table = trace.table
    notes = []
    if max_prompt_len is not None:
        _check_cap("max_prompt_len", max_prompt_len)
        prompt_len = table.column("prompt_len").to_numpy()
        clipped = int(np.count_nonzero(prompt_len > max_prompt_len))
        if clipped:
            table = _set(table, "prompt_len", pa.array(np.minimum(prompt_len, max_prompt_len)))
            table = _clip_lists(table, max_prompt_len, trace.hash_block_size)
        notes.append(f"clipped the prompt of {clipped} of {len(trace)} requests to {max_prompt_len} tokens")
    if max_output_len is not None:
        _check_cap("max_output_len", max_output_len)
        output_len = table.column("output_len").to_numpy()
        clipped = int(np.count_nonzero(output_len > max_output_len))
        if clipped:
            table = _set(table, "output_len", pa.array(np.minimum(output_len, max_output_len)))
        notes.append(f"clipped the output of {clipped} of {len(trace)} requests to {max_output_len} tokens")
    return dataclasses.replace(trace, table=table, notes=[*trace.notes, *notes])


def _clip_lists(table: pa.Table, max_prompt_len: int, hash_block_size: int) -> pa.Table:
    """Prefix block ids past the cap, and token ids past it, no longer belong to the prompt."""
    max_blocks = -(-max_prompt_len // hash_block_size)
    for column, limit in (("prefix_block_ids", max_blocks), ("prompt_token_ids", max_prompt_len)):
        values = table.column(column)
        if values.null_count == len(values):
            continue
        clipped = [None if ids is None else ids[:limit] for ids in values.to_pylist()]
        table = _set(table, column, pa.array(clipped, table.schema.field(column).type))
    return table


def _check_cap(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _scaled(table: pa.Table, factor: float) -> pa.Table:
    # About the first arrival, not about 0: a trace kept with its own offset (a native file) must not see
    # its first request move, as only the gaps between requests are being sped up or slowed down.
    arrivals = table.column("arrival_time").to_numpy()
    if arrivals.size == 0:
        return table
    first = arrivals[0]
    return _set(table, "arrival_time", pa.array(first + (arrivals - first) * float(factor), pa.float64()))


def _set(table: pa.Table, column: str, values) -> pa.Table:
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(column), values)


def _replace(trace: Trace, table: pa.Table, note: str) -> Trace:
    return dataclasses.replace(trace, table=table, notes=[*trace.notes, note])
