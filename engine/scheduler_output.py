"""The seam between deciding and doing: what the scheduler asks an executor to run."""

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.sampling_params import SamplingParams

PENDING_TOKEN = -1
"""Stands in token_ids for the token a sequence sampled in the step before, still in flight when this
step was scheduled (asynchronous scheduling): the executor has its value, the scheduler not yet."""


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: which tokens to compute and where their KV lives.

    Not frozen because it is built hundreds of times per step; executors must treat it as read-only.
    """

    seq_id: int
    token_ids: list[int]
    """The new tokens to compute this step; their positions start at num_computed_tokens. A decode may
    hold PENDING_TOKEN: the token this sequence sampled in the previous step."""
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (prefix-cache hits and earlier chunks)."""
    block_table: list[int]
    """KV block ids covering positions 0 .. num_computed_tokens + len(token_ids) - 1 (the sequence's own
    list, shared to save a copy per step: valid for the step, may grow afterwards)."""
    is_decode: bool
    """True for one generated token after the prompt; False for prompt (or recompute) chunks."""
    samples: bool
    """True when this step reaches the end of the known tokens, so the executor samples one."""
    num_output_tokens: int
    """Tokens generated so far; the index of the token sampled this step (for seeded sampling)."""
    sampling_params: SamplingParams
    token_history: Any = None
    """Only when the sampling params need it (penalties, bad words, prompt logprobs): every token the
    scheduler knows of the sequence, prompt then output (an int32 array; a pending token is not in it)."""
    num_prompt_tokens: int = 0
    """The prompt's length, given with token_history."""

    @property
    def context_len(self) -> int:
        """Tokens attended to by the last new token: computed plus new."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """Everything an executor sees for one engine step."""

    step: int
    sequences: list[ScheduledSequence]
    """Decodes and prefill chunks of running requests first, newly admitted ones after."""
    finished_seq_ids: list[int] = field(default_factory=list)
    """Sequences that finished, were preempted or aborted since the last step (free their state)."""
    features: Any = None
    """The batch's BatchFeatures (engine/stats.py), summarized once by the scheduler for the step log and
    any cost model; None on outputs built elsewhere (engine.stats.batch_features then computes them)."""
    has_token_history: bool = False
    """Whether any sequence carries its token_history (a request with penalties, bad words or prompt logprobs)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(seq.token_ids) for seq in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


class TokenLogprobs(NamedTuple):
    """Log-probabilities at one position: the chosen token's first (sampled, or the prompt's next token), then
    the most likely tokens in order; ranks are 1-based positions in the whole distribution."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass(frozen=True, slots=True)
class StepResult:
    """An executor's answer to one SchedulerOutput."""

    sampled_token_ids: dict[int, int]
    """A token for every sequence with samples=True, keyed by seq_id."""
    duration: float
    """Seconds the step took (measured on a real executor, predicted by the simulator)."""
    cuda_graph_batch_size: int = 0
    """Rows of the CUDA graph replayed (the padded batch of a decode graph, the padded token count of a
    mixed-step graph: one row per token either way), or 0 when the step ran eagerly."""
    logprobs: dict[int, TokenLogprobs] | None = None
    """Per seq id whose request asks for logprobs: those of the token sampled this step (None: no such row)."""
    prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] | None = None
    """Per seq id whose request asks for prompt logprobs and whose prompt this step computed: (index of the
    first prompt token scored, its TokenLogprobs and those of the next ones)."""
