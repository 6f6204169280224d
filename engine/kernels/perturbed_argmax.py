"""Triton row-wise argmax(logits / T - log(noise)), the sampler's last step, in one launch.

Rows with T == 0 are greedy: argmax(logits), reading no noise. Ties go to the lowest token id, as
torch.argmax does. A row of a small batch is split over several programs (one program per row
would leave most of the GPU idle while it reads 150k logits and noises): each writes its split's
best (value, token) to a scratch slot and counts itself in; the last to arrive reduces the row's
slots, always in split order (so the result does not depend on arrival order), and resets the
count for the next call. The scratch and the counts live in one buffer per device, allocated on
first use, so calls allocate nothing but their output; calls must not overlap on two streams.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 2048
# Programs one launch aims for (about two per SM of an H100): a row gets at most this many // rows splits.
_TARGET_PROGRAMS = 256


@triton.jit
def _best_in_range(logits_row, noise_row, temperature, start, end, lanes, BLOCK: tl.constexpr):
    """(value, token) of the row's best token in [start, end); on ties the lowest token."""
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = tl.full([BLOCK], 2147483647, tl.int32)
    if temperature == 0:
        for block_start in range(start, end, BLOCK):
            tokens = block_start + lanes
            value = tl.load(logits_row + tokens, mask=tokens < end, other=float("-inf")).to(tl.float32)
            # Strictly greater: a lane keeps its earliest token among equals.
            better = value > best
            best = tl.where(better, value, best)
            best_token = tl.where(better, tokens, best_token)
    else:
        for block_start in range(start, end, BLOCK):
            tokens = block_start + lanes
            in_range = tokens < end
            logit = tl.load(logits_row + tokens, mask=in_range, other=float("-inf")).to(tl.float32)
            noise = tl.load(noise_row + tokens, mask=in_range, other=1.0)
            # IEEE division, as torch's logits / T.
            value = tl.div_rn(logit, temperature) - tl.log(noise)
            better = value > best
            best = tl.where(better, value, best)
            best_token = tl.where(better, tokens, best_token)
    top = tl.max(best, axis=0)
    # A range of -inf only (every token filtered out) still names its first token, as torch.argmax does.
    token = tl.min(tl.where(best == top, best_token, 2147483647), axis=0)
    token = tl.where(top == float("-inf"), start, token)
    return top, token


@triton.jit(
    do_not_specialize=["vocab_size", "logits_stride", "noise_stride", "split_size", "num_splits"],
    do_not_specialize_on_alignment=["temperatures_ptr"],
)
def _perturbed_argmax_kernel(
    logits_ptr,
    temperatures_ptr,
    noise_ptr,
    out_ptr,
    scratch_ptr,
    vocab_size,
    logits_stride,
    noise_stride,
    split_size,
    num_splits,
    BLOCK: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    start = split * split_size
    end = tl.minimum(start + split_size, vocab_size)
    row64 = row.to(tl.int64)
    value, token = _best_in_range(logits_ptr + row64 * logits_stride, noise_ptr + row64 * noise_stride,
                                  temperature, start, end, tl.arange(0, BLOCK), BLOCK)  # fmt: skip
    if num_splits == 1:
        tl.store(out_ptr + row64, token.to(tl.int64))
    else:
        # scratch: [MAX_SPLITS] values (float32 bits), [MAX_SPLITS] tokens, [MAX_SPLITS] arrival counts per row.
        slot = row * num_splits + split
        tl.store(scratch_ptr + slot, value.to(tl.int32, bitcast=True))
        tl.store(scratch_ptr + MAX_SPLITS + slot, token)
        # acq_rel: this split's slot is visible before its count, and the last arrival sees every slot.
        arrived = tl.atomic_add(scratch_ptr + 2 * MAX_SPLITS + row, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            splits = tl.arange(0, MAX_SPLITS)
            mine = splits < num_splits
            slots = row * num_splits + splits
            values = tl.load(scratch_ptr + slots, mask=mine, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True)
            values = tl.where(mine, values, float("-inf"))
            tokens = tl.load(scratch_ptr + MAX_SPLITS + slots, mask=mine, other=2147483647, cache_modifier=".cg")
            top = tl.max(values, axis=0)
            # Splits cover increasing token ranges: the lowest token among the best values is the first of them.
            best_token = tl.min(tl.where(values == top, tokens, 2147483647), axis=0)
            tl.store(out_ptr + row64, best_token.to(tl.int64))
            tl.store(scratch_ptr + 2 * MAX_SPLITS + row, 0)


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device) -> torch.Tensor:
    buffer = _SCRATCH.get(device)
    if buffer is None:
        # Zeroed once: the arrival counts must start at 0; every reducing program puts its row's back to 0.
        buffer = _SCRATCH[device] = torch.zeros(3 * _TARGET_PROGRAMS, dtype=torch.int32, device=device)
    return buffer


def perturbed_argmax(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Token ids [rows] (int64): argmax(logits / T - log(noise)) per row, argmax(logits) where T == 0."""
    num_rows, vocab_size = logits.shape
    if temperatures.shape != (num_rows,) or noise.shape != logits.shape:
        raise ValueError(
            f"perturbed_argmax: logits {tuple(logits.shape)} need temperatures ({num_rows},) and noise of the same "
            f"shape, got {tuple(temperatures.shape)} and {tuple(noise.shape)}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if noise.stride(-1) != 1:
        noise = noise.contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    num_blocks = -(-vocab_size // _BLOCK)
    num_splits = max(1, min(num_blocks, _TARGET_PROGRAMS // num_rows))
    split_size = -(-num_blocks // num_splits) * _BLOCK
    num_splits = -(-vocab_size // split_size)  # no empty split
    _perturbed_argmax_kernel[(num_rows, num_splits)](
        logits,
        temperatures,
        noise,
        out,
        _scratch(out.device),
        vocab_size,
        logits.stride(0),
        noise.stride(0),
        split_size,
        num_splits,
        BLOCK=_BLOCK,
        MAX_SPLITS=_TARGET_PROGRAMS,
        num_warps=8,
        enable_fp_fusion=False,
    )
    return out
