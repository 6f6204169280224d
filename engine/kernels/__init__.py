"""Attention kernels over the paged KV cache: Triton (GPU), plain torch (any device), flash-attn (optional).

Every backend offers the same functions with the same signatures: store_kvcache,
paged_prefill_attention and paged_decode_attention. The cache of one layer is
k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], where slot s
lives at block s // block_size, offset s % block_size.

Triton: engine.kernels.store_kvcache, .prefill_attention, .decode_attention.
Torch: engine.kernels.reference. flash-attn: engine.kernels.flash_attn_backend.
Importing this package imports neither triton nor flash_attn.
"""
