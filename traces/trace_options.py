"""What a replay asks of its trace (the CLI's trace flags), and loading a trace with them applied."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from traces.arrivals import parse_arrival_process
from traces.formats import TEXT_FORMATS, detect_format, format_name, read_trace
from traces.bundled import bundled_trace_path
from traces.errors import TraceError
from traces.source import readable_twice
from traces.schema import Trace
from traces.synthetic import is_workload_spec, workload_from_spec
from traces.transforms import cap_lengths, scale_time, slice_count, slice_time, with_arrivals, with_request_rate


@dataclass(frozen=True)
class TraceOptions:
    """Trace flags of `twinfer replay/simulate`; applied in order: count, arrivals, rate or scale, duration, caps."""

    format: str | None = None
    max_requests: int | None = None
    arrivals: str | None = None
    """An arrival process spec (poisson:RATE, gamma:RATE:CV, constant:RATE, all-at-once): required in spirit for
    length tables, and for any other trace it replaces the recorded arrival times."""
    time_scale: float | None = None
    request_rate: float | None = None
    duration: float | None = None
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    seed: int = 0
    tokenizer: str | None = None
    """For prompt texts (sharegpt, vllm_custom): the tokenizer counting their tokens (a folder or cached Hub id)."""

    def __post_init__(self) -> None:
        if self.time_scale is not None and self.request_rate is not None:
            raise ValueError("give either a time scale or a request rate, not both")
        for name in ("max_requests", "max_prompt_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("time_scale", "request_rate", "duration"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.arrivals is not None:
            parse_arrival_process(self.arrivals)
        if self.format is not None:
            format_name(self.format)


def load_trace(path: str | Path, options: TraceOptions = TraceOptions()) -> Trace:
    """Read a trace (file, bundled sample name or synthetic workload spec) and apply the options, each noted."""
    arrivals = parse_arrival_process(options.arrivals) if options.arrivals is not None else None
    if is_workload_spec(path):
        return _apply(workload_from_spec(str(path), arrivals=arrivals, seed=options.seed), options, Path(str(path)))
    given = bundled_trace_path(path) or Path(path)
    with readable_twice(given) as resolved:
        fmt = format_name(options.format) if options.format is not None else detect_format(resolved)
        if options.tokenizer is not None and fmt not in TEXT_FORMATS:
            raise ValueError(f"--tokenizer applies to traces of prompt texts ({', '.join(TEXT_FORMATS)}), not {fmt}")
        if fmt == "length_table":
            trace = read_trace(resolved, format=fmt, arrivals=arrivals, seed=options.seed)
        elif fmt in TEXT_FORMATS:
            trace = read_trace(resolved, format=fmt, arrivals=arrivals, seed=options.seed, tokenizer=options.tokenizer)
        else:
            trace = read_trace(resolved, format=fmt)
    if arrivals is not None and fmt != "length_table" and fmt not in TEXT_FORMATS:
        trace = with_arrivals(trace, arrivals, options.seed)
    return _apply(trace, options, given)


def _apply(trace: Trace, options: TraceOptions, resolved: Path) -> Trace:
    if options.max_requests is not None:
        trace = slice_count(trace, options.max_requests)
    if options.request_rate is not None:
        trace = with_request_rate(trace, options.request_rate)
    if options.time_scale is not None:
        trace = scale_time(trace, options.time_scale)
    if options.duration is not None:
        trace = slice_time(trace, 0.0, options.duration)
    if options.max_prompt_len is not None or options.max_output_len is not None:
        trace = cap_lengths(trace, max_prompt_len=options.max_prompt_len, max_output_len=options.max_output_len)
    if len(trace) == 0:
        raise TraceError(f"no requests left after the trace options ({'; '.join(trace.notes)})", resolved)
    return trace
