"""Request traces: readers for real formats, synthetic workloads, transforms and prompt token synthesis."""

from traces.arrivals import AllAtOnce, ConstantRate, Gamma, Poisson, parse_arrival_process
from traces.errors import TraceError, TraceWarning
from traces.formats import detect_format, known_formats, read_trace
from traces.native import write_trace
from traces.schema import TRACE_SCHEMA, Trace
from traces.synthetic import random_workload, shared_prefix_workload
from traces.tokens import prompt_token_ids_for, trace_prompt_token_ids
from traces.trace_options import TraceOptions, load_trace
from traces.transforms import cap_lengths, scale_time, slice_count, slice_time, with_arrivals, with_request_rate

__all__ = [
    "TRACE_SCHEMA",
    "AllAtOnce",
    "ConstantRate",
    "Gamma",
    "Poisson",
    "Trace",
    "TraceError",
    "TraceOptions",
    "TraceWarning",
    "cap_lengths",
    "detect_format",
    "known_formats",
    "load_trace",
    "parse_arrival_process",
    "prompt_token_ids_for",
    "random_workload",
    "read_trace",
    "scale_time",
    "shared_prefix_workload",
    "slice_count",
    "slice_time",
    "trace_prompt_token_ids",
    "with_arrivals",
    "with_request_rate",
    "write_trace",
]
