"""Log-probabilities for requests that ask (vLLM v0.11's logprobs and prompt_logprobs): computed on the device
from the model's raw logits, then turned into TokenLogprobs on the host."""

import torch

from engine.scheduler_output import TokenLogprobs


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> tuple[torch.Tensor, ...]:
    """Under softmax(logits) [rows, vocab]: the log-probabilities of token_ids [rows] and their 1-based ranks
    (ties ranked ahead, as vLLM counts them), and the num_top most likely tokens with theirs."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids.long()[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen[:, 0], ranks, top_ids, top_logprobs


def to_token_logprobs(token_ids: list[int], computed: tuple[torch.Tensor, ...],
                      counts: list[int]) -> list[TokenLogprobs]:
    """compute_logprobs' tensors as one TokenLogprobs per row (the chosen token, then the row's count of top
    tokens; -1: every one computed). Reading them waits for the device."""
    chosen, ranks, top_ids, top_logprobs = (tensor.tolist() for tensor in computed)
    entries = []
    for row, (token_id, count) in enumerate(zip(token_ids, counts)):
        count = len(top_ids[row]) if count == -1 else count
        entries.append(TokenLogprobs([token_id] + top_ids[row][:count], [chosen[row]] + top_logprobs[row][:count],
                                     [ranks[row]] + list(range(1, count + 1))))
    return entries
