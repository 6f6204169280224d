"""A trace file's bytes, and the line each of its data rows starts on, for error messages."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from traces.errors import TraceError

_BOM = b"\xef\xbb\xbf"


@dataclass
class TraceSource:
    """The raw text of one trace file; rows are counted the way pyarrow counts them (empty lines skipped)."""

    path: Path
    data: bytes
    kind: str = "lines"
    """'csv' (rows may span lines inside quotes; the first row is the header), 'lines' (one row a line)
    or 'table' (a binary file such as Parquet: rows are named by number, not line)."""
    _row_lines: list[int] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, kind: str) -> TraceSource:
        """Read a file whole; bytes that are not UTF-8 are reported with their line."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TraceError("no such file", path) from None
        except IsADirectoryError:
            raise TraceError("is a directory, not a trace file", path) from None
        except OSError as error:
            raise TraceError(f"cannot read: {error.strerror or error}", path) from None
        if kind == "table":
            return cls(path=path, data=data, kind=kind)
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise TraceError(f"not UTF-8 text (byte {error.start} of the file)", path, line) from None
        return cls(path=path, data=data, kind=kind)

    def json_objects(self) -> Iterator[tuple[int, dict]]:
        """(1-based line, object) of each non-empty line of a JSON-lines file; a line that is not a JSON object is
        a TraceError naming it."""
        for number, line in enumerate(self.data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise TraceError(f"not a JSON object: {error}", self.path, number) from None
            if not isinstance(record, dict):
                raise TraceError(f"expected a JSON object, found {type(record).__name__}", self.path, number)
            yield number, record

    def error(self, row: int | None, message: str) -> TraceError:
        """A TraceError for data row `row` (0-based, in file order), naming its line."""
        if self.kind == "table" and row is not None:
            return TraceError(f"row {row + 1}: {message}", self.path)
        return TraceError(message, self.path, None if row is None else self.line_of_row(row))

    def line_of_row(self, row: int) -> int | None:
        """The 1-based line the 0-based data row starts on."""
        lines = self.row_lines()
        return lines[row] if 0 <= row < len(lines) else None

    def lines_of_rows(self, rows, limit: int = 10) -> str:
        """'lines 3, 7, 9 and 12 more' for error and note texts."""
        rows = list(rows)
        if self.kind == "table":
            shown = [str(int(row) + 1) for row in rows[:limit]]
            more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
            return ("row " if len(rows) == 1 else "rows ") + ", ".join(shown) + more
        shown = [str(self.line_of_row(int(row))) for row in rows[:limit]]
        more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
        return ("line " if len(rows) == 1 else "lines ") + ", ".join(shown) + more

    def row_lines(self) -> list[int]:
        """Start line of every data row; computed only when an error or a note needs it."""
        if self._row_lines is None:
            self._row_lines = self._csv_row_lines() if self.kind == "csv" else self._plain_row_lines()
        return self._row_lines

    def _plain_row_lines(self) -> list[int]:
        # pyarrow's JSON reader skips lines holding only whitespace.
        return [number for number, line in enumerate(self.data.splitlines(), 1) if line.strip()]

    def _csv_row_lines(self) -> list[int]:
        if b'"' not in self.data:
            # No quoting, so no record spans lines: every non-empty line is a record (the first the header).
            return [number for number, line in enumerate(self.data.splitlines(), 1) if line][1:]
        reader = csv.reader(io.StringIO(self.data.decode("utf-8"), newline=""))
        starts: list[int] = []
        previous_end = 0
        try:
            for record in reader:
                if record:
                    starts.append(previous_end + 1)
                previous_end = reader.line_num
        except csv.Error:
            pass
        return starts[1:]  # the first record is the header


@contextmanager
def readable_twice(path: str | Path) -> Iterator[Path]:
    """The path itself, or for a stream (a FIFO, /dev/stdin, a process substitution) a temporary copy of the same
    name: a stream can be read only once, and a trace is read twice (its head to tell the format, then whole).
    Errors name the path given, not the copy."""
    path = Path(path)
    if not path.exists() or path.is_file() or path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="twinfer-trace-") as folder:
        copy = Path(folder) / path.name
        try:
            with open(path, "rb") as stream, open(copy, "wb") as file:
                shutil.copyfileobj(stream, file, 1 << 20)
        except OSError as error:
            raise TraceError(f"cannot read: {error.strerror or error}", path) from None
        try:
            yield copy
        except TraceError as error:
            if error.path != str(copy):
                raise
            raise TraceError(error.message, path, error.line) from None
