"""Shape, dtype and layout checks shared by the Triton attention kernels' launchers, and the work maps (lists of
(owner, item) entries) that their fixed-layout grids run over."""

import numpy as np
import torch


def entries_by_owner(counts: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """[2, capacity] int32: (owner, index within the owner) for counts[i] consecutive entries of each owner i,
    -1 past the last; and each owner's first entry. The caller makes sure counts.sum() <= capacity."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    entries = np.full((2, capacity), -1, dtype=np.int32)
    entries[0, :total] = np.repeat(np.arange(len(counts)), counts)
    entries[1, :total] = np.arange(total) - np.repeat(starts, counts)
    return entries, starts


def check_attention_inputs(
    where: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """Reject inputs a kernel would silently misread, naming the function (where) and the problem."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"{where}: q must be [tokens, heads, head_dim] and the caches [blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"{where}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape or strides"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{where}: head_dim of q ({q.shape[2]}) and of the cache ({k_cache.shape[3]}) differ")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{where}: {q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"{where}: cache dtype {k_cache.dtype} differs from q dtype {q.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError(f"{where}: the head_dim axis of q and of the caches must be contiguous")
    if seq_lens.dim() != 1:
        raise ValueError(f"{where}: seq_lens must be 1-d [num_seqs], got {tuple(seq_lens.shape)}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.stride(1) != 1:
        raise ValueError(
            f"{where}: block_tables must be [{num_seqs}, max_blocks] with contiguous rows, "
            f"got {tuple(block_tables.shape)}"
        )
    for name, tensor in (("seq_lens", seq_lens), ("block_tables", block_tables)):
        if tensor.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: {name} must be int32 or int64, got {tensor.dtype}")
