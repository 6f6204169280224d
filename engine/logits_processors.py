"""The logit changes made before temperature, only on the rows whose requests ask for them, in vLLM v0.11's
order: allowed_token_ids, banned tokens (bad words, and EOS and stop tokens before min_tokens), logit_bias, then
the repetition, frequency and presence penalties.

The host turns each row's settings and token history into sparse (row, token) lists (prepare_processors); the
device applies them to a float32 copy of the logits (apply_logits_processors). A batch with none of these
settings never reaches this module.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

from engine.scheduler_output import PENDING_TOKEN


@dataclass(frozen=True, slots=True)
class ProcessorArrays:
    """The host side: int32/float32 arrays for one step's sampling rows; None where no row uses a processor."""

    allowed_rows: np.ndarray | None = None
    """Distinct rows restricted to allowed tokens."""
    allowed_pair_rows: np.ndarray | None = None
    """Per allowed (row, token) pair: its row's index in allowed_rows."""
    allowed_tokens: np.ndarray | None = None
    banned_rows: np.ndarray | None = None
    banned_tokens: np.ndarray | None = None
    bias_rows: np.ndarray | None = None
    bias_tokens: np.ndarray | None = None
    bias_values: np.ndarray | None = None
    penalty_rows: np.ndarray | None = None
    """Per (row, token) seen in the row's prompt or output (the output only without a repetition penalty)."""
    penalty_tokens: np.ndarray | None = None
    penalty_counts: np.ndarray | None = None
    """How often the token occurs in the row's output (float32)."""
    repetition: np.ndarray | None = None
    """Per sampling row (1: none)."""
    frequency: np.ndarray | None = None
    presence: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to upload, under names that cannot clash with a step's other inputs."""
        return {f"processor_{f.name}": value for f in fields(self)
                if isinstance(value := getattr(self, f.name), np.ndarray)}

    def tensors(self, dev: dict[str, torch.Tensor]) -> "ProcessorTensors":
        """The device views of arrays() (indices widened to int64, as indexing needs)."""
        values = {}
        for f in fields(self):
            view = dev.get(f"processor_{f.name}")
            if view is not None and view.dtype == torch.int32:
                view = view.long()
            values[f.name] = view
        return ProcessorTensors(**values)


@dataclass(frozen=True, slots=True)
class ProcessorTensors:
    """ProcessorArrays on the device."""

    allowed_rows: torch.Tensor | None = None
    allowed_pair_rows: torch.Tensor | None = None
    allowed_tokens: torch.Tensor | None = None
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    penalty_rows: torch.Tensor | None = None
    penalty_tokens: torch.Tensor | None = None
    penalty_counts: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None


def _output_tokens(seq, pending_token) -> np.ndarray:
    """The tokens seq generated so far, the one still on the device (asynchronous scheduling) included."""
    output = np.frombuffer(seq.token_history, np.int32)[seq.num_prompt_tokens:]
    if seq.token_ids[-1] == PENDING_TOKEN:
        output = np.append(output, np.int32(pending_token(seq.seq_id)))
    return output


def _banned_tokens(seq, params, eos_token_ids: tuple[int, ...], output: np.ndarray | None) -> list[int]:
    banned = []
    if seq.num_output_tokens < params.min_tokens:
        # vLLM bans EOS here even when ignore_eos: min_tokens counts tokens before any stop.
        banned.extend(params.stop_token_ids)
        banned.extend(eos_token_ids)
    for word in params.bad_words_token_ids:
        prefix = word[:-1]
        if not prefix:
            banned.append(word[-1])
        elif output is not None and len(output) >= len(prefix) and tuple(output[-len(prefix):].tolist()) == prefix:
            banned.append(word[-1])
    return banned


