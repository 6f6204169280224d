"""Paged attention in plain torch: the `torch` backend and the readable statement of what the kernels compute."""

import torch
import torch.nn.functional as F


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value rows [N, num_kv_heads, head_dim] into their cache slots; slot -1 skips the row."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # flatten(0, 1) is a view of a contiguous cache, so the index_put below writes the cache itself.
    k_cache.flatten(0, 1)[slots] = key[keep].to(k_cache.dtype)
    v_cache.flatten(0, 1)[slots] = value[keep].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len cached rows of one sequence, [context_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:context_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, scale: float) -> torch.Tensor:
    """Causal attention of queries at first_position.. over keys at 0..; q [L, Hq, D], k/v [C, Hkv, D]."""
    query_positions = torch.arange(q.shape[0], device=q.device) + first_position
    key_positions = torch.arange(k.shape[0], device=q.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=visible,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed new tokens q [T, Hq, D] over each sequence's cached context (new tokens included)."""
    out = torch.zeros_like(q)
    starts = cu_seqlens_q.tolist()
    context_lens = seq_lens.tolist()
    for seq, context_len in enumerate(context_lens):
        start, end = starts[seq], starts[seq + 1]
        if end == start:
            continue
        k = _gather_context(k_cache, block_tables[seq], context_len)
        v = _gather_context(v_cache, block_tables[seq], context_len)
        out[start:end] = _attend(q[start:end], k.to(q.dtype), v.to(q.dtype), context_len - (end - start), scale)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, Hq, D], over its whole cached context; empty rows give zeros."""
    out = torch.zeros_like(q)
    for seq, context_len in enumerate(seq_lens.tolist()):
        if context_len == 0:
            continue
        k = _gather_context(k_cache, block_tables[seq], context_len)
        v = _gather_context(v_cache, block_tables[seq], context_len)
        out[seq : seq + 1] = _attend(q[seq : seq + 1], k.to(q.dtype), v.to(q.dtype), context_len - 1, scale)
    return out
