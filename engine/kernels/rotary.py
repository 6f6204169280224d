"""Triton rotary embedding of q and k, optionally after their per-head RMSNorm (Qwen3), in one launch.

q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] may be views of the packed qkv
projection (strided over tokens). The table is engine.layers.rotary's float32 cos_sin [positions,
head_dim] = [cos | sin] per pair, in the rotate-half layout: pair i is (x[i], x[i + head_dim / 2]).
Numerics follow the torch code: the norm as engine.layers.norm.rms_norm (float32, cast to the
input dtype, then times the weight), the rotation in float32 on the (normed) values, rounded once.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    weight_ptr,
    token,
    stride_token,
    stride_head,
    cos,
    sin,
    eps,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HALF_PADDED: tl.constexpr,
    NORM: tl.constexpr,
):
    half = HEAD_DIM // 2
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    dims = tl.arange(0, HALF_PADDED)[None, :]
    mask = (heads < NUM_HEADS) & (dims < half)
    first = x_ptr + token * stride_token + heads * stride_head + dims
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + half, mask=mask, other=0.0)
    if NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(a * a + b * b, axis=1) * (1.0 / HEAD_DIM) + eps)[:, None]
        w1 = tl.load(weight_ptr + dims, mask=dims < half, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + half + dims, mask=dims < half, other=0.0).to(tl.float32)
        # rms_norm's roundings: to the input dtype, then the weight product to the output dtype.
        x1 = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(out_ptr.dtype.element_ty)
        x2 = ((b * rstd).to(x2.dtype).to(tl.float32) * w2).to(out_ptr.dtype.element_ty)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    out = out_ptr + token * (NUM_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    tl.store(out, (a * cos - b * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (b * cos + a * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(
    do_not_specialize=["q_stride_token", "q_stride_head", "k_stride_token", "k_stride_head"],
    # positions is read once per program: its alignment buys nothing, so it never forces a new variant.
    do_not_specialize_on_alignment=["q_ptr", "k_ptr", "positions_ptr"],
)
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    q_out_ptr,
    k_out_ptr,
    q_stride_token,
    q_stride_head,
    k_stride_token,
    k_stride_head,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    Q_HEADS_PADDED: tl.constexpr,
    K_HEADS_PADDED: tl.constexpr,
    HALF_PADDED: tl.constexpr,
    NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PADDED)[None, :]
    in_half = dims < HEAD_DIM // 2
    row = cos_sin_ptr + position * HEAD_DIM + dims
    cos = tl.load(row, mask=in_half, other=0.0)
    sin = tl.load(row + HEAD_DIM // 2, mask=in_half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, q_weight_ptr, token, q_stride_token, q_stride_head, cos, sin, eps,
                  NUM_Q_HEADS, HEAD_DIM, Q_HEADS_PADDED, HALF_PADDED, NORM)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, k_weight_ptr, token, k_stride_token, k_stride_head, cos, sin, eps,
                  NUM_K_HEADS, HEAD_DIM, K_HEADS_PADDED, HALF_PADDED, NORM)  # fmt: skip


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _tiling(num_q_heads: int, num_k_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(padded q heads, padded k heads, padded half head_dim, warps); plain ints, cheap per launch."""
    q_heads_padded, half_padded = _next_power_of_2(num_q_heads), _next_power_of_2(head_dim // 2)
    num_warps = 4 if q_heads_padded * half_padded <= 2048 else 8
    return q_heads_padded, _next_power_of_2(num_k_heads), half_padded, num_warps


def _launch(positions, q, k, cos_sin, q_weight, k_weight, eps):
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(
            f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} "
            "must share the token count and head_dim"
        )
    if head_dim % 2 or cos_sin.shape[-1] != head_dim or not cos_sin.is_contiguous():
        raise ValueError(f"rotary: cos_sin {tuple(cos_sin.shape)} must be a contiguous [positions, {head_dim}] table")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_dtype, k_dtype = q.dtype, k.dtype
    if q_weight is None:
        q_weight = k_weight = cos_sin  # unread
    else:
        if q_weight.dtype != q_dtype:
            q_dtype = torch.promote_types(q_dtype, q_weight.dtype)
        if k_weight.dtype != k_dtype:
            k_dtype = torch.promote_types(k_dtype, k_weight.dtype)
    q_out = torch.empty_like(q, dtype=q_dtype, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, dtype=k_dtype, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out, k_out
    q_heads_padded, k_heads_padded, half_padded, num_warps = _tiling(num_q_heads, num_k_heads, head_dim)
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_sin,
        q_weight,
        k_weight,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HEAD_DIM=head_dim,
        Q_HEADS_PADDED=q_heads_padded,
        K_HEADS_PADDED=k_heads_padded,
        HALF_PADDED=half_padded,
        NORM=q_weight is not cos_sin,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return q_out, k_out


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Rotate q and k [tokens, heads, head_dim] by the angles of their positions, as engine.layers.rotary does."""
    return _launch(positions, q, k, cos_sin, None, None, 0.0)


def norm_and_rotate(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                    q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float):
    """Per-head RMSNorm of q and k (weights [head_dim]), then the rotary embedding, in one launch."""
    if q_weight.shape != (q.shape[-1],) or k_weight.shape != (k.shape[-1],):
        raise ValueError(
            f"norm_and_rotate: weights {tuple(q_weight.shape)}, {tuple(k_weight.shape)} should be ({q.shape[-1]},)"
        )
    return _launch(positions, q, k, cos_sin, q_weight, k_weight, eps)
