"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_gather_last_dim, all_reduce_sum, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary's rows; lookups are summed across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        # The vocabulary is padded up to a multiple of the TP degree; padded rows are zero and never chosen.
        self.vocab_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's rows of the whole [vocab, hidden] checkpoint tensor, zero-padding the tail."""
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"embedding weight: checkpoint shape {tuple(loaded.shape)} != expected ({self.vocab_size}, {param.shape[1]})"
            )
        rows = min(self.vocab_per_rank, self.vocab_size - self.vocab_start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.vocab_start:self.vocab_start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce_sum(embedded)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary; each rank computes its slice, then they are gathered."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(F.linear(hidden_states, self.weight))
        return logits[..., :self.vocab_size] if logits.shape[-1] != self.vocab_size else logits
