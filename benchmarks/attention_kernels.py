"""Time the Triton paged-attention kernels on a GPU and print a short table.

    python benchmarks/attention_kernels.py            # default tilings
    python benchmarks/attention_kernels.py --sweep    # also try other tilings, fastest first
    python benchmarks/attention_kernels.py --flash    # also the flash-attn backend beside Triton (needs flash_attn)

Decode is memory-bound: its figure is KV bytes read per second, set against the device
copy bandwidth measured in the same run. Prefill is compute-bound: causal attention
FLOP/s, set against torch's scaled_dot_product_attention on the same (dense) problem. Where the flash_attn
package is installed, the flash-attn backend (engine/kernels/flash_attn_backend.py) is timed beside the Triton
kernels on the same shapes, at block size 256 (the smallest its paged kernels take).
"""

import argparse
import math

import torch
import triton
import triton.testing

from engine.kernels import flash_attn_backend, reference
from engine.kernels.decode_attention import DecodeTiling, paged_decode_attention
from engine.kernels.prefill_attention import PrefillTiling, default_prefill_tiling, paged_prefill_attention
from engine.kernels.store_kvcache import store_kvcache

DTYPE = torch.bfloat16


def bench_ms(fn) -> float:
    """Median milliseconds of fn on the GPU."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6


def paged_cache(num_seqs: int, context_len: int, kv_heads: int, head_dim: int, block_size: int):
    """Random caches holding num_seqs contexts, with block tables in shuffled order."""
    blocks_per_seq = math.ceil(context_len / block_size)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(num_seqs, blocks_per_seq)
    return k_cache, v_cache, tables


def bench_decode(batch, context_len, q_heads, kv_heads, head_dim, block_size, tiling=None, backend="triton"):
    """(ms, GB/s of KV read, max abs error vs the torch reference) of the triton or flash-attn backend."""
    k_cache, v_cache, tables = paged_cache(batch, context_len, kv_heads, head_dim, block_size)
    q = torch.randn(batch, q_heads, head_dim, dtype=DTYPE, device="cuda")
    seq_lens = torch.full((batch,), context_len, dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, seq_lens, tables, head_dim**-0.5)
    def run():
        if backend == "flash-attn":
            return flash_attn_backend.paged_decode_attention(*args)
        return paged_decode_attention(*args, tiling=tiling)

    out = run()
    rows = slice(0, 8)  # the reference loops in Python: check a few rows
    expected = reference.paged_decode_attention(q[rows], k_cache, v_cache, seq_lens[rows], tables[rows], head_dim**-0.5)
    error = (out[rows].float() - expected.float()).abs().max().item()
    ms = bench_ms(run)
    kv_bytes = 2 * batch * context_len * kv_heads * head_dim * k_cache.element_size()
    return ms, kv_bytes / ms / 1e6, error


def causal_flops(query_lens, prefix_lens, q_heads, head_dim) -> float:
    """2 matmuls x 2 FLOP per multiply-add over every (query, visible key) pair."""
    pairs = sum(n * p + n * (n + 1) // 2 for n, p in zip(query_lens, prefix_lens))
    return 4.0 * pairs * q_heads * head_dim


def bench_prefill(num_seqs, query_len, prefix_len, q_heads, kv_heads, head_dim, block_size, tiling=None, hint=True,
                  backend="triton"):
    """(ms, TFLOP/s, max abs error vs the torch reference); hint passes max_query_len as a model runner would.

    The flash-attn backend reads the longest query and context on the host (one sync per call), as the engine pays.
    """
    context_len = prefix_len + query_len
    k_cache, v_cache, tables = paged_cache(num_seqs, context_len, kv_heads, head_dim, block_size)
    q = torch.randn(num_seqs * query_len, q_heads, head_dim, dtype=DTYPE, device="cuda")
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * query_len
    seq_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, cu, seq_lens, tables, head_dim**-0.5)
    max_query_len = query_len if hint else None
    def run():
        if backend == "flash-attn":
            return flash_attn_backend.paged_prefill_attention(*args)
        return paged_prefill_attention(*args, tiling=tiling, max_query_len=max_query_len)

    out = run()
    expected = reference.paged_prefill_attention(*args)
    error = (out.float() - expected.float()).abs().max().item()
    ms = bench_ms(run)
    flops = causal_flops([query_len] * num_seqs, [prefix_len] * num_seqs, q_heads, head_dim)
    return ms, flops / ms / 1e9, error


def bench_sdpa(num_seqs, seq_len, q_heads, kv_heads, head_dim):
    """torch SDPA (flash) on the same causal prompts, dense and unpaged: (ms, TFLOP/s)."""
    q = torch.randn(num_seqs, q_heads, seq_len, head_dim, dtype=DTYPE, device="cuda")
    k = torch.randn(num_seqs, kv_heads, seq_len, head_dim, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    return ms, causal_flops([seq_len] * num_seqs, [0] * num_seqs, q_heads, head_dim) / ms / 1e9


def bench_store(num_tokens, kv_heads, head_dim, block_size):
    """(ms, GB/s moved) for writing num_tokens rows of K and V into shuffled slots."""
    k_cache, v_cache, _ = paged_cache(1, num_tokens * 2, kv_heads, head_dim, block_size)
    key = torch.randn(num_tokens, kv_heads, head_dim, dtype=DTYPE, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(num_tokens * 2, device="cuda")[:num_tokens]
    ms = bench_ms(lambda: store_kvcache(key, value, k_cache, v_cache, slots))
    return ms, 2 * 2 * key.numel() * key.element_size() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tilings")
    parser.add_argument("--flash", action="store_true", help="also time the flash-attn backend (needs flash_attn)")
    args = parser.parse_args()
    if args.flash and not flash_attn_backend.flash_attn_available():
        parser.error("--flash needs the flash_attn package (it does not import here) and a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")

    print("\ndecode (split-K), bf16            ms     KV GB/s  % of copy  max err")
    for label, shape in [
        ("B256 ctx1024 32/8/128 bs16", (256, 1024, 32, 8, 128, 16)),
        ("B256 ctx1024 16/8/128 bs16", (256, 1024, 16, 8, 128, 16)),
        ("B64 ctx4096 32/8/128 bs16", (64, 4096, 32, 8, 128, 16)),
        ("B8 ctx16384 32/8/128 bs16", (8, 16384, 32, 8, 128, 16)),
        ("B256 ctx1024 32/8/128 bs256", (256, 1024, 32, 8, 128, 256)),
        ("B256 ctx1024 32/8/64 bs16", (256, 1024, 32, 8, 64, 16)),
    ]:
        ms, gbs, err = bench_decode(*shape)
        print(f"{label:32s} {ms:7.3f} {gbs:10.0f} {100 * gbs / copy_gbs:9.1f}%  {err:.1e}")

    print("\nprefill (causal), bf16            ms     TFLOP/s   max err")
    for label, shape in [
        ("8 x 1024 new, 32/8/128 bs16", (8, 1024, 0, 32, 8, 128, 16)),
        ("8 x 1024 new, 16/8/128 bs16", (8, 1024, 0, 16, 8, 128, 16)),
        ("8 x 512 new + 1536 cached", (8, 512, 1536, 32, 8, 128, 16)),
        ("1 x 8192 new, 32/8/128 bs16", (1, 8192, 0, 32, 8, 128, 16)),
        ("8 x 1024 new, 32/8/64 bs16", (8, 1024, 0, 32, 8, 64, 16)),
        ("8 x 1024 new, no max_query_len", (8, 1024, 0, 32, 8, 128, 16, None, False)),
    ]:
        ms, tflops, err = bench_prefill(*shape)
        print(f"{label:32s} {ms:7.3f} {tflops:10.1f}   {err:.1e}")
    ms, tflops = bench_sdpa(8, 1024, 32, 8, 128)
    print(f"{'torch SDPA dense 8 x 1024 32/8':32s} {ms:7.3f} {tflops:10.1f}   (baseline)")

    ms, gbs = bench_store(8192, 8, 128, 16)
    print(f"\nstore_kvcache 8192 tokens 8x128: {ms:.3f} ms, {gbs:.0f} GB/s")

    if args.flash:
        flash_beside_triton()
    if args.sweep:
        sweep()


def flash_beside_triton() -> None:
    """The flash-attn backend and the Triton kernels on the headline shapes at block size 256, side by side."""
    import flash_attn

    print(f"\nflash-attn {flash_attn.__version__} beside Triton, bf16, block size 256 (ratio: Triton ms / flash ms)")
    print(f"{'decode':32s} {'triton ms':>9} {'flash ms':>9} {'ratio':>6}  {'flash GB/s':>10}  triton err  flash err")
    for label, shape in [
        ("B256 ctx1024 32/8/128", (256, 1024, 32, 8, 128, 256)),
        ("B256 ctx1024 16/8/128", (256, 1024, 16, 8, 128, 256)),
        ("B64 ctx4096 32/8/128", (64, 4096, 32, 8, 128, 256)),
        ("B8 ctx16384 32/8/128", (8, 16384, 32, 8, 128, 256)),
    ]:
        t_ms, _, t_err = bench_decode(*shape)
        f_ms, f_gbs, f_err = bench_decode(*shape, backend="flash-attn")
        print(f"{label:32s} {t_ms:9.3f} {f_ms:9.3f} {t_ms / f_ms:6.2f}  {f_gbs:10.0f}  {t_err:9.1e}  {f_err:9.1e}")
    print(f"{'prefill':32s} {'triton ms':>9} {'flash ms':>9} {'ratio':>6}  {'flash TF/s':>10}  triton err  flash err")
    for label, shape in [
        ("8 x 1024 new, 32/8/128", (8, 1024, 0, 32, 8, 128, 256)),
        ("8 x 1024 new, 16/8/128", (8, 1024, 0, 16, 8, 128, 256)),
        ("8 x 512 new + 1536 cached", (8, 512, 1536, 32, 8, 128, 256)),
        ("1 x 8192 new, 32/8/128", (1, 8192, 0, 32, 8, 128, 256)),
    ]:
        t_ms, _, t_err = bench_prefill(*shape)
        f_ms, f_tflops, f_err = bench_prefill(*shape, backend="flash-attn")
        print(f"{label:32s} {t_ms:9.3f} {f_ms:9.3f} {t_ms / f_ms:6.2f}  {f_tflops:10.1f}  {t_err:9.1e}  {f_err:9.1e}")


def sweep() -> None:
    """Time other tilings of the headline shapes and print them fastest first."""
    decode_tilings = {
        128: [(512, 64, 4, 3), (512, 32, 4, 3), (512, 128, 4, 2), (1024, 128, 4, 2), (256, 64, 4, 3)],
        64: [(512, 64, 4, 3), (512, 128, 4, 2), (512, 128, 4, 3), (1024, 128, 4, 2), (512, 128, 8, 2)],
    }
    for head_dim, tilings in decode_tilings.items():
        print(f"\nsweep: decode B256 ctx1024 32/8/{head_dim} bs16 (partition, block_n, warps, stages)")
        results = []
        for partition, block_n, warps, stages in tilings:
            tiling = DecodeTiling(partition_size=partition, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                results.append((*bench_decode(256, 1024, 32, 8, head_dim, 16, tiling), tiling))
            except Exception as error:  # out of shared memory, say
                print(f"  {tiling}: failed: {type(error).__name__}: {str(error)[:80]}")
        for ms, gbs, err, t in sorted(results, key=lambda r: r[0]):
            shape = f"{t.partition_size} {t.block_n} {t.num_warps} {t.num_stages}"
            print(f"  {ms:.3f} ms {gbs:6.0f} GB/s err {err:.1e}  {shape}")

    prefill_tilings = {
        128: [
            (128, 64, 8, 3, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 2, True),
            (128, 64, 8, 2, True), (128, 32, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 4, 3, False),
        ],
        64: [(128, 64, 8, 3, True), (128, 64, 4, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 3, True)],
    }  # fmt: skip
    for head_dim, tilings in prefill_tilings.items():
        print(f"\nsweep: prefill 8 x 1024 32/8/{head_dim} bs16 (block_m, block_n, warps, stages, pack_gqa)")
        results = []
        for block_m, block_n, warps, stages, pack in tilings:
            tiling = PrefillTiling(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, pack_gqa=pack)
            try:
                results.append((*bench_prefill(8, 1024, 0, 32, 8, head_dim, 16, tiling), tiling))
            except Exception as error:
                print(f"  {tiling}: failed: {type(error).__name__}: {str(error)[:80]}")
        for ms, tflops, err, t in sorted(results, key=lambda r: r[0]):
            print(
                f"  {ms:.3f} ms {tflops:6.1f} TFLOP/s err {err:.1e}  "
                f"{t.block_m} {t.block_n} {t.num_warps} {t.num_stages} {t.pack_gqa}"
            )
    print(f"  defaults: {default_prefill_tiling(128)} / {default_prefill_tiling(64)}")

if __name__ == "__main__":
    main()
