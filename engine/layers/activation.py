"""SwiGLU's gate: silu(gate) * up over a fused gate_up projection."""

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.fusion import fusable


@fusable("engine.kernels.silu_and_mul:silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu of the first half of the last dimension times the second half."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """Split the last dimension in halves [gate, up] and return silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
