"""Do operators run slower over a serving engine's memory footprint than over the operator profile's? (issue 15)

The operator profile rotates each operator's inputs over about three times the L2 (weights, KV blocks), enough to
miss the cache; a serving engine reads its weights from a 16-64 GB model and its KV blocks scattered over a cache
of 100 GB or more. With the composed replay term fixed, 8B-class decode steps run 3-4% longer than composed.
This times, in CUDA graphs as the profile does:
- the paged decode kernel (Qwen3-8B heads) with its blocks in the profile's small pool, and scattered over a
  pool of --kv-gib;
- decode-sized GEMMs (m 32) of the 8B and 32B gate/up projections, one weight rotated as the profile does, and
  one distinct weight per layer (the model's real footprint).

    python3 benchmarks/footprint_check.py [--kv-gib 80] [--out footprint.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F

from simulator.attention_profile import PagedCase
from simulator.operator_profile import profile_context
from simulator.operator_shapes import BLOCK_SIZE

LAYOUT = (32, 8, 128)  # Qwen3-8B's heads, KV heads, head dim
# (name, n, k, layers): gate/up projections; per layer one weight of n x k.
GEMMS = [("qwen3-8b gate_up", 24576, 4096, 36), ("qwen3-32b gate_up", 51200, 5120, 64)]
SMALL_GEMMS = [("a small check", 256, 128, 4)]


def decode_seconds(context, pool_blocks: int, num_seqs: int, context_len: int, layers: int) -> float:
    """One decode-attention call, `layers` block tables in turn, blocks drawn at random from a pool of pool_blocks."""
    heads, kv_heads, head_dim = LAYOUT
    needed = -(-context_len // BLOCK_SIZE)
    shape = (pool_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=context.dtype, device=context.device).normal_()
    v_cache = torch.empty(shape, dtype=context.dtype, device=context.device).normal_()
    # Distinct blocks for every (layer, sequence, position), as an engine's block tables hold them.
    order = torch.randperm(pool_blocks, device=context.device)[: layers * num_seqs * needed]
    case = PagedCase(k_cache, v_cache, order.view(layers, num_seqs, needed), layers)
    tables = case.tables(num_seqs, needed)
    q = context.random(num_seqs, heads, head_dim)
    lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=context.device)
    call = lambda i: context.backend.paged_decode_attention(  # noqa: E731
        q, k_cache, v_cache, lens, tables[i % layers], head_dim**-0.5)
    seconds, _, _ = context.timer.seconds(call, calls=layers)
    del k_cache, v_cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds


def gemm_seconds(context, n: int, k: int, copies: int, m: int = 32) -> float:
    weights = context.random(copies, n, k)
    x = context.random(m, k)
    seconds, _, _ = context.timer.seconds(lambda i: F.linear(x, weights[i % copies]), calls=max(copies, 16))
    del weights
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-gib", type=float, default=80.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a check that the script runs (tiny --kv-gib)")
    args = parser.parse_args()
    with torch.inference_mode():
        device = torch.device(args.device)
        context = profile_context(device, torch.bfloat16 if device.type == "cuda" else torch.float32, None)
        block_bytes = BLOCK_SIZE * LAYOUT[1] * LAYOUT[2] * context.itemsize * 2
        results = {"decode_attention": [], "gemm": []}
        for num_seqs, context_len in [(32, 1400), (8, 4000), (64, 700)] if device.type == "cuda" else [(2, 40)]:
            needed = -(-context_len // BLOCK_SIZE)
            small = 36 * num_seqs * needed  # the 36 layers' blocks and nothing more: a few hundred MiB
            large = int(args.kv_gib * (1 << 30) / block_bytes)
            row = {"num_seqs": num_seqs, "context_len": context_len,
                   "small_pool_gib": small * block_bytes / (1 << 30), "large_pool_gib": args.kv_gib,
                   "small_s": decode_seconds(context, small, num_seqs, context_len, 36),
                   "large_s": decode_seconds(context, large, num_seqs, context_len, 36)}
            row["ratio"] = row["large_s"] / row["small_s"]
            results["decode_attention"].append(row)
        for name, n, k, layers in GEMMS if device.type == "cuda" else SMALL_GEMMS:
            rotated = context.copies(n * k * context.itemsize)
            row = {"gemm": name, "n": n, "k": k, "profile_copies": rotated, "model_copies": layers,
                   "model_gib": layers * n * k * context.itemsize / (1 << 30),
                   "profile_s": gemm_seconds(context, n, k, rotated), "model_s": gemm_seconds(context, n, k, layers)}
            row["ratio"] = row["model_s"] / row["profile_s"]
            results["gemm"].append(row)
    print(f"{'case':<40} {'profile-like us':>15} {'footprint us':>13} {'ratio':>7}")
    for row in results["decode_attention"]:
        label = f"decode attn {row['num_seqs']}x{row['context_len']} ({row['small_pool_gib']:.2f} vs {args.kv_gib:.0f} GiB)"
        print(f"{label:<40} {row['small_s'] * 1e6:>15.1f} {row['large_s'] * 1e6:>13.1f} {row['ratio']:>7.3f}")
    for row in results["gemm"]:
        label = f"{row['gemm']} m32 ({row['profile_copies']} vs {row['model_copies']} weights)"
        print(f"{label:<40} {row['profile_s'] * 1e6:>15.1f} {row['model_s'] * 1e6:>13.1f} {row['ratio']:>7.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
