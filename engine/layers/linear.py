"""Linear layers split across tensor-parallel ranks, each with a weight_loader for its checkpoint shards.

Column-parallel layers split the output features (no communication); row-parallel layers split the
input features and sum the partial outputs across ranks. QKV and gate_up are column-parallel layers
whose weight packs several checkpoint tensors, each loaded into its own slice.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_reduce_sum, tp_rank, tp_size


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight {name}: checkpoint shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (output features) split across ranks; each rank returns its slice."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.output_size_per_rank = _divide(output_size, self.tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's rows of a whole checkpoint tensor."""
        rows = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * rows, rows), "column-parallel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_proj and up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        """Copy this rank's rows of checkpoint tensor number shard_id into its slice of the packed weight."""
        shard_size = _divide(self.output_sizes[shard_id], self.tp_size, "merged output features")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        target = param.data.narrow(0, offset, shard_size)
        _copy_checked(target, loaded.narrow(0, self.tp_rank * shard_size, shard_size), f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """The packed q, k and v projections, split across ranks by heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        world = tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, world, "attention heads")
        self.num_kv_heads = _divide(num_kv_heads, world, "key/value heads")
        output_size = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        """Copy this rank's heads of the checkpoint's q_proj, k_proj or v_proj (shard_id "q", "k", "v")."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        target = param.data.narrow(0, offset, size)
        _copy_checked(target, loaded.narrow(0, self.tp_rank * size, size), f"qkv shard {shard_id}")


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (input features) split across ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.input_size_per_rank = _divide(input_size, self.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's columns of a whole checkpoint tensor."""
        cols = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * cols, cols), "row-parallel")

    def bias_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Copy the whole bias (added once, on rank 0, before the all-reduce)."""
        _copy_checked(param.data, loaded, "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce_sum(F.linear(x, self.weight, bias))
