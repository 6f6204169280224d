"""Turning a reader's parsed columns into a valid Trace: zero-length rows left out, arrivals sorted."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from traces.errors import TraceError, TraceWarning
from traces.schema import TRACE_SCHEMA, Trace
from traces.source import TraceSource


def build_trace(
    *,
    source: TraceSource | None,
    arrival_time: np.ndarray,
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    name: str,
    source_format: str,
    hash_block_size: int = 512,
    prefix_block_ids: pa.Array | None = None,
    prompt_token_ids: pa.Array | None = None,
    session_id: pa.Array | None = None,
    request_id: pa.Array | None = None,
    notes: list[str] | None = None,
    from_first_arrival: bool = True,
) -> Trace:
    """A Trace of these rows (in file order); arrival times become seconds from the first arrival."""
    notes = list(notes or [])
    origin = name if source is None else str(source.path)
    num_rows = len(arrival_time)
    if num_rows == 0:
        raise TraceError("empty trace: the file has no request rows", None if source is None else source.path)
    _check_columns(arrival_time, prompt_len, output_len, source)
    if prefix_block_ids is not None:
        _check_block_counts(prefix_block_ids, prompt_len, hash_block_size, source)
    if request_id is None:
        request_id = pa.array(np.arange(num_rows).astype(str), pa.string())
    keep = np.ones(num_rows, dtype=bool)
    # A request must read at least one prompt token and produce at least one: vLLM rejects empty prompts, and
    # zero output tokens is how traces (BurstGPT) record failed requests. Such rows are left out and reported.
    for reason, empty in (
        ("zero output tokens", output_len == 0),
        ("zero prompt tokens", (prompt_len == 0) & (output_len != 0)),
    ):
        rows = np.flatnonzero(empty)
        if rows.size:
            where = "" if source is None else f" ({source.lines_of_rows(rows)})"
            _report(notes, f"left out {rows.size} of {num_rows} rows with {reason}{where}", origin)
            keep[rows] = False
    order = np.flatnonzero(keep)
    if order.size == 0:
        raise TraceError(
            f"empty trace: all {num_rows} rows were left out ({'; '.join(notes)})",
            None if source is None else source.path,
        )
    kept_arrivals = arrival_time[order]
    steps_back = np.flatnonzero(np.diff(kept_arrivals) < 0)
    if steps_back.size:
        first = int(order[steps_back[0] + 1])
        where = "" if source is None else f"; the first out of order is at line {source.line_of_row(first)}"
        _report(notes, f"arrival times were not in order ({steps_back.size} steps back{where}): sorted them", origin)
        order = order[np.argsort(kept_arrivals, kind="stable")]
    arrivals = arrival_time[order].astype(np.float64)
    if from_first_arrival:
        arrivals = arrivals - arrivals[0]
    take = pa.array(order)
    columns = {
        "request_id": request_id.take(take),
        "arrival_time": pa.array(arrivals, pa.float64()),
        "prompt_len": pa.array(prompt_len[order].astype(np.int64), pa.int64()),
        "output_len": pa.array(output_len[order].astype(np.int64), pa.int64()),
        "prefix_block_ids": _optional(prefix_block_ids, take, order.size, "prefix_block_ids"),
        "prompt_token_ids": _optional(prompt_token_ids, take, order.size, "prompt_token_ids"),
        "session_id": _optional(session_id, take, order.size, "session_id"),
    }
    table = pa.Table.from_arrays(
        [columns[field.name].cast(field.type) for field in TRACE_SCHEMA], schema=TRACE_SCHEMA
    )
    return Trace(table=table, name=name, source_format=source_format, hash_block_size=hash_block_size, notes=notes)


def _check_columns(arrival_time: np.ndarray, prompt_len: np.ndarray, output_len: np.ndarray, source) -> None:
    """Readers check their own columns with line numbers; this guards traces built by code."""
    if not len(arrival_time) == len(prompt_len) == len(output_len):
        raise ValueError(
            f"columns differ in length: {len(arrival_time)} arrivals, {len(prompt_len)} prompt lengths, "
            f"{len(output_len)} output lengths"
        )
    for column, values in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not np.issubdtype(np.asarray(values).dtype, np.integer):
            raise TypeError(f"{column} must be integers, got {np.asarray(values).dtype}")
        negative = np.flatnonzero(values < 0)
        if negative.size:
            message = f"{column} is negative: {values[negative[0]]}"
            raise TraceError(message) if source is None else source.error(int(negative[0]), message)
    bad = np.flatnonzero(~np.isfinite(np.asarray(arrival_time, dtype=np.float64)))
    if bad.size:
        message = f"arrival_time is not finite: {arrival_time[bad[0]]}"
        raise TraceError(message) if source is None else source.error(int(bad[0]), message)


def _check_block_counts(
    prefix_block_ids: pa.Array, prompt_len: np.ndarray, block_size: int, source: TraceSource | None
) -> None:
    """Ids beyond the prompt's last block would claim tokens the prompt does not have: most likely the
    trace's block size differs from hash_block_size."""
    lengths = pc.fill_null(pc.list_value_length(prefix_block_ids), 0).to_numpy(zero_copy_only=False)
    blocks_needed = -(-prompt_len // block_size)
    too_many = np.flatnonzero(lengths > blocks_needed)
    if too_many.size:
        row = int(too_many[0])
        message = (
            f"{lengths[row]} prefix block ids (hash_ids) but a prompt of {prompt_len[row]} tokens fills at most "
            f"{blocks_needed[row]} blocks of {block_size} tokens (is hash_block_size right?)"
        )
        raise TraceError(message) if source is None else source.error(row, message)


def _optional(values: pa.Array | None, take: pa.Array, size: int, column: str) -> pa.Array:
    if values is None:
        return pa.nulls(size, TRACE_SCHEMA.field(column).type)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.take(take)


def _report(notes: list[str], note: str, origin: str) -> None:
    notes.append(note)
    warnings.warn(f"{origin}: {note}", TraceWarning, stacklevel=4)
