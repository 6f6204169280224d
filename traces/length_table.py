"""Length tables without timestamps (Vidur, Sarathi-Serve, etalon): arrivals come from an arrival process."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from traces.arrivals import AllAtOnce, ArrivalProcess
from traces.columns import token_counts
from traces.csv_table import read_csv_columns
from traces.errors import TraceWarning
from traces.schema import Trace
from traces.source import TraceSource
from traces.trace_builder import build_trace

COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


def read_length_table(
    path: str | Path, *, arrivals: ArrivalProcess | None = None, seed: int = 0, name: str | None = None
) -> Trace:
    """Read a length table; arrival times are drawn from `arrivals` (all at once, with a warning, if None)."""
    source = TraceSource.open(path, kind="csv")
    columns = read_csv_columns(source, required=COLUMNS, what="a length table")
    prompt_len = token_counts(columns["num_prefill_tokens"], "num_prefill_tokens", source)
    output_len = token_counts(columns["num_decode_tokens"], "num_decode_tokens", source)
    notes = []
    if arrivals is None:
        arrivals = AllAtOnce()
        note = "the table has no timestamps and no arrival process was given: every request arrives at 0"
        warnings.warn(f"{source.path}: {note}", TraceWarning, stacklevel=2)
        notes.append(note)
    else:
        notes.append(f"arrival times drawn from {arrivals} with seed {seed}")
    # Rows build_trace leaves out (zero lengths) get no arrival: the kept rows alone follow the process,
    # so a constant or Poisson rate is the one asked for, with no holes where a row was left out.
    kept = (output_len > 0) & (prompt_len > 0)
    arrival_time = np.zeros(len(prompt_len), dtype=np.float64)
    arrival_time[kept] = arrivals.arrival_times(int(kept.sum()), seed)
    return build_trace(
        source=source,
        arrival_time=arrival_time,
        prompt_len=prompt_len,
        output_len=output_len,
        name=name or source.path.stem,
        source_format="length_table",
        notes=notes,
    )
