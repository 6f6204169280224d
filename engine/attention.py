"""The attention layer over the paged KV cache, its per-step metadata, and the choice of kernel backend."""

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

BACKENDS = ("auto", "triton", "flash-attn", "torch")


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache; passed explicitly through the model's forward."""

    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each new token (block * block_size + offset); -1 writes nothing."""
    seq_lens: torch.Tensor
    """[num_seqs] context length of each sequence including this step's tokens (0 for a padded row)."""
    block_tables: torch.Tensor
    """[num_seqs, width] int32 block ids; entries past a sequence's blocks are never read."""
    cu_seqlens_q: torch.Tensor | None = None
    """[num_seqs + 1] offsets of each sequence's new tokens; None when every sequence has exactly one (decode)."""
    max_query_len: int = 0
    """The most new tokens of any sequence, known on the host (0: unknown); trims the prefill kernel's grid."""
    num_single: int = 0
    """In a batch with cu_seqlens_q: its leading rows that have one new token each (decodes, mostly)."""
    decode_seq_lens: torch.Tensor | None = None
    """Fixed layout (a CUDA graph of a step with prompt chunks): per sequence row, the context of a
    one-token row and 0 for the others (and for padding rows); None otherwise."""
    tile_map: tuple[torch.Tensor, torch.Tensor] | None = None
    """Fixed layout: the prefill kernel's (sequence, query tile) map, -1 past the tiles of this step."""
    decode_work: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """Fixed layout: the decode kernel's work map over the one-token rows (decode_work_map's map, per-row
    starts and partition size)."""

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    """The three kernels one backend provides, with the signatures of engine/kernels/reference.py."""

    name: str
    store_kvcache: Callable
    paged_prefill_attention: Callable
    paged_decode_attention: Callable
    splits_mixed_batches: bool = False
    """Give a mixed batch's one-token rows to the decode kernel: the prefill kernel pads each sequence's
    queries to a tile of many rows, wasted work for a row of one."""


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend_name(name: str, device: torch.device | str, block_size: int) -> str:
    """The concrete backend for a requested one ("auto" picks the fastest that runs here)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if not on_cuda:
            return "torch"
        # flash-attn's paged KV needs blocks of a multiple of 256 tokens; twinfer's default is 16.
        if _flash_attn_available() and block_size % 256 == 0:
            return "flash-attn"
        return "triton"
    if name in ("triton", "flash-attn") and not on_cuda:
        raise ValueError(f"attention_backend {name!r} needs a CUDA device; use 'torch' on {device}")
    if name == "flash-attn" and not _flash_attn_available():
        raise ValueError("attention_backend 'flash-attn' needs the flash_attn package, which is not installed")
    return name


def load_backend(name: str) -> AttentionBackend:
    """Import the kernels of a concrete backend name (triton, flash-attn or torch)."""
    if name == "torch":
        module = importlib.import_module("engine.kernels.reference")
        return AttentionBackend(name, module.store_kvcache, module.paged_prefill_attention,
                                module.paged_decode_attention)
    if name == "flash-attn":
        module = importlib.import_module("engine.kernels.flash_attn_backend")
        return AttentionBackend(name, module.store_kvcache, module.paged_prefill_attention,
                                module.paged_decode_attention)
    if name == "triton":
        store = importlib.import_module("engine.kernels.store_kvcache").store_kvcache
        prefill = importlib.import_module("engine.kernels.prefill_attention").paged_prefill_attention
        decode = importlib.import_module("engine.kernels.decode_attention").paged_decode_attention
        return AttentionBackend(name, store, prefill, decode, splits_mixed_batches=True)
    raise ValueError(f"attention backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")


class Attention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends each query to its sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend
        # Set by the model runner once the cache is allocated: [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, metadata.slot_mapping)
        if metadata.is_decode:
            return self.backend.paged_decode_attention(
                q, self.k_cache, self.v_cache, metadata.seq_lens, metadata.block_tables, self.scale
            )
        backend = self.backend
        if not backend.splits_mixed_batches:
            return backend.paged_prefill_attention(
                q, self.k_cache, self.v_cache, metadata.cu_seqlens_q, metadata.seq_lens, metadata.block_tables,
                self.scale,
            )
        if metadata.tile_map is not None:
            return self._fixed_layout(q, metadata)
        single = metadata.num_single
        # The prefill kernel reads each sequence's queries from cu_seqlens_q's absolute offsets, so the
        # rows after the single ones need no copy; the single rows go to the decode kernel's split-K.
        out = backend.paged_prefill_attention(
            q, self.k_cache, self.v_cache, metadata.cu_seqlens_q[single:], metadata.seq_lens[single:],
            metadata.block_tables[single:], self.scale, max_query_len=metadata.max_query_len or None,
        )
        if single:
            backend.paged_decode_attention(
                q[:single], self.k_cache, self.v_cache, metadata.seq_lens[:single], metadata.block_tables[:single],
                self.scale, out=out[:single],
            )
        return out

    def _fixed_layout(self, q: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """A step with prompt chunks in a CUDA graph: grids sized by the buffers, not by the batch. The decode
        kernel runs over its work map, the partitions of the one-token rows (the other sequence rows have
        context 0 and get zeros), then the prefill kernel writes the prompt chunks' rows from its tile map."""
        backend = self.backend
        out = torch.empty_like(q)
        rows = min(q.shape[0], metadata.decode_seq_lens.shape[0])
        work_map, starts, partition_size = metadata.decode_work
        backend.paged_decode_attention(
            q[:rows], self.k_cache, self.v_cache, metadata.decode_seq_lens[:rows], metadata.block_tables[:rows],
            self.scale, out=out[:rows], work=(work_map, starts[:rows], partition_size),
        )
        return backend.paged_prefill_attention(
            q, self.k_cache, self.v_cache, metadata.cu_seqlens_q, metadata.seq_lens, metadata.block_tables,
            self.scale, out=out, tile_map=metadata.tile_map,
        )
