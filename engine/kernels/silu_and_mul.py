"""Triton SwiGLU gate: x [tokens, 2 * I] -> silu(x[:, :I]) * x[:, I:] in one launch."""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit(do_not_specialize=["x_stride_token"])
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride_token, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr,
                         CONTIGUOUS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    if CONTIGUOUS:
        row = x_ptr + token * (2 * INTERMEDIATE)  # a row start known at compile time: wide loads
    else:
        row = x_ptr + token * x_stride_token
    gate = tl.load(row + cols, mask=mask, other=0.0)
    up = tl.load(row + INTERMEDIATE + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Rounded to x's dtype after the silu and after the product, as the two torch ops round.
    activated = tl.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype)  # IEEE division, as torch's silu
    out = (activated.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * INTERMEDIATE + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu of the first half of the last axis times the second half.

    The silu is computed in float32 and rounded to x's dtype, then the product in float32 rounded again:
    the same two roundings as torch's F.silu(gate) * up (the float32 silu itself may differ in its last bit).
    """
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"silu_and_mul: the last axis ({width}) must hold two equal halves [gate, up]")
    intermediate = width // 2
    if x.dim() == 2:
        out = x.new_empty((x.shape[0], intermediate))
    else:
        out = x.new_empty((*x.shape[:-1], intermediate))
        x = x.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens = x.shape[0]
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(_BLOCK, 1 << (intermediate - 1).bit_length())
    _silu_and_mul_kernel[(num_tokens, -(-intermediate // block))](
        x, out, x.stride(0), INTERMEDIATE=intermediate, BLOCK=block, CONTIGUOUS=x.is_contiguous(), num_warps=4, enable_fp_fusion=False
    )
    return out
