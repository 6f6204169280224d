"""Azure LLM inference traces (2023 and 2024 releases): TIMESTAMP, ContextTokens, GeneratedTokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.csv_table import read_csv_columns
from traces.schema import Trace
from traces.source import TraceSource
from traces.columns import datetimes_ns, token_counts
from traces.trace_builder import build_trace

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure(path: str | Path, *, name: str | None = None) -> Trace:
    """Read an Azure trace; arrival_time is seconds since its first row, both timestamp styles accepted."""
    source = TraceSource.open(path, kind="csv")
    columns = read_csv_columns(source, required=COLUMNS, what="an Azure trace")
    timestamps = datetimes_ns(columns["timestamp"], "TIMESTAMP", source)
    prompt_len = token_counts(columns["contexttokens"], "ContextTokens", source)
    output_len = token_counts(columns["generatedtokens"], "GeneratedTokens", source)
    # Subtract in integer nanoseconds before going to float, so microseconds survive a day-long trace.
    arrival = (timestamps - timestamps.min()).astype(np.float64) / 1e9 if timestamps.size else timestamps
    return build_trace(
        source=source,
        arrival_time=arrival,
        prompt_len=prompt_len,
        output_len=output_len,
        name=name or source.path.stem,
        source_format="azure",
    )
