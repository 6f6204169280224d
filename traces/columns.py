"""Vectorized conversion of raw trace columns to numbers, naming the line of the first bad value."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from traces.source import TraceSource

_INTEGER = r"^[+-]?[0-9]{1,18}$"
_DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$"
_ZONE_SUFFIX = r"(Z|[+-][0-9]{2}:?[0-9]{2})$"


def token_counts(values: pa.Array, column: str, source: TraceSource) -> np.ndarray:
    """Non-negative whole numbers (int64) from a string or integer column."""
    values = _not_null(values, column, source)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.utf8_trim_whitespace(values)
        _require_match(values, _INTEGER, column, source, "is not a whole number")
        values = pc.replace_substring_regex(values, r"^\+", "").cast(pa.int64())
    elif pa.types.is_integer(values.type):
        try:
            values = values.cast(pa.int64())
        except pa.ArrowInvalid:
            raise source.error(None, f"column {column!r} holds numbers too large for int64") from None
    else:
        raise source.error(None, f"column {column!r} holds {values.type}, expected whole numbers")
    counts = values.to_numpy(zero_copy_only=False)
    negative = np.flatnonzero(counts < 0)
    if negative.size:
        row = int(negative[0])
        raise source.error(row, f"column {column!r} is negative: {counts[row]}")
    return counts


def seconds(values: pa.Array, column: str, source: TraceSource) -> np.ndarray:
    """Finite float64 numbers from a string or numeric column."""
    values = _not_null(values, column, source)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.utf8_trim_whitespace(values)
        _require_match(values, _DECIMAL, column, source, "is not a number")
    elif not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise source.error(None, f"column {column!r} holds {values.type}, expected numbers")
    try:
        numbers = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        # A decimal the regex allows but float64 cannot hold (1e999): find it.
        for row in range(len(values)):
            try:
                values.slice(row, 1).cast(pa.float64())
            except pa.ArrowInvalid:
                raise source.error(row, f"column {column!r} is not a finite number: {_shown(values[row].as_py())}") from None
        raise source.error(None, f"column {column!r} does not convert to numbers") from None
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        row = int(bad[0])
        raise source.error(row, f"column {column!r} is not a finite number: {numbers[row]}")
    return numbers


def datetimes_ns(values: pa.Array, column: str, source: TraceSource) -> np.ndarray:
    """Nanoseconds since the epoch from ISO-8601 strings; those without a zone are taken as UTC."""
    values = pc.utf8_trim_whitespace(_not_null(values, column, source))
    try:
        return values.cast(pa.timestamp("ns")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Some or all rows carry a zone (Azure's 2024 release writes +00:00): parse the two kinds apart.
    zoned = pc.match_substring_regex(values, _ZONE_SUFFIX).to_numpy(zero_copy_only=False)
    result = np.empty(len(values), dtype=np.int64)
    for mask, kind in ((zoned, pa.timestamp("ns", "UTC")), (~zoned, pa.timestamp("ns"))):
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            continue
        subset = values.take(pa.array(rows))
        try:
            result[rows] = subset.cast(kind).cast(pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for row in rows:
                try:
                    pa.array([values[int(row)].as_py()]).cast(kind)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise source.error(
                        int(row), f"column {column!r} is not a date and time: {_shown(values[int(row)].as_py())}"
                    ) from None
            raise source.error(None, f"column {column!r} does not convert to dates and times") from None
    return result


def optional_strings(values: pa.Array | None) -> pa.Array | None:
    """Strings with blank cells as null: a CSV writes a missing value (a request without a session) as ''."""
    if values is None:
        return None
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    values = values.cast(pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(values), "")
    return pc.if_else(blank, pa.scalar(None, pa.string()), values)


def _not_null(values: pa.Array, column: str, source: TraceSource) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise source.error(row, f"column {column!r} is missing")
    return values


def _require_match(values: pa.Array, pattern: str, column: str, source: TraceSource, problem: str) -> None:
    matches = pc.match_substring_regex(values, pattern).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~matches)
    if bad.size:
        row = int(bad[0])
        raise source.error(row, f"column {column!r} {problem}: {_shown(values[row].as_py())}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
