"""Rotary position embedding (the rotate-half layout of Hugging Face Llama/Qwen), with Llama-3 frequency scaling."""

import math

import torch
from torch import nn

from engine.layers.fusion import fusable
from engine.layers.norm import RMSNorm, rms_norm
from engine.model_config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, float32 [head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "default":
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k [tokens, heads, head_dim] by their positions, from a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, rope)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        # float32 table, built on CPU so every device rotates by exactly the same angles.
        table = torch.cat([angles.cos(), angles.sin()], dim=-1)
        self.register_buffer("cos_sin", table.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k); given per-head norms (Qwen3), q and k are normalized first, in the same kernel when fused."""
        if q_norm is None:
            return apply_rotary(positions, q, k, self.cos_sin)
        if q_norm.eps != k_norm.eps:
            raise ValueError(f"RotaryEmbedding: q_norm eps {q_norm.eps} differs from k_norm eps {k_norm.eps}")
        return norm_and_rotate(positions, q, k, self.cos_sin, q_norm.weight, k_norm.weight, q_norm.eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@fusable("engine.kernels.rotary:apply_rotary")
def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Rotate q and k [tokens, heads, head_dim] by the angles of their positions (float32 math)."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@fusable("engine.kernels.rotary:norm_and_rotate")
def norm_and_rotate(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                    q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float):
    """Per-head RMSNorm of q and k (Qwen3's q_norm and k_norm over head_dim), then apply_rotary."""
    return apply_rotary(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos_sin)
