"""The two tables of a run folder, declared once for real and simulated runs alike."""

from itertools import chain

import numpy as np
import pyarrow as pa

from engine.sequence import RequestStatus
from engine.stats import RequestRecord, StepRecord
from engine.step_log import StepLog

SECONDS = "s"
"""Times are seconds from the run's start (durations in seconds); summaries and result JSON print milliseconds."""

REQUESTS_COLUMNS = (
    ("request_id", pa.string(), None, "the trace's request id"),
    ("arrival_time", pa.float64(), SECONDS, "when the request arrived"),
    ("first_scheduled_time", pa.float64(), SECONDS, "when the scheduler first gave it a step (null: never)"),
    ("first_token_time", pa.float64(), SECONDS, "when its first output token was produced"),
    ("finish_time", pa.float64(), SECONDS, "when it finished, was rejected or aborted"),
    ("prompt_len", pa.int64(), "tokens", "prompt length"),
    ("output_len", pa.int64(), "tokens", "output tokens produced"),
    ("max_tokens", pa.int64(), "tokens", "output tokens asked for (the trace's output length)"),
    ("cached_tokens", pa.int64(), "tokens", "prompt tokens found in the prefix cache"),
    ("num_preemptions", pa.int64(), "count", "times it was preempted (recomputed)"),
    ("ttft", pa.float64(), SECONDS, "time to first token: first_token_time - arrival_time"),
    ("tpot", pa.float64(), SECONDS, "time per output token after the first: (e2e - ttft) / (output_len - 1)"),
    ("e2e", pa.float64(), SECONDS, "end-to-end latency of a finished request: finish_time - arrival_time"),
    ("status", pa.string(), None, "finished, rejected or aborted (waiting/running: a run stopped early)"),
    ("reason", pa.string(), None, "stop or length for a finished request; why, for the others"),
    ("token_times", pa.list_(pa.float64()), SECONDS, "when each output token was produced"),
)
"""(name, type, unit, meaning) of every requests.parquet column; the unit is also the column's Parquet field
metadata {"unit": ...}, so a stored file says it."""

_ARROW_TYPES = {int: pa.int64(), float: pa.float64()}
STEP_UNITS = {
    "step": ("count", "the step's number, from 0"),
    "start_time": (SECONDS, "when the step started"),
    "duration": (SECONDS, "how long it took: measured (real run) or predicted (simulated run)"),
    "num_prefill_seqs": ("count", "sequences with a prompt chunk in the step"),
    "num_prefill_tokens": ("tokens", "prompt tokens computed"),
    "num_decode_seqs": ("count", "sequences decoding one token"),
    "num_decode_tokens": ("tokens", "decode tokens computed"),
    "decode_context_tokens": ("tokens", "sum of the context lengths the decodes read"),
    "prefill_context_tokens": ("tokens", "sum of the cached context before each prompt chunk"),
    "prefill_attention_work": ("query-key pairs", "prefill attention work: new * (context + (new + 1) / 2)"),
    "num_running": ("count", "sequences running after the step"),
    "num_waiting": ("count", "sequences waiting after the step"),
    "kv_blocks_used": ("blocks", "KV-cache blocks in use"),
    "kv_blocks_total": ("blocks", "KV-cache blocks in all"),
    "num_preempted": ("count", "sequences preempted in the step"),
    "prefix_cache_hit_tokens": ("tokens", "prompt tokens found in the prefix cache in the step"),
    "cuda_graph_batch_size": ("tokens", "padded token rows of the CUDA graph run (0: eager)"),
    "num_batched_tokens": ("tokens", "tokens computed in the step"),
}
"""Unit and meaning of every steps.parquet column (StepRecord's fields)."""


def _field(name: str, arrow_type: pa.DataType, unit: str | None) -> pa.Field:
    return pa.field(name, arrow_type, metadata=None if unit is None else {"unit": unit})


REQUESTS_SCHEMA = pa.schema([_field(name, arrow_type, unit) for name, arrow_type, unit, _ in REQUESTS_COLUMNS])
STEPS_SCHEMA = pa.schema(
    [_field(name, _ARROW_TYPES[kind], STEP_UNITS[name][0]) for name, kind in StepRecord.__annotations__.items()]
)
"""StepRecord's fields, in order."""


def column_unit(schema: pa.Schema, name: str) -> str | None:
    """The unit a column's field metadata states (None for text columns)."""
    metadata = schema.field(name).metadata or {}
    unit = metadata.get(b"unit")
    return None if unit is None else unit.decode()


def requests_table(records: list[RequestRecord]) -> pa.Table:
    """The requests table, with vLLM's per-request latencies derived from the timestamps."""
    columns: dict[str, list] = {name: [] for name in REQUESTS_SCHEMA.names}
    # Column by column: a simulated trace has tens of thousands of records, and a dict per row costs more.
    appenders = {name: column.append for name, column in columns.items()}
    for record in records:
        ttft = e2e = tpot = None
        if record.first_token_time is not None:
            ttft = record.first_token_time - record.arrival_time
        if record.status == RequestStatus.FINISHED and record.finish_time is not None:
            e2e = record.finish_time - record.arrival_time
            if record.output_len > 1 and ttft is not None:
                tpot = (e2e - ttft) / (record.output_len - 1)
        appenders["request_id"](record.request_id)
        appenders["arrival_time"](record.arrival_time)
        appenders["first_scheduled_time"](record.first_scheduled_time)
        appenders["first_token_time"](record.first_token_time)
        appenders["finish_time"](record.finish_time)
        appenders["prompt_len"](record.prompt_len)
        appenders["output_len"](record.output_len)
        appenders["max_tokens"](record.max_tokens)
        appenders["cached_tokens"](record.cached_tokens)
        appenders["num_preemptions"](record.num_preemptions)
        appenders["ttft"](ttft)
        appenders["tpot"](tpot)
        appenders["e2e"](e2e)
        appenders["status"](record.status)
        appenders["reason"](record.reason)
        appenders["token_times"](record.token_times)
    columns["token_times"] = _token_times_column(columns["token_times"])
    return pa.Table.from_pydict(columns, schema=REQUESTS_SCHEMA)


def _token_times_column(token_times: list[list[float]]) -> pa.Array | list[list[float]]:
    """The token_times column from each request's list: numpy gathers the millions of floats of a simulated hour
    a few times faster than Arrow's conversion of nested Python lists (left to Arrow beyond 32-bit offsets)."""
    lengths = np.fromiter(map(len, token_times), dtype=np.int64, count=len(token_times))
    offsets = np.zeros(len(token_times) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        return token_times
    values = np.fromiter(chain.from_iterable(token_times), dtype=np.float64, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values),
                                    type=REQUESTS_SCHEMA.field("token_times").type)


def steps_table(step_log: StepLog) -> pa.Table:
    """The steps table, one row per engine step, from an engine's step log."""
    return pa.Table.from_pydict(step_log.numpy_columns(), schema=STEPS_SCHEMA)
