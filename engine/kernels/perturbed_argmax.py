"""Triton row-wise argmax(logits / T - log(noise)), the sampler's last step, in one launch.

Rows with T == 0 are greedy: argmax(logits), reading no noise. Ties go to the lowest token id, as
torch.argmax does. One program walks one row in tiles, keeping the best value and token per lane.
"""

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 4096


@triton.jit(
    do_not_specialize=["vocab_size", "logits_stride", "noise_stride"],
    do_not_specialize_on_alignment=["temperatures_ptr"],
)
def _perturbed_argmax_kernel(
    logits_ptr,
    temperatures_ptr,
    noise_ptr,
    out_ptr,
    vocab_size,
    logits_stride,
    noise_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperatures_ptr + row)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_token = tl.zeros([BLOCK], tl.int32)
    logits_row = logits_ptr + row * logits_stride
    if temperature == 0:
        for start in range(0, vocab_size, BLOCK):
            tokens = start + lanes
            value = tl.load(logits_row + tokens, mask=tokens < vocab_size, other=float("-inf")).to(tl.float32)
            # Strictly greater: a lane keeps its earliest token among equals.
            better = value > best
            best = tl.where(better, value, best)
            best_token = tl.where(better, tokens, best_token)
    else:
        noise_row = noise_ptr + row * noise_stride
        for start in range(0, vocab_size, BLOCK):
            tokens = start + lanes
            in_vocab = tokens < vocab_size
            logit = tl.load(logits_row + tokens, mask=in_vocab, other=float("-inf")).to(tl.float32)
            noise = tl.load(noise_row + tokens, mask=in_vocab, other=1.0)
            # IEEE division, as torch's logits / T.
            value = tl.div_rn(logit, temperature) - tl.log(noise)
            better = value > best
            best = tl.where(better, value, best)
            best_token = tl.where(better, tokens, best_token)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_token, vocab_size), axis=0)
    tl.store(out_ptr + row, token.to(tl.int64))


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
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab_size))
    _perturbed_argmax_kernel[(num_rows,)](
        logits,
        temperatures,
        noise,
        out,
        vocab_size,
        logits.stride(0),
        noise.stride(0),
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False,
    )
    return out
