"""Paged attention through the flash-attn 2 package, when it is installed (it is optional; imported lazily).

Block-size requirement: flash-attn 2's paged KV path (block_table given to
flash_attn_varlen_func or flash_attn_with_kvcache) rejects caches whose block size
is not a multiple of 256 ("Paged KV cache block size must be divisible by 256",
csrc/flash_attn/flash_api.cpp; the flash_attn_with_kvcache docstring says the same).
So this backend needs EngineConfig(block_size=256) (or 512, ...); the default 16 is refused here
with a clear error rather than inside the extension.

flash-attn has no kernel for writing a paged cache slot by slot: store_kvcache here is
the Triton one (a CUDA machine that runs flash-attn runs Triton).
"""

import importlib.util

import torch

FLASH_ATTN_BLOCK_MULTIPLE = 256


def flash_attn_available() -> bool:
    """True when the flash_attn package imports and a CUDA device is present."""
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:  # installed for another torch or CUDA: its extension fails to load
        return False
    return True


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value rows [N, num_kv_heads, head_dim] into their cache slots; slot -1 skips the row."""
    from engine.kernels.store_kvcache import store_kvcache as triton_store_kvcache

    triton_store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def _check_head_dim(where: str, head_dim: int) -> None:
    """Refuse a head dim the installed package has no kernels for: a build that names its head dims
    (TWINFER_HEAD_DIMS, set by benchmarks/build_flash_attn.sh's forward-only build) was seen to crash on others
    rather than refuse them. (An import of a loaded module is a dictionary lookup.)"""
    import flash_attn

    head_dims = getattr(flash_attn, "TWINFER_HEAD_DIMS", None)
    if head_dims is not None and head_dim not in head_dims:
        raise ValueError(
            f"{where}: this flash-attn build has kernels for head_dim {', '.join(map(str, head_dims))} only, and the "
            f"model's is {head_dim}; use the triton attention backend, or a full flash-attn build"
        )


def _check_block_size(where: str, k_cache: torch.Tensor) -> None:
    """Refuse caches whose block size flash-attn 2's paged kernels cannot read."""
    block_size = k_cache.shape[1]
    if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
        raise ValueError(
            f"{where}: flash-attn 2 paged KV needs a block size divisible by {FLASH_ATTN_BLOCK_MULTIPLE}, "
            f"the cache has {block_size}; use block_size=256 or the triton/torch attention backend"
        )


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
    _check_block_size("flash_attn paged_prefill_attention", k_cache)
    _check_head_dim("flash_attn paged_prefill_attention", q.shape[-1])
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(seq_lens, 0, out=cu_seqlens_k[1:])
    # flash-attn takes the maxima as Python ints: one host sync, acceptable for eager prefill.
    max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    max_seqlen_k = int(seq_lens.max())
    # causal=True aligns the mask bottom-right (query i of L sees keys <= i + C - L): the chunked-prefill rule.
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q.to(torch.int32),
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=scale,
        causal=True,
        block_table=block_tables.to(torch.int32),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence, q [B, Hq, D], over its whole cached context; empty rows give zeros."""
    _check_block_size("flash_attn paged_decode_attention", k_cache)
    _check_head_dim("flash_attn paged_decode_attention", q.shape[-1])
    from flash_attn import flash_attn_with_kvcache

    # flash-attn splits long contexts itself (num_splits=0: its heuristic) and, with no
    # host sync, is CUDA-graph safe; a row with cache_seqlens 0 sees no key and gives zeros.
    out = flash_attn_with_kvcache(
        q.unsqueeze(1),
        k_cache,
        v_cache,
        cache_seqlens=seq_lens.to(torch.int32),
        block_table=block_tables.to(torch.int32),
        softmax_scale=scale,
        causal=True,
    )
    return out.squeeze(1)
