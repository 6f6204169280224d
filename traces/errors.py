"""The one error and the one warning every trace reader raises."""

from __future__ import annotations

from pathlib import Path


class TraceError(ValueError):
    """A trace that cannot be read, naming the file and, where known, the line (1-based, as an editor shows it)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        where = self.path or "<trace>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class TraceWarning(UserWarning):
    """Something a reader fixed or left out; the same text is kept in Trace.notes."""
