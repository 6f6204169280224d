"""What the engine records: one row per request and one per step (the run tables of analysis/run_schema.py)."""

from dataclasses import dataclass, field
from typing import NamedTuple

from engine.sequence import RequestStatus


@dataclass(slots=True)
class RequestRecord:
    """A request's life from arrival to finish, abort or rejection; times in seconds from the run's start."""

    request_id: str
    arrival_time: float
    prompt_len: int
    max_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    output_len: int = 0
    cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    reason: str = ""
    """A finished request's FinishReason (stop or length); why a rejected one was, in words; for an aborted
    one, "aborted: " and the caller's reason."""
    token_times: list[float] = field(default_factory=list)


class StepRecord(NamedTuple):
    """One engine step: its batch (the cost model's inputs), its timing and the engine's state.

    The one declaration of the steps table: its columns, and their types (int or float), are these fields.
    A named tuple: built by keyword, read back by name, and kept by the step log as a plain tuple.
    """

    step: int
    start_time: float
    duration: float
    num_prefill_seqs: int
    num_prefill_tokens: int
    num_decode_seqs: int
    num_decode_tokens: int
    decode_context_tokens: int
    """Sum over decoding sequences of the context length each reads."""
    prefill_context_tokens: int
    """Sum over prefill chunks of the context already cached before the chunk."""
    prefill_attention_work: float
    """Sum over prefill chunks of query-key pairs: new * (context + (new + 1) / 2)."""
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preempted: int
    prefix_cache_hit_tokens: int
    cuda_graph_batch_size: int
    num_batched_tokens: int


class BatchFeatures(NamedTuple):
    """What a step's batch costs to run, from its SchedulerOutput alone (the cost model's inputs).

    A named tuple rather than a frozen dataclass: the scheduler builds one every step, at half the cost.
    """

    num_prefill_seqs: int
    num_prefill_tokens: int
    num_decode_seqs: int
    num_decode_tokens: int
    decode_context_tokens: int
    prefill_context_tokens: int
    prefill_attention_work: float
    num_batched_tokens: int


def batch_features(scheduler_output) -> BatchFeatures:
    """The step columns that describe a SchedulerOutput's batch (the scheduler's summary when it has one)."""
    if scheduler_output.features is not None:
        return scheduler_output.features
    return summarize_batch(scheduler_output.sequences)


def summarize_batch(sequences) -> BatchFeatures:
    """Summarize scheduled sequences into the step columns that describe their batch."""
    num_prefill_seqs = num_prefill_tokens = num_decode_seqs = 0
    decode_context_tokens = prefill_context_tokens = 0
    prefill_attention_work = 0.0
    for seq in sequences:
        num_new = len(seq.token_ids)
        if seq.is_decode:
            num_decode_seqs += 1
            decode_context_tokens += seq.num_computed_tokens + num_new
        else:
            num_prefill_seqs += 1
            num_prefill_tokens += num_new
            prefill_context_tokens += seq.num_computed_tokens
            prefill_attention_work += num_new * (seq.num_computed_tokens + (num_new + 1) / 2)
    return BatchFeatures(
        num_prefill_seqs=num_prefill_seqs,
        num_prefill_tokens=num_prefill_tokens,
        num_decode_seqs=num_decode_seqs,
        num_decode_tokens=num_decode_seqs,
        decode_context_tokens=decode_context_tokens,
        prefill_context_tokens=prefill_context_tokens,
        prefill_attention_work=prefill_attention_work,
        num_batched_tokens=num_prefill_tokens + num_decode_seqs,
    )
