"""Triton split-K ("flash decoding") attention of one new token per sequence over the paged KV cache.

A first kernel gives each (sequence, KV head, context partition) its own program, which
attends all query heads of the KV head's group at once so K and V are read once per group;
a second kernel merges the partitions' partial softmaxes. Grid and scratch sizes come
from the block table's width alone, never from the data: CUDA-graph safe.

Inside a CUDA graph of a step with prompt chunks, whose sequence rows are mostly padding, the grid
instead runs over a work map (decode_work_map): the (sequence, partition) pairs of this step's rows,
listed on the host, in a buffer of fixed capacity, with the partition size chosen per step so they fit.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from engine.kernels.attention_inputs import check_attention_inputs, entries_by_owner
from engine.kernels.decode_tiling import DecodeTiling, decode_partition_size  # noqa: F401 (re-exported)


# The table's width and the partition count change with the batch in eager steps: specializing on
# them (== 1, multiple of 16) would compile new variants in the middle of serving.
@triton.jit(do_not_specialize=["num_partitions", "block_tables_stride", "work_stride"])
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    work_ptr,
    partition_size_ptr,
    work_stride,
    qk_scale,
    num_q_heads,
    num_partitions,
    q_stride_seq,
    q_stride_head,
    cache_stride_block,
    cache_stride_slot,
    cache_stride_head,
    block_tables_stride,
    QUERIES_PER_KV: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    WORK_MAP: tl.constexpr,
):
    kv_head = tl.program_id(1)
    if WORK_MAP:
        # Program (item, KV head): the item's sequence and partition come from the map (-1: past its entries).
        item = tl.program_id(0)
        seq = tl.maximum(tl.load(work_ptr + item), 0)
        partition = tl.load(work_ptr + work_stride + item)  # the map's second row (a view: its own stride)
        partition_size = tl.load(partition_size_ptr)
        key_begin = partition * partition_size
    else:
        seq = tl.program_id(0)
        partition = tl.program_id(2)
        key_begin = partition * PARTITION_SIZE
    context_len = tl.load(seq_lens_ptr + seq)
    if key_begin >= context_len or key_begin < 0:
        return  # partitions past the context (and padding rows, context 0; unused map entries) do nothing
    if WORK_MAP:
        key_end = tl.minimum(key_begin + partition_size, context_len)
    else:
        key_end = tl.minimum(key_begin + PARTITION_SIZE, context_len)

    heads = tl.arange(0, HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    head_valid = heads < QUERIES_PER_KV
    dim_valid = dims < HEAD_DIM
    q_heads = kv_head * QUERIES_PER_KV + heads
    q_offsets = seq.to(tl.int64) * q_stride_seq + q_heads[:, None] * q_stride_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=head_valid[:, None] & dim_valid[None, :], other=0.0)

    acc = tl.zeros([HEADS_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)
    row_sum = tl.zeros([HEADS_PADDED], dtype=tl.float32)
    row_max = tl.full([HEADS_PADDED], -1.0e30, dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * block_tables_stride
    head_offset = kv_head * cache_stride_head
    for key_start in range(key_begin, key_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
        block_ids = tl.load(block_table_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot_offsets = block_ids * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot + head_offset
        # Keys past the context are zeroed: unwritten cache memory may hold NaNs.
        k = tl.load(
            k_cache_ptr + slot_offsets[None, :] + dims[:, None],
            mask=key_valid[None, :] & dim_valid[:, None],
            other=0.0,
        )
        v = tl.load(
            v_cache_ptr + slot_offsets[:, None] + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        scores = tl.dot(q, k, input_precision=PRECISION)
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        probs = tl.exp2(scores * qk_scale - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    if WORK_MAP:
        rows = item.to(tl.int64) * num_q_heads + q_heads
    else:
        rows = (seq * num_q_heads + q_heads).to(tl.int64) * num_partitions + partition
    tl.store(partial_max_ptr + rows, row_max, mask=head_valid)
    tl.store(partial_sum_ptr + rows, row_sum, mask=head_valid)
    tl.store(
        partial_out_ptr + rows[:, None] * HEAD_DIM_PADDED + dims[None, :],
        acc / row_sum[:, None],
        mask=head_valid[:, None],
    )


@triton.jit(do_not_specialize=["num_partitions"])
def _decode_reduce_kernel(
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    out_ptr,
    work_starts_ptr,
    partition_size_ptr,
    num_partitions,
    out_stride_seq,
    out_stride_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    PARTITIONS_PADDED: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    WORK_MAP: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(seq_lens_ptr + seq)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    out_offsets = seq.to(tl.int64) * out_stride_seq + head * out_stride_head + dims
    if context_len == 0:
        # A padding row has no partition: zeros, without the merge below (most rows of a mixed-step graph).
        tl.store(out_ptr + out_offsets, tl.zeros([HEAD_DIM_PADDED], dtype=out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
        return
    partitions = tl.arange(0, PARTITIONS_PADDED)
    if WORK_MAP:
        # A sequence's partitions are consecutive map entries from its start.
        used = tl.cdiv(context_len, tl.load(partition_size_ptr))
        rows = (tl.load(work_starts_ptr + seq) + partitions).to(tl.int64) * tl.num_programs(1) + head
    else:
        used = tl.cdiv(context_len, PARTITION_SIZE)
        rows = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions + partitions
    valid = partitions < used
    maxes = tl.load(partial_max_ptr + rows, mask=valid, other=-1.0e30)
    sums = tl.load(partial_sum_ptr + rows, mask=valid, other=0.0)
    weights = tl.where(valid, tl.exp2(maxes - tl.max(maxes, 0)) * sums, 0.0)
    total = tl.sum(weights, 0)
    parts = tl.load(partial_out_ptr + rows[:, None] * HEAD_DIM_PADDED + dims[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / total
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def decode_work_map(
    context_lens, capacity: int, partition_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The decode kernel's work map for rows of these contexts (0: no decode): ([2, capacity] int32 of each
    entry's sequence row and partition, -1 past the last), each row's first entry, and the partition size:
    partition_size (no less than that of the tiling the kernel runs with), doubled until the entries fit
    capacity (each row fits in one partition at worst). None: DecodeTiling's default."""
    partition_size = partition_size or DecodeTiling().partition_size
    lens = np.asarray(context_lens, dtype=np.int64)
    if np.count_nonzero(lens) > capacity:
        raise ValueError(f"decode work map: {np.count_nonzero(lens)} decode rows do not fit its capacity {capacity}")
    counts = -(-lens // partition_size)
    while counts.sum() > capacity:
        partition_size *= 2
        counts = -(-lens // partition_size)
    work, starts = entries_by_owner(counts, capacity)
    return work, starts.astype(np.int32), partition_size


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    tiling: DecodeTiling | None = None,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, Hq, D], over its whole cached context; empty rows give zeros.

    work: decode_work_map's (map [2, capacity], starts [B], partition size [1]) on the device. The grid then
    runs over the map's entries instead of every row times the widest table's partitions: for a CUDA graph's
    fixed layout, whose rows are mostly padding, that grid would be mostly idle programs, and any bound on it
    gives long rows one long partition (a 16k-token context in one program took milliseconds per step). The
    map's partition size must be at least tiling's (the reduce's width comes from it): decode_work_map's
    default is DecodeTiling's.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    block_size = k_cache.shape[1]
    check_attention_inputs("paged_decode_attention", q, k_cache, v_cache, seq_lens, block_tables)
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"paged_decode_attention: seq_lens has {seq_lens.shape[0]} rows but q has {num_seqs}")
    if not scale > 0:
        raise ValueError(f"paged_decode_attention: scale must be positive, got {scale}")
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    tiling = tiling or DecodeTiling()
    queries_per_kv = num_q_heads // num_kv_heads
    head_dim_padded = max(16, triton.next_power_of_2(head_dim))
    table_tokens = block_tables.shape[1] * block_size
    if work is None:
        partition_size = decode_partition_size(table_tokens, tiling)
        num_partitions = max(1, triton.cdiv(table_tokens, partition_size))
        grid = (num_seqs, num_kv_heads, num_partitions)
        scratch_rows = num_seqs * num_q_heads * num_partitions
        work_map = work_starts = work_partition = seq_lens  # unread
        work_stride = 0
    else:
        work_map, work_starts, work_partition = work
        capacity, work_stride = work_map.shape[1], work_map.stride(0)
        if work_map.shape[0] != 2 or work_starts.shape != (num_seqs,) or work_partition.numel() != 1:
            raise ValueError("paged_decode_attention: work must be (map [2, capacity], starts [B], partition size [1])")
        # The smallest partition the map may use: a row's partitions number at most the table's tokens over it.
        partition_size = tiling.partition_size
        num_partitions = max(1, triton.cdiv(table_tokens, partition_size))
        grid = (capacity, num_kv_heads, 1)
        scratch_rows = capacity * num_q_heads
    # Scratch sized by the table's width (or the map's capacity): the same every replay of a CUDA graph.
    partial_out = torch.empty((scratch_rows, head_dim_padded), dtype=torch.float32, device=q.device)
    partial_max = torch.empty(scratch_rows, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    _decode_partition_kernel[grid](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        partial_out,
        partial_max,
        partial_sum,
        work_map,
        work_partition,
        work_stride,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        num_q_heads,
        num_partitions,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        # tl.dot needs at least 16 rows: small GQA groups are padded with masked heads.
        HEADS_PADDED=max(16, triton.next_power_of_2(queries_per_kv)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SIZE=block_size,
        BLOCK_N=min(tiling.block_n, partition_size),
        PARTITION_SIZE=partition_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WORK_MAP=work is not None,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    _decode_reduce_kernel[(num_seqs, num_q_heads)](
        partial_out,
        partial_max,
        partial_sum,
        seq_lens,
        out,
        work_starts,
        work_partition,
        num_partitions,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        PARTITIONS_PADDED=triton.next_power_of_2(num_partitions),
        PARTITION_SIZE=partition_size,
        WORK_MAP=work is not None,
        num_warps=4,
    )
    return out
