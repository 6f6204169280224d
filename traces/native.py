"""twinfer's own trace files: the Trace table as Parquet (metadata kept) or CSV (lists space-separated)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from traces.columns import optional_strings, seconds, token_counts
from traces.csv_table import read_csv_columns
from traces.errors import TraceError
from traces.schema import Trace
from traces.source import TraceSource
from traces.trace_builder import build_trace

REQUIRED = ("arrival_time", "prompt_len", "output_len")
_METADATA_KEY = b"twinfer.trace"
_LIST_COLUMNS = ("prefix_block_ids", "prompt_token_ids")


def read_native(path: str | Path, *, hash_block_size: int | None = None, name: str | None = None) -> Trace:
    """Read a trace written by write_trace (or by hand with its column names); arrival times kept as given."""
    path = Path(path)
    if path.suffix.lower() == ".parquet" or _is_parquet(path):
        source = TraceSource.open(path, kind="table")
        columns, metadata = _parquet_columns(source)
    else:
        source = TraceSource.open(path, kind="csv")
        columns, metadata = read_csv_columns(source), {}
    missing = [column for column in REQUIRED if column not in columns]
    if missing:
        raise TraceError(f"not a twinfer trace: no column {', '.join(missing)}", source.path)
    block_size = hash_block_size or metadata.get("hash_block_size") or _csv_block_size(columns, source) or 512
    prompt_len = token_counts(columns["prompt_len"], "prompt_len", source)
    arrival = seconds(columns["arrival_time"], "arrival_time", source)
    negative = np.flatnonzero(arrival < 0)
    if negative.size:
        raise source.error(int(negative[0]), f"arrival_time is negative: {arrival[negative[0]]}")
    lists = {column: _id_lists(columns.get(column), column, source) for column in _LIST_COLUMNS}
    _check_token_ids(lists["prompt_token_ids"], prompt_len, source)
    request_id = _strings(columns.get("request_id"))
    if request_id is not None:
        _check_unique(request_id, source)
    return build_trace(
        source=source,
        arrival_time=arrival,
        prompt_len=prompt_len,
        output_len=token_counts(columns["output_len"], "output_len", source),
        prefix_block_ids=lists["prefix_block_ids"],
        prompt_token_ids=lists["prompt_token_ids"],
        session_id=optional_strings(columns.get("session_id")),
        request_id=request_id,
        name=name or metadata.get("name") or source.path.stem,
        source_format="native",
        hash_block_size=int(block_size),
        notes=list(metadata.get("notes", [])),
        from_first_arrival=False,
    )


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write a trace atomically as Parquet (.parquet, name and notes kept) or CSV (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.suffix.lower() == ".parquet":
            metadata = {"name": trace.name, "hash_block_size": trace.hash_block_size, "notes": list(trace.notes)}
            table = trace.table.replace_schema_metadata({_METADATA_KEY: json.dumps(metadata).encode()})
            pq.write_table(table, temporary)
        else:
            pa_csv.write_csv(_csv_table(trace), temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _csv_table(trace: Trace) -> pa.Table:
    table = trace.table
    columns = {name: table.column(name) for name in ("request_id", "arrival_time", "prompt_len", "output_len")}
    for name in _LIST_COLUMNS:
        values = table.column(name).combine_chunks()
        if values.null_count < len(values):
            columns[name] = pa.array(
                [None if ids is None else " ".join(map(str, ids)) for ids in values.to_pylist()], pa.string()
            )
    if table.column("session_id").null_count < table.num_rows:
        columns["session_id"] = table.column("session_id")
    if "prefix_block_ids" in columns:
        columns["hash_block_size"] = pa.array(np.full(table.num_rows, trace.hash_block_size), pa.int64())
    return pa.table(columns)


def _is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PAR1"
    except OSError:
        return False


def _parquet_columns(source: TraceSource) -> tuple[dict[str, pa.Array], dict]:
    try:
        table = pq.read_table(pa.BufferReader(source.data))
        # A corrupted file can decode into invalid values (strings that are not UTF-8): catch them here.
        table.validate(full=True)
    except (pa.ArrowException, OSError) as error:
        raise TraceError(f"unreadable Parquet file: {error}", source.path) from None
    if table.num_rows == 0:
        raise TraceError("empty trace: the file has no request rows", source.path)
    metadata = {}
    raw = (table.schema.metadata or {}).get(_METADATA_KEY)
    if raw is not None:
        try:
            metadata = json.loads(raw)
        except ValueError:
            raise TraceError("unreadable twinfer.trace metadata", source.path) from None
        if not isinstance(metadata, dict):
            metadata = {}
    columns = {}
    for name, column in zip(table.column_names, table.columns):
        columns[name.strip().lower()] = column.combine_chunks()
    return columns, metadata


def _csv_block_size(columns: dict[str, pa.Array], source: TraceSource) -> int | None:
    values = columns.get("hash_block_size")
    if values is None:
        return None
    sizes = token_counts(values, "hash_block_size", source)
    if np.any(sizes != sizes[0]) or sizes[0] < 1:
        row = int(np.flatnonzero(sizes != sizes[0])[0]) if np.any(sizes != sizes[0]) else 0
        raise source.error(row, "hash_block_size must be one positive number on every row")
    return int(sizes[0])


def _id_lists(values: pa.Array | None, column: str, source: TraceSource) -> pa.Array | None:
    """Lists of non-negative ids: a list column (Parquet) or space- or comma-separated text (CSV)."""
    if values is None:
        return None
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        text = pc.utf8_trim(pc.replace_substring_regex(values, r"[\[\],\s]+", " "), " ")
        empty = pc.equal(text, "")
        values = pc.if_else(empty, pa.scalar(None, pa.list_(pa.string())), pc.split_pattern(text, " "))
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        raise source.error(None, f"column {column!r} holds {values.type}, expected lists of ids")
    try:
        ids = values.cast(pa.list_(pa.int64()))
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        valid = flat.size == 0 or (pc.list_flatten(ids).null_count == 0 and flat.min() >= 0)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        valid = False
    if not valid:
        for row, entry in enumerate(values.to_pylist()):
            if entry is None:
                continue
            for item in entry:
                try:
                    if item is None or int(item) < 0 or int(item) >= 2**63:
                        raise ValueError
                except (TypeError, ValueError):
                    raise source.error(row, f"column {column!r} holds {item!r}, not a non-negative id") from None
        raise TraceError(f"column {column!r} is not a list of non-negative ids", source.path)
    return ids


def _check_token_ids(token_ids: pa.Array | None, prompt_len: np.ndarray, source: TraceSource) -> None:
    if token_ids is None:
        return
    lengths = pc.list_value_length(token_ids).to_numpy(zero_copy_only=False)
    has_ids = ~np.isnan(lengths.astype(np.float64))
    mismatch = np.flatnonzero(has_ids & (np.nan_to_num(lengths.astype(np.float64)) != prompt_len))
    if mismatch.size:
        row = int(mismatch[0])
        raise source.error(row, f"prompt_len {prompt_len[row]} differs from the {int(lengths[row])} prompt_token_ids")
    if len(pc.list_flatten(token_ids)) and pc.max(pc.list_flatten(token_ids)).as_py() >= 2**31:
        raise TraceError("prompt_token_ids holds an id too large for int32", source.path)


def _strings(values: pa.Array | None) -> pa.Array | None:
    return None if values is None else values.cast(pa.string())


def _check_unique(request_id: pa.Array, source: TraceSource) -> None:
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(request_id), ""), True).to_numpy(zero_copy_only=False)
    if blank.any():
        raise source.error(int(np.flatnonzero(blank)[0]), "request_id is empty")
    ids = request_id.to_numpy(zero_copy_only=False)
    unique, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
    if np.any(counts > 1):
        duplicate = str(unique[np.flatnonzero(counts > 1)[0]])
        rows = np.flatnonzero(ids.astype(str) == duplicate)
        raise source.error(int(rows[1]), f"request_id {duplicate!r} also appears at {source.lines_of_rows(rows[:1])}")
