"""Triton RMSNorm, optionally adding the residual first, in one launch.

Same numerics as engine.layers.norm: the sum x + residual is rounded to its dtype, normalized in
float32, cast back to that dtype, and only then multiplied by the weight. Rows are the last axis of
x (up to 16384 wide); x may be [rows, width] or [tokens, heads, width] with any strides outside the
last axis, so the per-head q/k norm can read straight from the packed qkv projection.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_WIDTH = 16384
# Elements one program normalizes: narrow rows (a head of q or k) are packed several to a program.
_TILE_ELEMENTS = 2048


@triton.jit(
    do_not_specialize=["num_rows", "heads", "x_stride_token", "x_stride_head", "res_stride_token", "res_stride_head"],
    # x and residual are not listed in do_not_specialize_on_alignment: in the model they are whole tensors
    # (aligned), and their alignment is what lets the CONTIGUOUS variant load 16 bytes at a time.
)
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    num_rows,
    heads,
    x_stride_token,
    x_stride_head,
    res_stride_token,
    res_stride_head,
    eps,
    WIDTH: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WIDTH: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK_WIDTH)[None, :]
    mask = (rows < num_rows) & (cols < WIDTH)
    out_offsets = rows * WIDTH + cols
    if CONTIGUOUS:
        # Row starts known at compile time: wide loads.
        x_offsets = out_offsets
        res_offsets = out_offsets
    else:
        token = rows // heads
        head = rows % heads
        x_offsets = token * x_stride_token + head * x_stride_head + cols
        res_offsets = token * res_stride_token + head * res_stride_head + cols
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + res_offsets, mask=mask, other=0.0)
        # Rounded to the sum's dtype before normalizing, as torch's x + residual is.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + out_offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    # Times 1 / WIDTH, as torch's mean scales its sum (Triton's plain float32 "/" is not IEEE-rounded).
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) * (1.0 / WIDTH) + eps)[:, None]
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
    # The product of two values of at most 16-bit dtypes is exact in float32: one rounding, as torch does.
    tl.store(out_ptr + out_offsets, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, heads, stride per token, stride per head) reading t as [tokens, heads, width] rows."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    dims = t.dim()
    if dims == 2:
        return t, 1, t.stride(0), 0
    if dims == 3:
        return t, t.shape[1], t.stride(0), t.stride(1)
    t = t.reshape(-1, t.shape[-1])
    return t, 1, t.stride(0), 0


@functools.cache
def _tiling(width: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) for rows of this width; plain ints, cheap per launch."""
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"rms_norm: rows of width {width}; supported widths are 1 to {MAX_WIDTH}")
    block_width = 1 << (width - 1).bit_length()
    block_rows = max(1, _TILE_ELEMENTS // block_width)
    elements = block_rows * block_width
    return block_rows, block_width, 4 if elements <= 2048 else (8 if elements <= 8192 else 16)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    width = x.shape[-1]
    block_rows, block_width, num_warps = _tiling(width)
    if weight.shape != (width,):
        raise ValueError(f"rms_norm: rows of width {width} need a weight of shape ({width},), got {tuple(weight.shape)}")
    x_rows, heads, x_stride_token, x_stride_head = _rows(x)
    sum_dtype = x.dtype
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
        res_rows, _, res_stride_token, res_stride_head = _rows(residual)
        if residual.dtype != sum_dtype:
            sum_dtype = torch.promote_types(sum_dtype, residual.dtype)
    else:
        res_rows, res_stride_token, res_stride_head = x_rows, 0, 0
    out_dtype = sum_dtype if weight.dtype == sum_dtype else torch.promote_types(sum_dtype, weight.dtype)
    out = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    total = out
    if residual is not None:
        total = torch.empty_like(x, dtype=sum_dtype, memory_format=torch.contiguous_format)
    num_rows = x_rows.numel() // width
    if num_rows == 0:
        return out, total
    _rms_norm_kernel[(-(-num_rows // block_rows),)](
        x_rows,
        res_rows,
        weight,
        out,
        total,
        num_rows,
        heads,
        x_stride_token,
        x_stride_head,
        res_stride_token,
        res_stride_head,
        eps,
        WIDTH=width,
        BLOCK_ROWS=block_rows,
        BLOCK_WIDTH=block_width,
        HAS_RESIDUAL=residual is not None,
        CONTIGUOUS=x.is_contiguous() and (residual is None or residual.is_contiguous()),
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last axis, as engine.layers.norm.rms_norm computes it."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual) in one launch."""
    return _launch(x, residual, weight, eps)
