"""A request's tokens and progress as the scheduler and block manager see it."""

from array import array
from enum import StrEnum

import numpy as np

from engine.sampling_params import SamplingParams


def token_array(token_ids) -> array:
    """Token ids as an int32 array: a twelfth of a list's memory, and its bytes hash without conversion."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be a 1-D integer array, got {token_ids.dtype} of shape {token_ids.shape}")
        if token_ids.dtype.itemsize > 4 and token_ids.size and not (
            _INT32_MIN <= token_ids.min() and token_ids.max() <= _INT32_MAX
        ):
            raise ValueError("token ids must fit in 32 bits")
        return array("i", token_ids.astype(np.int32, copy=False).tobytes())
    return array("i", token_ids)


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
assert array("i").itemsize == 4, "token arrays need a 4-byte C int"


class RequestStatus(StrEnum):
    """Where a request stands; the value is what requests.parquet stores in its status column."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    REJECTED = "rejected"
    """Never served: it cannot fit max_model_len or the whole KV cache (such a request gets no Sequence)."""


class FinishReason(StrEnum):
    """Why a request ended, as vLLM reports it: a stop token, stop string or EOS, max_tokens reached, or an abort."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Sequence:
    """The prompt plus generated tokens of one request, and how much of it has KV in the cache."""

    __slots__ = (
        "seq_id",
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "sampling_params",
        "arrival_time",
        "status",
        "num_computed_tokens",
        "num_pending_tokens",
        "block_table",
        "block_hashes",
        "num_committed_blocks",
        "num_cached_tokens",
        "num_preemptions",
        "first_scheduled_time",
        "first_token_time",
        "token_times",
        "finish_time",
        "finish_reason",
        "abort_reason",
        "stop_reason",
        "detokenizer",
        "logprobs",
        "prompt_logprobs",
    )

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.token_ids = token_array(prompt_token_ids)
        """Prompt then generated tokens (an int32 array; its slices are arrays too)."""
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        """Tokens sampled by a step still in flight (asynchronous scheduling): counted, not yet known."""
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        """Chained prefix-cache hashes of the leading full blocks (computed lazily)."""
        self.num_committed_blocks = 0
        """Leading blocks of block_table already registered in the prefix cache."""
        self.num_cached_tokens: int | None = None
        """Prefix-cache hit tokens at the first admission (None until admitted)."""
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finish_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.abort_reason = ""
        """What the caller gave as the cause of an abort."""
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that finished it (None for EOS, length and abort)."""
        self.detokenizer = None
        """Its IncrementalDetokenizer when the engine has a tokenizer (text and stop strings), else None."""
        self.logprobs = [] if sampling_params.logprobs is not None else None
        """TokenLogprobs per output token, when its request asks for logprobs."""
        self.prompt_logprobs = [None] * self.num_prompt_tokens if sampling_params.prompt_logprobs is not None else None
        """TokenLogprobs per prompt token (None for the first, and until computed), when its request asks."""

    def drop_unrecorded_tokens(self) -> None:
        """Make the output tokens, their times and logprobs agree again after an interrupt cut their update short:
        keep the outputs every list recorded."""
        kept = min(self.num_output_tokens, len(self.token_times))
        if self.logprobs is not None:
            kept = min(kept, len(self.logprobs))
            del self.logprobs[kept:]
        del self.token_ids[self.num_prompt_tokens + kept:]
        del self.token_times[kept:]
        self.first_token_time = self.token_times[0] if self.token_times else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :].tolist()

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED or self.status is RequestStatus.ABORTED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