def prepare_processors(seqs, eos_token_ids: tuple[int, ...], pending_token) -> ProcessorArrays | None:
    """The processor arrays of the sampling rows seqs (ScheduledSequences in row order), or None when no row
    uses a processor. pending_token(seq_id) reads a token still on the device (only for rows whose history
    ends with one)."""
    allowed_rows, allowed_pair_rows, allowed_tokens = [], [], []
    banned_rows, banned_tokens = [], []
    bias_rows, bias_tokens, bias_values = [], [], []
    penalty_rows, penalty_tokens, penalty_counts = [], [], []
    num_rows = len(seqs)
    repetition = np.ones(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    presence = np.zeros(num_rows, np.float32)
    penalized = False
    for row, seq in enumerate(seqs):
        params = seq.sampling_params
        if not params.uses_logits_processors:
            continue
        output = _output_tokens(seq, pending_token) if params.needs_token_history else None
        if params.allowed_token_ids is not None:
            allowed_pair_rows.extend([len(allowed_rows)] * len(params.allowed_token_ids))
            allowed_rows.append(row)
            allowed_tokens.extend(params.allowed_token_ids)
        banned = _banned_tokens(seq, params, eos_token_ids, output)
        banned_rows.extend([row] * len(banned))
        banned_tokens.extend(banned)
        if params.logit_bias:
            bias_rows.extend([row] * len(params.logit_bias))
            bias_tokens.extend(params.logit_bias)
            bias_values.extend(params.logit_bias.values())
        if params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            penalized = True
            repetition[row] = params.repetition_penalty
            frequency[row] = params.frequency_penalty
            presence[row] = params.presence_penalty
            tokens, counts = np.unique(output, return_counts=True)
            if params.repetition_penalty != 1.0:
                # The repetition penalty also covers tokens only in the prompt (with no output count).
                prompt = np.frombuffer(seq.token_history, np.int32)[:seq.num_prompt_tokens]
                seen = np.union1d(prompt, tokens)
                seen_counts = np.zeros(len(seen), np.int64)
                seen_counts[np.searchsorted(seen, tokens)] = counts
                tokens, counts = seen, seen_counts
            penalty_rows.append(np.full(len(tokens), row, np.int32))
            penalty_tokens.append(tokens.astype(np.int32))
            penalty_counts.append(counts.astype(np.float32))
    if not (allowed_rows or banned_rows or bias_rows or penalized):
        return None

    def ints(values):
        return np.asarray(values, np.int32) if len(values) else None

    return ProcessorArrays(
        allowed_rows=ints(allowed_rows), allowed_pair_rows=ints(allowed_pair_rows), allowed_tokens=ints(allowed_tokens),
        banned_rows=ints(banned_rows), banned_tokens=ints(banned_tokens),
        bias_rows=ints(bias_rows), bias_tokens=ints(bias_tokens),
        bias_values=np.asarray(bias_values, np.float32) if bias_values else None,
        penalty_rows=np.concatenate(penalty_rows) if penalized else None,
        penalty_tokens=np.concatenate(penalty_tokens) if penalized else None,
        penalty_counts=np.concatenate(penalty_counts) if penalized else None,
        repetition=repetition if penalized else None,
        frequency=frequency if penalized else None,
        presence=presence if penalized else None,
    )


def apply_logits_processors(logits: torch.Tensor, processors: ProcessorTensors) -> torch.Tensor:
    """A float32 copy of logits [rows, vocab] with the processors applied (the input is left as it was: its
    log-probabilities are what requests asking for logprobs get)."""
    logits = logits.to(torch.float32, copy=True)
    p = processors
    if p.allowed_rows is not None:
        blocked = torch.ones((len(p.allowed_rows), logits.shape[-1]), dtype=torch.bool, device=logits.device)
        blocked[p.allowed_pair_rows, p.allowed_tokens] = False
        logits[p.allowed_rows] = logits[p.allowed_rows].masked_fill(blocked, float("-inf"))
    if p.banned_rows is not None:
        logits[p.banned_rows, p.banned_tokens] = float("-inf")
    if p.bias_rows is not None:
        logits.index_put_((p.bias_rows, p.bias_tokens), p.bias_values, accumulate=True)
    if p.penalty_rows is not None:
        rows, tokens, counts = p.penalty_rows, p.penalty_tokens, p.penalty_counts
        values = logits[rows, tokens]
        repetition = p.repetition[rows]
        # vLLM's (and CTRL's) rule: a positive logit is divided by the penalty, a negative one multiplied.
        values = torch.where(values > 0, values / repetition, values * repetition)
        values = values - p.frequency[rows] * counts - p.presence[rows] * (counts > 0).float()
        logits[rows, tokens] = values
    return logits
