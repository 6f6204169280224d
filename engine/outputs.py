"""What generation returns, shaped as vLLM v0.11's RequestOutput and CompletionOutput, and how the engine's
sequences become one."""

from dataclasses import dataclass

from engine.scheduler_output import TokenLogprobs
from engine.sequence import Sequence


@dataclass(slots=True)
class Logprob:
    """A token's log-probability, its rank in the distribution (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
"""Per output token: token id -> Logprob, the sampled token first, then the most likely ones."""
PromptLogprobs = list[dict[int, Logprob] | None]
"""Per prompt token: as SampleLogprobs; None for the first token, which nothing predicts."""


@dataclass(slots=True)
class CompletionOutput:
    """One completion of a prompt (a request with n > 1 has n of them)."""

    index: int
    text: str
    """The decoded output ("" without a tokenizer or with detokenize=False); stops before a stop string."""
    token_ids: list[int]
    """Every token generated, the stop token included (a stop string's tokens too: only text is cut)."""
    cumulative_logprob: float | None
    """Sum of the sampled tokens' log-probabilities; None unless logprobs were asked for."""
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    """"stop" (EOS, a stop token or a stop string), "length" (max_tokens or max_model_len), "abort"; None while
    it runs."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it; None for EOS, length or abort."""

    def finished(self) -> bool:
        """Whether this completion has ended."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """When the request arrived, was first scheduled, sampled its first and last token and finished (seconds on
    the engine's clock; with n > 1 the earliest first times and the latest last times)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None


@dataclass(slots=True)
class RequestOutput:
    """A prompt and its completions, in the order of their index."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens found in the prefix cache at the first completion's admission."""


def logprob_dict(entry: TokenLogprobs, tokenizer) -> dict[int, Logprob]:
    """One position's TokenLogprobs as vLLM's dict (its first token first), tokens decoded when a tokenizer is given."""
    result: dict[int, Logprob] = {}
    for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
        if token_id not in result:
            text = tokenizer.decode([token_id]) if tokenizer is not None else None
            result[token_id] = Logprob(logprob, rank, text)
    return result


def completion_output(index: int, seq: Sequence, tokenizer) -> CompletionOutput:
    """A sequence's completion as it stands (text so far while it runs, all of it once finished)."""
    text = seq.detokenizer.text(seq.is_finished) if seq.detokenizer is not None else ""
    logprobs = cumulative = None
    if seq.logprobs is not None:
        logprobs = [logprob_dict(entry, tokenizer) for entry in seq.logprobs]
        cumulative = float(sum(entry.logprobs[0] for entry in seq.logprobs))
    reason = str(seq.finish_reason) if seq.finish_reason is not None else None
    return CompletionOutput(index, text, seq.output_token_ids, cumulative, logprobs, reason, seq.stop_reason)


def request_output(request_id: str, prompt: str | None, sequences: list[Sequence], tokenizer) -> RequestOutput:
    """The RequestOutput of a request whose completions are these sequences (index order)."""
    first = sequences[0]
    prompt_logprobs = None
    if first.prompt_logprobs is not None:
        prompt_logprobs = [None if entry is None else logprob_dict(entry, tokenizer) for entry in first.prompt_logprobs]
    outputs = [completion_output(index, seq, tokenizer) for index, seq in enumerate(sequences)]
    token_times = [seq.token_times[-1] for seq in sequences if seq.token_times]
    first_tokens = [seq.first_token_time for seq in sequences if seq.first_token_time is not None]
    scheduled = [seq.first_scheduled_time for seq in sequences if seq.first_scheduled_time is not None]
    finished = all(seq.is_finished for seq in sequences)
    metrics = RequestMetrics(
        arrival_time=first.arrival_time,
        first_scheduled_time=min(scheduled) if scheduled else None,
        first_token_time=min(first_tokens) if first_tokens else None,
        last_token_time=max(token_times) if token_times else None,
        finished_time=max(seq.finish_time for seq in sequences) if finished else None,
    )
    return RequestOutput(request_id, prompt, first.token_ids[:first.num_prompt_tokens].tolist(), prompt_logprobs,
                         outputs, finished, metrics, first.num_cached_tokens)
