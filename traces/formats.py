"""Which reader a trace file needs, told from its columns or named; read_trace is the one entry point."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pyarrow.parquet as pq

from traces.azure import COLUMNS as AZURE_COLUMNS
from traces.azure import read_azure
from traces.burstgpt import COLUMNS as BURSTGPT_COLUMNS
from traces.burstgpt import read_burstgpt
from traces.bundled import bundled_trace_path
from traces.csv_table import column_key, csv_header
from traces.errors import TraceError
from traces.length_table import COLUMNS as LENGTH_TABLE_COLUMNS
from traces.length_table import read_length_table
from traces.mooncake import read_mooncake
from traces.native import REQUIRED as NATIVE_COLUMNS
from traces.native import read_native
from traces.sharegpt import COLUMNS as SHAREGPT_COLUMNS
from traces.sharegpt import read_sharegpt
from traces.vllm_custom import COLUMNS as VLLM_CUSTOM_COLUMNS
from traces.vllm_custom import read_vllm_custom
from traces.schema import Trace
from traces.source import TraceSource, readable_twice

MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")

READERS = {
    "azure": read_azure,
    "mooncake": read_mooncake,
    "burstgpt": read_burstgpt,
    "length_table": read_length_table,
    "native": read_native,
    "sharegpt": read_sharegpt,
    "vllm_custom": read_vllm_custom,
}
"""Format name -> reader; the columns (or JSON fields) that identify each are in FORMAT_COLUMNS."""

FORMAT_COLUMNS = {
    "azure": AZURE_COLUMNS,
    "mooncake": MOONCAKE_FIELDS,
    "burstgpt": BURSTGPT_COLUMNS,
    "length_table": LENGTH_TABLE_COLUMNS,
    "native": NATIVE_COLUMNS,
    "sharegpt": SHAREGPT_COLUMNS,
    "vllm_custom": VLLM_CUSTOM_COLUMNS,
}
TEXT_FORMATS = ("sharegpt", "vllm_custom")
"""Formats of prompt texts without timestamps: lengths from a tokenizer (or approximated), arrivals drawn."""

_ALIASES = {"vidur": "length_table", "sarathi": "length_table", "length-table": "length_table", "twinfer": "native",
            "vllm-custom": "vllm_custom", "custom": "vllm_custom"}


def known_formats() -> str:
    """'azure (TIMESTAMP, ContextTokens, GeneratedTokens), ...' for messages and --help."""
    return "; ".join(f"{name} ({', '.join(columns)})" for name, columns in FORMAT_COLUMNS.items())


def read_trace(path: str | Path, format: str | None = None, **options) -> Trace:
    """Read any supported trace (or a bundled sample by name); the format is detected unless given."""
    path = bundled_trace_path(path) or Path(path)
    if not path.is_file() and path.exists() and not path.is_dir():  # a stream: read it once, then twice
        with readable_twice(path) as copy:
            return read_trace(copy, format, **options)
    name = format_name(format) if format is not None else detect_format(path)
    if name != "native" and _is_parquet(path):
        # The other readers read text; given Parquet bytes they would only say "not UTF-8 text".
        raise TraceError(
            f"a Parquet file is read only in twinfer's native format ({', '.join(NATIVE_COLUMNS)}), not as {name}: "
            "rename the columns or write the table as CSV",
            path,
        )
    reader = READERS[name]
    accepted = set(inspect.signature(reader).parameters) - {"path"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"option {', '.join(unknown)} does not apply to the {name} format (it takes {', '.join(sorted(accepted))})"
        )
    return reader(path, **options)


def detect_format(path: str | Path) -> str:
    """The format whose identifying columns the file has; a TraceError names the columns found otherwise."""
    path = Path(path)
    columns = _columns_of(path)
    keys = {column_key(column) for column in columns}
    for name, wanted in FORMAT_COLUMNS.items():
        if all(column_key(column) in keys for column in wanted):
            return name
    shown = ", ".join(columns) if columns else "none"
    raise TraceError(
        f"unknown trace format: columns found: {shown}. Known formats (with the columns that identify them): "
        f"{known_formats()}. Pass the format explicitly if the file is one of these.",
        path,
    )


def format_name(format: str) -> str:
    """The canonical name of a format given by the user (aliases: vidur, sarathi, twinfer)."""
    name = _ALIASES.get(format.strip().lower(), format.strip().lower())
    if name not in READERS:
        raise ValueError(f"unknown trace format {format!r}; known formats: {', '.join(READERS)}")
    return name


def _is_parquet(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PAR1"
    except OSError:
        return False  # the reader names the problem


def _columns_of(path: Path) -> list[str]:
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except FileNotFoundError:
        raise TraceError("no such file", path) from None
    except OSError as error:
        raise TraceError(f"cannot read: {error.strerror or error}", path) from None
    if head == b"PAR1":
        try:
            return list(pq.read_schema(path).names)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a corrupt footer
            raise TraceError(f"unreadable Parquet file: {error}", path) from None
    source = TraceSource.open(path, kind="lines")
    if source.data.lstrip().startswith(b"["):
        return _first_entry_keys(source)
    for number, line in enumerate(source.data.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(b"{"):
            try:
                record = json.loads(line)
            except ValueError as error:
                raise TraceError(f"not a JSON object: {error}", path, number) from None
            return list(record) if isinstance(record, dict) else []
        break
    source.kind = "csv"
    return csv_header(source)


def _first_entry_keys(source: TraceSource) -> list[str]:
    """The keys of the first object of a JSON array (a ShareGPT file), without parsing the rest."""
    text = source.data.decode("utf-8")
    start = text.index("[") + 1
    while start < len(text) and text[start].isspace():
        start += 1
    try:
        entry, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError as error:
        raise TraceError(f"not valid JSON: {error}", source.path, text.count("\n", 0, start) + 1) from None
    return list(entry) if isinstance(entry, dict) else []
