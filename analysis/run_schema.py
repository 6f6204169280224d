"""The two tables of a run folder, declared once for real and simulated runs alike."""

import pyarrow as pa

from engine.sequence import RequestStatus
from engine.stats import RequestRecord, StepRecord
from engine.step_log import StepLog

REQUESTS_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("arrival_time", pa.float64()),
        ("first_scheduled_time", pa.float64()),
        ("first_token_time", pa.float64()),
        ("finish_time", pa.float64()),
        ("prompt_len", pa.int64()),
        ("output_len", pa.int64()),
        ("max_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("num_preemptions", pa.int64()),
        ("ttft", pa.float64()),
        ("tpot", pa.float64()),
        ("e2e", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("token_times", pa.list_(pa.float64())),
    ]
)

_ARROW_TYPES = {int: pa.int64(), float: pa.float64()}
STEPS_SCHEMA = pa.schema([(name, _ARROW_TYPES[kind]) for name, kind in StepRecord.__annotations__.items()])
"""StepRecord's fields, in order."""


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
    return pa.Table.from_pydict(columns, schema=REQUESTS_SCHEMA)


def steps_table(step_log: StepLog) -> pa.Table:
    """The steps table, one row per engine step, from an engine's step log."""
    return pa.Table.from_pydict(step_log.numpy_columns(), schema=STEPS_SCHEMA)
