"""Reading a CSV trace file into string columns, found by name, with malformed rows named by line."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.csv as pa_csv

from traces.errors import TraceError
from traces.source import TraceSource


def csv_header(source: TraceSource) -> list[str]:
    """The column names of the first non-empty line."""
    for number, line in enumerate(source.data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            names = next(csv.reader([line.decode("utf-8")]))
        except csv.Error as error:
            raise TraceError(f"unreadable CSV header: {error}", source.path, number) from None
        seen: dict[str, str] = {}
        for name in names:
            key = column_key(name)
            if key in seen:
                raise TraceError(f"column {name!r} appears twice in the header", source.path, number)
            seen[key] = name
        return names
    raise TraceError("empty trace: the file has no header and no rows", source.path)


def column_key(name: str) -> str:
    """How column names are matched: case-insensitive, ignoring surrounding spaces."""
    return name.strip().lower()


def read_csv_columns(source: TraceSource, *, required: Sequence[str] = (), what: str = "a trace") -> dict[str, pa.Array]:
    """Every column as strings, keyed by column_key(name); rows with the wrong field count name their line,
    a header without a `required` column is refused as not `what`."""
    names = csv_header(source)
    try:
        table = pa_csv.read_csv(
            io.BytesIO(source.data),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as error:
        _locate_malformed_row(source, len(names))
        raise TraceError(f"malformed CSV: {error}", source.path) from None
    if table.num_rows == 0:
        raise TraceError("empty trace: the file has a header but no request rows", source.path)
    columns = {column_key(name): column.combine_chunks() for name, column in zip(table.column_names, table.columns)}
    missing = [name for name in required if column_key(name) not in columns]
    if missing:
        raise TraceError(f"not {what}: no column {', '.join(missing)} in the header", source.path, 1)
    return columns


def _locate_malformed_row(source: TraceSource, num_columns: int) -> None:
    reader = csv.reader(io.StringIO(source.data.decode("utf-8"), newline=""))
    previous_end = 0
    header_seen = False
    try:
        for record in reader:
            start = previous_end + 1
            previous_end = reader.line_num
            if not record:
                continue
            if not header_seen:
                header_seen = True
                continue
            if len(record) != num_columns:
                raise TraceError(
                    f"expected {num_columns} comma-separated fields as in the header, found {len(record)}",
                    source.path,
                    start,
                )
    except csv.Error as error:
        raise TraceError(f"malformed CSV: {error}", source.path, previous_end + 1) from None
