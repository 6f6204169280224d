"""Mooncake JSONL traces: timestamp (ms from the trace start), input_length, output_length, hash_ids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from traces.columns import seconds, token_counts
from traces.errors import TraceError
from traces.schema import Trace
from traces.source import TraceSource
from traces.trace_builder import build_trace

MOONCAKE_BLOCK_SIZE = 512
"""Tokens per hash_ids block in the FAST'25 release."""

_RAW_SCHEMA = pa.schema(
    [
        ("timestamp", pa.float64()),
        ("input_length", pa.int64()),
        ("output_length", pa.int64()),
        ("hash_ids", pa.list_(pa.int64())),
    ]
)
_REQUIRED = ("timestamp", "input_length", "output_length")


def read_mooncake(path: str | Path, *, hash_block_size: int = MOONCAKE_BLOCK_SIZE, name: str | None = None) -> Trace:
    """Read a Mooncake trace; hash_ids become prefix_block_ids over blocks of hash_block_size tokens."""
    if not isinstance(hash_block_size, int) or hash_block_size < 1:
        raise ValueError(f"hash_block_size must be a positive integer, got {hash_block_size!r}")
    source = TraceSource.open(path, kind="lines")
    table = _parse(source)
    milliseconds = seconds(table.column("timestamp"), "timestamp", source)
    prompt_len = token_counts(table.column("input_length"), "input_length", source)
    output_len = token_counts(table.column("output_length"), "output_length", source)
    hash_ids = _hash_ids(table.column("hash_ids").combine_chunks(), source)
    return build_trace(
        source=source,
        arrival_time=milliseconds / 1000.0,
        prompt_len=prompt_len,
        output_len=output_len,
        prefix_block_ids=hash_ids,
        name=name or source.path.stem,
        source_format="mooncake",
        hash_block_size=hash_block_size,
    )


def _parse(source: TraceSource) -> pa.Table:
    if not source.data.strip():
        raise TraceError("empty trace: the file has no request rows", source.path)
    try:
        table = pa_json.read_json(
            io.BytesIO(source.data),
            parse_options=pa_json.ParseOptions(explicit_schema=_RAW_SCHEMA, unexpected_field_behavior="ignore"),
        )
    except pa.ArrowInvalid as error:
        _locate_bad_line(source)
        raise TraceError(f"malformed JSON lines: {error}", source.path) from None
    if table.num_rows != len(source.row_lines()):
        # pyarrow accepts several objects on one line; rows would no longer map to lines.
        _locate_bad_line(source)
        raise TraceError("malformed JSON lines: expected one object per line", source.path)
    return table


def _hash_ids(hash_ids: pa.Array, source: TraceSource) -> pa.Array:
    if hash_ids.null_count == len(hash_ids):
        return hash_ids
    if pc.list_flatten(hash_ids).null_count:
        raise source.error(_first_row_with_null_id(hash_ids), "hash_ids holds a null")
    return hash_ids


def _first_row_with_null_id(hash_ids: pa.Array) -> int:
    for row, ids in enumerate(hash_ids.to_pylist()):
        if ids is not None and None in ids:
            return row
    return 0


def _locate_bad_line(source: TraceSource) -> None:
    """pyarrow rejected the file: find the first line that does not hold a valid request object."""
    for number, record in source.json_objects():
        for key in _REQUIRED:
            value = record.get(key)
            if key == "timestamp":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise TraceError(f"timestamp is not a number: {value!r}", source.path, number)
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TraceError(f"{key} is not a whole number: {value!r}", source.path, number)
        ids = record.get("hash_ids")
        if ids is not None and (
            not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids)
        ):
            raise TraceError(f"hash_ids is not a list of whole numbers: {str(ids)[:40]}", source.path, number)
        for key in _REQUIRED:
            value = record.get(key)
            if isinstance(value, int) and abs(value) >= 2**63 or isinstance(value, float) and not math.isfinite(value):
                raise TraceError(f"{key} is out of range: {value!r}", source.path, number)
        if ids is not None and any(abs(i) >= 2**63 for i in ids):
            raise TraceError("hash_ids holds a number out of range", source.path, number)
