"""BurstGPT CSV traces: Timestamp (s), Request tokens, Response tokens, found by name in any release."""

from __future__ import annotations

from pathlib import Path

from traces.columns import optional_strings, seconds, token_counts
from traces.csv_table import read_csv_columns
from traces.schema import Trace
from traces.source import TraceSource
from traces.trace_builder import build_trace

COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
SESSION_COLUMN = "Session ID"
"""Added by the third release (BurstGPT v2.0), which also shifts the other columns right."""


def read_burstgpt(path: str | Path, *, name: str | None = None) -> Trace:
    """Read a BurstGPT trace; failed requests (zero response tokens) are left out and reported in notes."""
    source = TraceSource.open(path, kind="csv")
    columns = read_csv_columns(source, required=COLUMNS, what="a BurstGPT trace")
    session = optional_strings(columns.get(SESSION_COLUMN.lower()))
    return build_trace(
        source=source,
        arrival_time=seconds(columns["timestamp"], "Timestamp", source),
        prompt_len=token_counts(columns["request tokens"], "Request tokens", source),
        output_len=token_counts(columns["response tokens"], "Response tokens", source),
        session_id=session,
        name=name or source.path.stem,
        source_format="burstgpt",
    )
