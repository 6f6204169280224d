"""Triton flash attention of packed prompt chunks over the paged KV cache (chunked prefill, prefix-cache hits)."""

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from engine.kernels.attention_inputs import check_attention_inputs, entries_by_owner


@dataclass(frozen=True, slots=True)
class PrefillTiling:
    """Tile shape and launch settings of the prefill kernel."""

    block_m: int = 128
    """Rows per program: queries x the query heads packed with them (see pack_gqa)."""
    block_n: int = 64
    """Keys per inner-loop step; need not relate to the cache block size (each key looks up its block)."""
    num_warps: int = 8
    num_stages: int = 3
    pack_gqa: bool = True
    """One program serves all query heads of a KV head (rows = queries x heads), reading K/V once."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PrefillTiling.{name} must be a power of two >= 16, got {value}")


def default_prefill_tiling(head_dim: int) -> PrefillTiling:
    """The tiling measured fastest on an H100 for this head size (benchmarks/attention_kernels.py --sweep)."""
    if head_dim <= 64:
        return PrefillTiling(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillTiling(block_m=128, block_n=64, num_warps=4, num_stages=3)


@triton.jit
def _attend_key_tile(
    acc,
    row_sum,
    row_max,
    q,
    query_positions,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    key_start,
    context_len,
    head_offset,
    cache_stride_block,
    cache_stride_slot,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold one tile of BLOCK_N keys into the running softmax (row_max in log2 units, row_sum, acc)."""
    keys = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    if CAUSAL_MASK:
        # The last tile may run past the context: such keys read block 0 and are zeroed, since
        # unwritten cache memory may hold NaNs that 0 * NaN would spread.
        key_valid = keys < context_len
        block_ids = tl.load(block_table_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
    else:
        block_ids = tl.load(block_table_ptr + keys // BLOCK_SIZE).to(tl.int64)
    # Each key finds its own cache block, so BLOCK_N may span many blocks or part of one.
    slot_offsets = block_ids * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot + head_offset
    k_ptrs = k_cache_ptr + slot_offsets[None, :] + dims[:, None]
    v_ptrs = v_cache_ptr + slot_offsets[:, None] + dims[None, :]
    if CAUSAL_MASK:
        k = tl.load(k_ptrs, mask=key_valid[None, :] & (dims[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=key_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == HEAD_DIM_PADDED:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=dims[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    # Scaling inside exp2's argument lets scores * qk_scale - max compile to one FMA.
    scores = tl.dot(q, k, input_precision=PRECISION)
    if CAUSAL_MASK:
        scores = tl.where(keys[None, :] <= query_positions[:, None], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
    probs = tl.exp2(scores * qk_scale - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return acc, row_sum, new_max


# The table's width changes with every batch, and a mixed batch passes its per-sequence inputs from an
# offset (after the one-token rows): specializing on the width (== 1, multiple of 16) or on those
# pointers' alignment would compile new variants in the middle of serving.
@triton.jit(
    do_not_specialize=["block_tables_stride"],
    do_not_specialize_on_alignment=["cu_seqlens_q_ptr", "seq_lens_ptr", "block_tables_ptr", "tile_seqs_ptr",
                                    "tile_indices_ptr"],
)
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    tile_seqs_ptr,
    tile_indices_ptr,
    qk_scale,
    q_stride_token,
    q_stride_head,
    out_stride_token,
    out_stride_head,
    cache_stride_block,
    cache_stride_slot,
    cache_stride_head,
    block_tables_stride,
    QUERIES_PER_KV: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    TILE_MAP: tl.constexpr,
):
    """One program: BLOCK_M rows = BLOCK_Q queries x HEADS_PADDED heads that share one KV head."""
    head_program = tl.program_id(0)
    if TILE_MAP:
        # A fixed grid (CUDA graphs): entry i of the map names a (sequence, query tile); -1 is no work.
        entry = tl.program_id(1)
        seq = tl.load(tile_seqs_ptr + entry)
        if seq < 0:
            return
        tile = tl.load(tile_indices_ptr + entry)
        query_begin = tl.load(cu_seqlens_q_ptr + seq)
        query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - query_begin
    else:
        seq = tl.program_id(1)
        # Rank 0 is each sequence's last (longest, causal) query tile; the grid's slowest axis
        # is the rank, so the longest tiles start first and the short ones fill the tail.
        rank = tl.program_id(2)
        query_begin = tl.load(cu_seqlens_q_ptr + seq)
        query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - query_begin
        tile = tl.cdiv(query_len, BLOCK_Q) - 1 - rank
        if tile < 0:
            return  # the grid is an upper bound, sized without a host sync
    context_len = tl.load(seq_lens_ptr + seq)
    first_query = tile * BLOCK_Q

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    queries = first_query + rows // HEADS_PADDED
    heads = head_program * HEADS_PER_PROGRAM + rows % HEADS_PADDED
    row_valid = (queries < query_len) & (rows % HEADS_PADDED < HEADS_PER_PROGRAM)
    query_positions = context_len - query_len + queries
    tokens = (query_begin + queries).to(tl.int64)
    row_dim_valid = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    q_offsets = tokens[:, None] * q_stride_token + heads[:, None] * q_stride_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_dim_valid, other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # A finite floor keeps exp2(old_max - new_max) well defined for rows that saw no key yet.
    row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    head_offset = (head_program * HEADS_PER_PROGRAM // QUERIES_PER_KV) * cache_stride_head
    first_position = context_len - query_len + first_query
    last_position = tl.minimum(first_position + BLOCK_Q - 1, context_len - 1)
    # Keys before the tile's first query are visible to every row: no mask there.
    unmasked_end = (first_position + 1) // BLOCK_N * BLOCK_N
    for key_start in range(0, unmasked_end, BLOCK_N):
        acc, row_sum, row_max = _attend_key_tile(
            acc, row_sum, row_max, q, query_positions, k_cache_ptr, v_cache_ptr, block_table_ptr, key_start,
            context_len, head_offset, cache_stride_block, cache_stride_slot, qk_scale,
            HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    for key_start in range(unmasked_end, last_position + 1, BLOCK_N):
        acc, row_sum, row_max = _attend_key_tile(
            acc, row_sum, row_max, q, query_positions, k_cache_ptr, v_cache_ptr, block_table_ptr, key_start,
            context_len, head_offset, cache_stride_block, cache_stride_slot, qk_scale,
            HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, True, PRECISION,
        )  # fmt: skip

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out_offsets = tokens[:, None] * out_stride_token + heads[:, None] * out_stride_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_dim_valid)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    tiling: PrefillTiling | None = None,
    max_query_len: int | None = None,
    tile_map: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens q [T, Hq, D] over each sequence's cached context (new tokens included).

    max_query_len, an upper bound on any sequence's new tokens known to the caller without a
    device sync, trims the grid; out lets a caller reuse a buffer. tile_map (sequence, query tile)
    int32 arrays from prefill_tile_map() fix the grid at their length, for CUDA graphs: only the
    tiles listed are computed.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    check_attention_inputs("paged_prefill_attention", q, k_cache, v_cache, seq_lens, block_tables)
    if cu_seqlens_q.shape != (num_seqs + 1,):
        raise ValueError(
            f"paged_prefill_attention: cu_seqlens_q shape {tuple(cu_seqlens_q.shape)}, expected ({num_seqs + 1},)"
        )
    if not scale > 0:
        raise ValueError(f"paged_prefill_attention: scale must be positive, got {scale}")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    tiling = tiling or default_prefill_tiling(head_dim)
    queries_per_kv = num_q_heads // num_kv_heads
    # Packing a GQA group into one program reads each K/V tile once for all its query heads.
    heads_per_program = queries_per_kv if tiling.pack_gqa else 1
    heads_padded = triton.next_power_of_2(heads_per_program)
    block_m = max(tiling.block_m, heads_padded)
    if tile_map is not None:
        tile_seqs, tile_indices = tile_map
        grid = (num_q_heads // heads_per_program, tile_seqs.shape[0], 1)
    else:
        tile_seqs = tile_indices = cu_seqlens_q  # not read
        # Query tiles per sequence: bounded by max_query_len when the caller knows it, else by T.
        max_ranks = triton.cdiv(max_query_len or num_tokens, block_m // heads_padded)
        grid = (num_q_heads // heads_per_program, num_seqs, max_ranks)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(
            f"paged_prefill_attention: a grid of {grid[1]} x {grid[2]} programs exceeds CUDA's limit of 65535 "
            "per axis; pass max_query_len or split the batch"
        )
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        tile_seqs,
        tile_indices,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEADS_PER_PROGRAM=heads_per_program,
        HEADS_PADDED=heads_padded,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_Q=block_m // heads_padded,
        BLOCK_N=tiling.block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        TILE_MAP=tile_map is not None,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out


def prefill_query_tile(num_q_heads: int, num_kv_heads: int, head_dim: int, tiling: PrefillTiling | None = None) -> int:
    """Queries per program (BLOCK_Q) of paged_prefill_attention for this head layout."""
    tiling = tiling or default_prefill_tiling(head_dim)
    heads_per_program = num_q_heads // num_kv_heads if tiling.pack_gqa else 1
    heads_padded = triton.next_power_of_2(heads_per_program)
    return max(tiling.block_m, heads_padded) // heads_padded


def prefill_tile_map(query_lens: np.ndarray, block_q: int, capacity: int, first_seq: int = 0) -> np.ndarray:
    """[2, capacity] int32: (sequence, query tile) for every tile of sequences first_seq.., then -1.

    Each sequence's last tile (the longest, under the causal mask) comes first, so long work starts early.
    """
    query_lens = np.asarray(query_lens, dtype=np.int64)
    counts = -(-query_lens // block_q)
    counts[:first_seq] = 0
    total = int(counts.sum())
    if total > capacity:
        raise ValueError(f"prefill_tile_map: {total} query tiles exceed the map's capacity of {capacity}")
    result, _ = entries_by_owner(counts, capacity)
    # Within a sequence: tile count-1, count-2, ..., 0.
    result[1, :total] = np.repeat(counts - 1, counts) - result[1, :total]
    return result

