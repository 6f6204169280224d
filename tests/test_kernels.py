"""Paged attention kernels (Triton and torch backends) against an independent float64 computation.

On a machine without CUDA the Triton kernels run under Triton's interpreter, which must be
switched on before triton is first imported. When another test module imported triton
first, the Triton tests here rerun this file in a fresh interpreter process.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# First: it switches Triton's interpreter on before any kernel module imports triton.
from tests.triton_interpreter import (  # noqa: I001
    CUDA as _CUDA,
    DEVICE,
    NOT_HERE,
    TRITON_RUNS_HERE as _TRITON_RUNS_HERE,
    rerun_in_fresh_process,
    runs_elsewhere,
)

from engine.kernels import reference
from engine.kernels.decode_attention import DecodeTiling, decode_partition_size, decode_work_map
from engine.kernels.decode_attention import paged_decode_attention as triton_decode
from engine.kernels.prefill_attention import PrefillTiling
from engine.kernels.prefill_attention import paged_prefill_attention as triton_prefill
from engine.kernels.store_kvcache import store_kvcache as triton_store

# Small tiles so that the tiny test shapes still cross tile, block and partition edges.
SMALL_PREFILL = PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1)
SMALL_DECODE = DecodeTiling(partition_size=16, block_n=16, num_warps=4, num_stages=1)

BACKENDS = ["triton", "torch"]
PREFILL_BACKENDS = ["triton", "triton_one_head_per_program", "torch"]


def _backend(name: str):
    """(store, prefill, decode) of a backend, skipping Triton where it cannot run in this process."""
    if name == "torch":
        return reference.store_kvcache, reference.paged_prefill_attention, reference.paged_decode_attention
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    prefill_tiling = SMALL_PREFILL
    if name == "triton_one_head_per_program":
        prefill_tiling = PrefillTiling(block_m=16, block_n=16, num_warps=4, num_stages=1, pack_gqa=False)

    def prefill(*args):
        return triton_prefill(*args, tiling=prefill_tiling)

    def decode(*args):
        return triton_decode(*args, tiling=SMALL_DECODE)

    return triton_store, prefill, decode


@runs_elsewhere
def test_triton_kernels_in_fresh_process():
    rerun_in_fresh_process(__file__)


# ---------------------------------------------------------------- float64 truth and paged layout


def attention_float64(q, keys, values, first_position: int, scale: float) -> torch.Tensor:
    """Causal softmax attention in float64, written out: q [L, Hq, D] at first_position..; keys/values [C, Hkv, D]."""
    if q.shape[0] == 0:
        return q.double()
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,chd->hlc", q.double(), keys) * scale
    query_positions = first_position + torch.arange(q.shape[0])
    visible = torch.arange(keys.shape[0])[None, :] <= query_positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("hlc,chd->lhd", weights, values)


class PagedContexts:
    """Random per-sequence K/V scattered into a NaN-filled paged cache through shuffled block tables.

    Unused slots and the table's padding block hold NaN, so a kernel that reads past a
    context or through a padding entry turns its output into NaN.
    """

    def __init__(self, context_lens, num_kv_heads, head_dim, block_size, generator, dtype=torch.float32):
        self.context_lens = list(context_lens)
        def rows(n):
            return torch.randn(n, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)

        self.keys = [rows(n) for n in context_lens]
        self.values = [rows(n) for n in context_lens]
        blocks_per_seq = [-(-n // block_size) for n in context_lens]
        num_blocks = sum(blocks_per_seq) + 2
        order = torch.randperm(num_blocks, generator=generator)
        padding_block = int(order[-1])  # never written: all NaN
        max_blocks = max(blocks_per_seq) + 2
        table = torch.full((len(context_lens), max_blocks), padding_block, dtype=torch.int32)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        next_block = 0
        for seq, n in enumerate(context_lens):
            table[seq, : blocks_per_seq[seq]] = order[next_block : next_block + blocks_per_seq[seq]].int()
            next_block += blocks_per_seq[seq]
            positions = torch.arange(n)
            blocks = table[seq, positions // block_size].long()
            self.k_cache[blocks, positions % block_size] = self.keys[seq].to(dtype)
            self.v_cache[blocks, positions % block_size] = self.values[seq].to(dtype)
        self.block_tables = table
        self.k_cache, self.v_cache, self.block_tables = (
            t.to(DEVICE) for t in (self.k_cache, self.v_cache, self.block_tables)
        )

    @property
    def seq_lens(self) -> torch.Tensor:
        return torch.tensor(self.context_lens, dtype=torch.int32, device=DEVICE)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    actual = actual.double().cpu()
    assert torch.isfinite(actual).all(), "output holds NaN or inf"
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


# ---------------------------------------------------------------- store_kvcache


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_kvcache_writes_slots_and_skips_minus_one(backend):
    store, _, _ = _backend(backend)
    generator = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 24
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    # key/value as views of a fused qkv projection: rows are not contiguous.
    qkv = torch.randn(5, 3 * num_kv_heads, head_dim, generator=generator).to(DEVICE)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.tensor([7, -1, 0, 23, 12], dtype=torch.int64, device=DEVICE)
    store(key, value, k_cache, v_cache, slots)

    flat_k, flat_v = k_cache.flatten(0, 1).cpu(), v_cache.flatten(0, 1).cpu()
    written = {7: 0, 0: 2, 23: 3, 12: 4}
    for slot, row in written.items():
        assert torch.equal(flat_k[slot], key[row].cpu())
        assert torch.equal(flat_v[slot], value[row].cpu())
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert not flat_k[untouched].any() and not flat_v[untouched].any(), "the slot -1 row (or another) leaked"


# ---------------------------------------------------------------- prefill

PREFILL_CASES = {
    # name: (query_lens, cached_prefix_lens, q_heads, kv_heads, head_dim, block_size)
    "ragged_on_block_edges": ([1, 16, 17, 32], [0, 0, 0, 0], 2, 2, 16, 16),
    "cached_prefix_gqa": ([5, 0, 1, 20], [4, 9, 7, 0], 4, 2, 32, 4),
    "chunk_after_long_prefix_big_blocks": ([9, 33], [40, 31], 4, 1, 24, 32),
    "group_of_three_heads": ([3, 13], [2, 0], 6, 2, 16, 8),
}


@pytest.mark.parametrize("backend", PREFILL_BACKENDS)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_float64(backend, case):
    _, prefill, _ = _backend(backend)
    query_lens, prefix_lens, q_heads, kv_heads, head_dim, block_size = PREFILL_CASES[case]
    generator = torch.Generator().manual_seed(2)
    context_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    paged = PagedContexts(context_lens, kv_heads, head_dim, block_size, generator)
    queries = [torch.randn(n, q_heads, head_dim, generator=generator, dtype=torch.float64) for n in query_lens]
    q = torch.cat(queries).float().to(DEVICE)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5

    out = prefill(q, paged.k_cache, paged.v_cache, cu_seqlens_q, paged.seq_lens, paged.block_tables, scale)

    expected = torch.cat(
        [
            attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], scale)
            for s in range(len(query_lens))
        ]
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, expected, 1e-4)


def test_prefill_with_max_query_len_hint_matches_float64():
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    generator = torch.Generator().manual_seed(7)
    query_lens, prefix_lens = [2, 21, 1], [30, 0, 5]
    paged = PagedContexts([p + n for p, n in zip(prefix_lens, query_lens)], 2, 16, 8, generator)
    queries = [torch.randn(n, 4, 16, generator=generator, dtype=torch.float64) for n in query_lens]
    cu = torch.tensor([0, 2, 23, 24], dtype=torch.int32, device=DEVICE)
    out = triton_prefill(
        torch.cat(queries).float().to(DEVICE), paged.k_cache, paged.v_cache, cu, paged.seq_lens, paged.block_tables,
        0.25, tiling=SMALL_PREFILL, max_query_len=21,
    )  # fmt: skip
    expected = torch.cat(
        [attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], 0.25) for s in range(3)]
    )
    _assert_close(out, expected, 1e-4)


def test_prefill_over_a_tile_map_computes_the_listed_tiles_only():
    """The fixed-grid form (CUDA graphs): tiles of sequences 2.. are listed, padding entries are -1; the
    one-token rows of sequences 0 and 1 are left to the decode kernel and stay untouched here."""
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    from engine.kernels.prefill_attention import prefill_query_tile, prefill_tile_map

    generator = torch.Generator().manual_seed(5)
    query_lens, prefix_lens = [1, 1, 7, 20, 9], [12, 3, 0, 5, 17]
    paged = PagedContexts([p + n for p, n in zip(prefix_lens, query_lens)], 2, 16, 4, generator)
    queries = [torch.randn(n, 4, 16, generator=generator, dtype=torch.float64) for n in query_lens]
    q = torch.cat(queries).float().to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    block_q = prefill_query_tile(4, 2, 16, SMALL_PREFILL)
    tile_map = torch.from_numpy(prefill_tile_map(query_lens, block_q, capacity=12, first_seq=2)).to(DEVICE)
    assert (tile_map[0] >= 0).sum() == 1 + 3 + 2  # 7, 20 and 9 queries in tiles of 8
    out = torch.zeros_like(q)

    triton_prefill(q, paged.k_cache, paged.v_cache, cu, paged.seq_lens, paged.block_tables, 0.25, out=out,
                   tiling=SMALL_PREFILL, tile_map=(tile_map[0], tile_map[1]))

    assert not out[:2].any()
    expected = torch.cat(
        [attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], 0.25) for s in range(2, 5)]
    )
    _assert_close(out[2:], expected, 1e-4)


def _small_triton_layer(paged: PagedContexts):
    """An attention layer (4 query heads, 2 KV heads, head_dim 16) over paged's cache, with the Triton backend at
    the small tilings: mixed batches split between its decode and prefill kernels."""
    from engine.attention import Attention, AttentionBackend

    backend = AttentionBackend(
        "triton", triton_store, lambda *a, **k: triton_prefill(*a, tiling=SMALL_PREFILL, **k),
        lambda *a, **k: triton_decode(*a, tiling=SMALL_DECODE, **k), splits_mixed_batches=True,
    )  # fmt: skip
    layer = Attention(4, 2, 16, 0.25, backend)
    layer.k_cache, layer.v_cache = paged.k_cache, paged.v_cache
    return layer


def test_mixed_batch_split_between_decode_and_prefill_kernels_matches_float64():
    """A step of one-token rows (decodes, a one-token prompt) then prompt chunks: the triton backend gives the
    one-token rows to its decode kernel and the rest to its prefill kernel, in one output."""
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    from engine.attention import AttentionMetadata

    generator = torch.Generator().manual_seed(11)
    query_lens, prefix_lens = [1, 1, 1, 9, 12], [16, 0, 39, 5, 0]
    context_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    paged = PagedContexts(context_lens, 2, 16, 4, generator)
    queries = [torch.randn(n, 4, 16, generator=generator, dtype=torch.float64) for n in query_lens]
    q = torch.cat(queries).float().to(DEVICE)
    layer = _small_triton_layer(paged)
    total = sum(query_lens)
    metadata = AttentionMetadata(
        slot_mapping=torch.full((total,), -1, dtype=torch.int32, device=DEVICE), seq_lens=paged.seq_lens,
        block_tables=paged.block_tables,
        cu_seqlens_q=torch.tensor([0, 1, 2, 3, 12, 24], dtype=torch.int32, device=DEVICE),
        max_query_len=12, num_single=3,
    )  # fmt: skip
    unused_kv = torch.zeros(total, 2, 16, device=DEVICE)

    out = layer(q, unused_kv, unused_kv, metadata)

    expected = torch.cat(
        [attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], 0.25) for s in range(5)]
    )
    _assert_close(out, expected, 1e-4)


def test_fixed_layout_of_a_mixed_batch_matches_float64():
    """The CUDA-graph form of a mixed step: 3 token rows and 2 sequence rows of padding; one-token rows first,
    decode context per sequence row (0 for the prompt chunks and padding), tile map over the chunks."""
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    from engine.attention import AttentionMetadata
    from engine.kernels.prefill_attention import prefill_query_tile, prefill_tile_map

    generator = torch.Generator().manual_seed(13)
    query_lens, prefix_lens = [1, 1, 6, 11], [16, 0, 3, 0]
    context_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    paged = PagedContexts(context_lens + [0, 0], 2, 16, 4, generator)  # two padding sequence rows
    queries = [torch.randn(n, 4, 16, generator=generator, dtype=torch.float64) for n in query_lens]
    total, padded = sum(query_lens), sum(query_lens) + 3
    q = torch.cat([torch.cat(queries), torch.randn(3, 4, 16, generator=generator, dtype=torch.float64)]).float()
    layer = _small_triton_layer(paged)
    cu = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    cu += [cu[-1]] * 2  # padding sequences: no queries
    tile_map = torch.from_numpy(prefill_tile_map(query_lens + [0, 0], prefill_query_tile(4, 2, 16, SMALL_PREFILL),
                                                 capacity=8, first_seq=2)).to(DEVICE)
    metadata = AttentionMetadata(
        slot_mapping=torch.full((padded,), -1, dtype=torch.int32, device=DEVICE), seq_lens=paged.seq_lens,
        block_tables=paged.block_tables, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        decode_seq_lens=torch.tensor([17, 1, 0, 0, 0, 0], dtype=torch.int32, device=DEVICE),
        tile_map=(tile_map[0], tile_map[1]), decode_work=_device_work_map([17, 1, 0, 0, 0, 0], 4, partition_size=16),
    )  # fmt: skip
    unused_kv = torch.zeros(padded, 2, 16, device=DEVICE)

    out = layer(q.to(DEVICE), unused_kv, unused_kv, metadata)

    expected = torch.cat(
        [attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], 0.25) for s in range(4)]
    )
    assert out.shape == (padded, 4, 16)
    _assert_close(out[:total], expected, 1e-4)


# ---------------------------------------------------------------- decode

DECODE_CASES = {
    # name: (context_lens (0 = padding row), q_heads, kv_heads, head_dim, block_size)
    "several_partitions_gqa_with_padding_rows": ([1, 16, 70, 0, 33, 0], 4, 2, 32, 4),
    "mha_big_blocks_partition_edges": ([64, 5, 32], 2, 2, 24, 32),
    "wide_group": ([48, 17], 8, 1, 16, 16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_float64(backend, case):
    _, _, decode = _backend(backend)
    context_lens, q_heads, kv_heads, head_dim, block_size = DECODE_CASES[case]
    generator = torch.Generator().manual_seed(3)
    paged = PagedContexts(context_lens, kv_heads, head_dim, block_size, generator)
    q64 = torch.randn(len(context_lens), q_heads, head_dim, generator=generator, dtype=torch.float64)
    scale = head_dim**-0.5

    out = decode(q64.float().to(DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, scale)

    expected = torch.zeros_like(q64)
    for seq, n in enumerate(context_lens):
        if n:
            expected[seq] = attention_float64(q64[seq : seq + 1], paged.keys[seq], paged.values[seq], n - 1, scale)[0]
    _assert_close(out, expected, 1e-4)


def test_decode_partition_grows_for_long_tables():
    tiling = DecodeTiling(partition_size=512, max_partitions=4)
    assert decode_partition_size(2048, tiling) == 512
    assert decode_partition_size(2049, tiling) == 1024
    assert decode_partition_size(100_000, tiling) == 32768


def _device_work_map(context_lens, capacity, partition_size=512):
    work_map, starts, size = decode_work_map(context_lens, capacity, partition_size)
    as_tensor = lambda array: torch.as_tensor(array, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return as_tensor(work_map), as_tensor(starts), as_tensor([size])


def test_decode_work_map_lists_each_rows_partitions_and_grows_them_to_fit():
    work_map, starts, size = decode_work_map([1200, 0, 512, 1], capacity=8)
    assert size == 512
    assert work_map[0].tolist() == [0, 0, 0, 2, 3, -1, -1, -1] and work_map[1].tolist() == [0, 1, 2, 0, 0, -1, -1, -1]
    assert starts.tolist() == [0, 3, 3, 4]
    # 16k-token rows: partitions of 512 would need 65 entries, of 4,096 still 9; 8 fit with partitions of 8,192.
    work_map, starts, size = decode_work_map([16384, 16384, 100], capacity=8)
    assert size == 8192 and work_map[0].tolist() == [0, 0, 1, 1, 2, -1, -1, -1] and starts.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="3 decode rows do not fit its capacity 2"):
        decode_work_map([5, 5, 5], capacity=2)


@pytest.mark.parametrize("capacity", [16, 5])  # 5: too few entries for partitions of 16, so they grow
def test_decode_over_a_work_map_matches_float64(capacity):
    """The mixed-step graph's decode: the grid runs over the map's entries (spare ones do nothing), padding
    rows get zeros, and a map forced to longer partitions gives the same attention."""
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    generator = torch.Generator().manual_seed(5)
    context_lens = [70, 0, 33, 1]
    paged = PagedContexts(context_lens, 1, 16, 4, generator)
    q64 = torch.randn(4, 2, 16, generator=generator, dtype=torch.float64)
    tiling = DecodeTiling(partition_size=16, block_n=16, num_stages=1)
    work_map, starts, partition_size = _device_work_map(context_lens, capacity, partition_size=16)
    assert (partition_size.item() > 16) == (capacity == 5)
    # The graphs pass a column slice of a wider buffer: its rows are not capacity apart.
    wider = torch.full((2, capacity + 7), -1, dtype=torch.int32, device=DEVICE)
    wider[:, :capacity] = work_map
    work = (wider[:, :capacity], starts, partition_size)
    out = triton_decode(q64.float().to(DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables,
                        0.25, tiling=tiling, work=work)
    expected = torch.zeros_like(q64)
    for s, n in enumerate(context_lens):
        if n:
            expected[s] = attention_float64(q64[s : s + 1], paged.keys[s], paged.values[s], n - 1, 0.25)[0]
    _assert_close(out, expected, 1e-4)


def test_decode_with_grown_partitions_matches_float64():
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    generator = torch.Generator().manual_seed(4)
    context_lens = [50, 3]
    paged = PagedContexts(context_lens, 1, 16, 4, generator)
    q64 = torch.randn(2, 2, 16, generator=generator, dtype=torch.float64)
    tiling = DecodeTiling(partition_size=16, block_n=16, max_partitions=2, num_stages=1)
    out = triton_decode(
        q64.float().to(DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, 0.25, tiling=tiling
    )
    expected = torch.stack(
        [
            attention_float64(q64[s : s + 1], paged.keys[s], paged.values[s], n - 1, 0.25)[0]
            for s, n in enumerate(context_lens)
        ]
    )
    _assert_close(out, expected, 1e-4)


# ---------------------------------------------------------------- random batches


@st.composite
def paged_batches(draw):
    """A random prefill batch: per sequence a cached prefix and a chunk of new tokens, plus cache geometry."""
    num_seqs = draw(st.integers(1, 4))
    prefix_lens = draw(st.lists(st.integers(0, 40), min_size=num_seqs, max_size=num_seqs))
    query_lens = draw(st.lists(st.integers(0, 24), min_size=num_seqs, max_size=num_seqs))
    query_lens[draw(st.integers(0, num_seqs - 1))] += 1  # at least one new token in the batch
    q_heads, kv_heads = draw(st.sampled_from([(2, 2), (4, 2), (4, 1), (6, 2)]))
    head_dim = draw(st.sampled_from([16, 24]))
    block_size = draw(st.sampled_from([4, 8, 16, 32]))
    return prefix_lens, query_lens, q_heads, kv_heads, head_dim, block_size, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(batch=paged_batches())
def test_triton_kernels_match_float64_on_random_batches(batch):
    if not _TRITON_RUNS_HERE:
        pytest.skip(NOT_HERE)
    prefix_lens, query_lens, q_heads, kv_heads, head_dim, block_size, seed = batch
    generator = torch.Generator().manual_seed(seed)
    context_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    paged = PagedContexts(context_lens, kv_heads, head_dim, block_size, generator)
    queries = [torch.randn(n, q_heads, head_dim, generator=generator, dtype=torch.float64) for n in query_lens]
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = triton_prefill(
        torch.cat(queries).float().to(DEVICE), paged.k_cache, paged.v_cache, cu, paged.seq_lens, paged.block_tables,
        scale, tiling=SMALL_PREFILL,
    )  # fmt: skip
    expected = torch.cat(
        [
            attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], scale)
            for s in range(len(query_lens))
        ]
    )
    _assert_close(out, expected, 1e-4)

    # Decode the next token of every sequence over the same cache (a context of 0 is a padding row).
    q_decode = torch.randn(len(context_lens), q_heads, head_dim, generator=generator, dtype=torch.float64)
    out = triton_decode(
        q_decode.float().to(DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, scale,
        tiling=SMALL_DECODE,
    )  # fmt: skip
    expected = torch.zeros_like(q_decode)
    for s, n in enumerate(context_lens):
        if n:
            expected[s] = attention_float64(q_decode[s : s + 1], paged.keys[s], paged.values[s], n - 1, scale)[0]
    _assert_close(out, expected, 1e-4)


# ---------------------------------------------------------------- errors


def test_mismatched_heads_are_rejected_by_name():
    q = torch.zeros(3, 3, 16, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 16, device=DEVICE)
    seq_lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="paged_prefill_attention: 3 query heads are not a multiple of 2 KV heads"):
        triton_prefill(q, cache, cache, cu, seq_lens, tables, 1.0)
    with pytest.raises(ValueError, match="paged_decode_attention: seq_lens has 1 rows but q has 3"):
        triton_decode(torch.zeros(3, 2, 16, device=DEVICE), cache, cache, seq_lens, tables, 1.0)


# ---------------------------------------------------------------- on the GPU: bf16, real shapes, CUDA graphs

needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_real_shapes_on_gpu(head_dim):
    generator = torch.Generator().manual_seed(5)
    q_heads, kv_heads, block_size = 16, 8, 16
    prefix_lens, query_lens = [0, 100, 513, 0], [700, 37, 128, 1]
    context_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    paged = PagedContexts(context_lens, kv_heads, head_dim, block_size, generator, dtype=torch.bfloat16)
    queries = [torch.randn(n, q_heads, head_dim, generator=generator, dtype=torch.float64) for n in query_lens]
    q = torch.cat(queries).to(DEVICE, torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = triton_prefill(q, paged.k_cache, paged.v_cache, cu, paged.seq_lens, paged.block_tables, scale)
    expected = torch.cat(
        [attention_float64(queries[s], paged.keys[s], paged.values[s], prefix_lens[s], scale) for s in range(4)]
    )
    _assert_close(out, expected, 3e-2)

    q_decode = torch.randn(4, q_heads, head_dim, generator=generator, dtype=torch.float64)
    out = triton_decode(
        q_decode.to(DEVICE, torch.bfloat16), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, scale
    )
    expected = torch.stack(
        [
            attention_float64(q_decode[s : s + 1], paged.keys[s], paged.values[s], n - 1, scale)[0]
            for s, n in enumerate(context_lens)
        ]
    )
    _assert_close(out, expected, 3e-2)


@needs_cuda
def test_decode_replays_in_a_cuda_graph():
    generator = torch.Generator().manual_seed(6)
    paged = PagedContexts([300, 1000, 17], 8, 128, 16, generator, dtype=torch.bfloat16)
    q = torch.randn(3, 16, 128, generator=generator).to(DEVICE, torch.bfloat16)
    seq_lens = paged.seq_lens.clone()
    out = torch.empty_like(q)
    args = (q, paged.k_cache, paged.v_cache, seq_lens, paged.block_tables, 128**-0.5)
    triton_decode(*args, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_decode(*args, out=out)
    for lens in ([300, 1000, 17], [1, 999, 0], [256, 512, 16]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        expected = reference.paged_decode_attention(*args)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- flash-attn backend (optional package)


def test_flash_attn_backend_refuses_small_blocks_before_importing():
    from engine.kernels import flash_attn_backend

    cache = torch.zeros(2, 16, 1, 16)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="divisible by 256, the cache has 16"):
        flash_attn_backend.paged_decode_attention(torch.zeros(1, 1, 16), cache, cache, lens, tables, 1.0)
    with pytest.raises(ValueError, match="divisible by 256, the cache has 16"):
        flash_attn_backend.paged_prefill_attention(
            torch.zeros(4, 1, 16), cache, cache, torch.tensor([0, 4], dtype=torch.int32), lens, tables, 1.0
        )
    assert not flash_attn_backend.flash_attn_available() or _CUDA, "flash-attn claimed usable without CUDA"


class _FlashAttnStandIn:
    """flash_attn's two paged entry points as its docstrings define them, written out in float64 for a CPU test:
    block_table rows list each sequence's cache blocks, causal masks align bottom-right (query i of L sees keys
    <= i + K - L), and a decode row sees its first cache_seqlens keys."""

    def __init__(self) -> None:
        self.calls = []

    @staticmethod
    def _context(cache, table, length):
        return cache[table.long()].flatten(0, 1)[:length].cpu()  # the float64 reference runs on the CPU

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                               softmax_scale, causal, block_table):
        self.calls.append(("varlen", max_seqlen_q, max_seqlen_k))
        assert causal and isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == block_table.dtype == torch.int32
        out = torch.empty_like(q)
        for seq in range(block_table.shape[0]):
            q_begin, q_end = int(cu_seqlens_q[seq]), int(cu_seqlens_q[seq + 1])
            keys = int(cu_seqlens_k[seq + 1] - cu_seqlens_k[seq])
            assert q_end - q_begin <= max_seqlen_q and keys <= max_seqlen_k
            out[q_begin:q_end] = attention_float64(
                q[q_begin:q_end].cpu(), self._context(k, block_table[seq], keys), self._context(v, block_table[seq], keys),
                keys - (q_end - q_begin), softmax_scale).to(q.dtype)
        return out

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale, causal):
        self.calls.append(("kvcache",))
        assert q.dim() == 4 and q.shape[1] == 1 and cache_seqlens.dtype == torch.int32
        out = torch.zeros_like(q)
        for seq, length in enumerate(cache_seqlens.tolist()):
            if length:
                out[seq] = attention_float64(
                    q[seq].cpu(), self._context(k_cache, block_table[seq], length),
                    self._context(v_cache, block_table[seq], length), length - 1, softmax_scale).to(q.dtype)
        return out


def test_flash_attn_backend_calls_follow_its_documented_interface(monkeypatch):
    """The flash-attn package is on no machine here: through a stand-in that follows its documented interface,
    the backend's prefill (chunks over cached prefixes, ragged, GQA) and decode (an empty row too) give the
    attention written out in float64."""
    import sys
    import types

    from engine.kernels import flash_attn_backend

    stand_in = _FlashAttnStandIn()
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = stand_in.flash_attn_varlen_func
    module.flash_attn_with_kvcache = stand_in.flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    generator = torch.Generator().manual_seed(11)
    prefix_lens, query_lens = [0, 250, 300], [5, 20, 1]
    paged = PagedContexts([p + n for p, n in zip(prefix_lens, query_lens)], 2, 16, 256, generator)
    q64 = torch.randn(sum(query_lens), 4, 16, generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, 5, 25, 26], dtype=torch.int64)  # the engine's dtype: the backend converts it
    out = flash_attn_backend.paged_prefill_attention(
        q64.float().to(DEVICE), paged.k_cache, paged.v_cache, cu.to(DEVICE), paged.seq_lens, paged.block_tables, 0.25)
    for seq, (prefix, length) in enumerate(zip(prefix_lens, query_lens)):
        expected = attention_float64(q64[cu[seq]:cu[seq + 1]], paged.keys[seq], paged.values[seq], prefix, 0.25)
        _assert_close(out[cu[seq]:cu[seq + 1]], expected, 1e-4)
    assert stand_in.calls == [("varlen", 20, 301)]

    decode_lens = [257, 0, 3]
    paged = PagedContexts(decode_lens, 2, 16, 256, generator)
    q64 = torch.randn(3, 4, 16, generator=generator, dtype=torch.float64)
    out = flash_attn_backend.paged_decode_attention(
        q64.float().to(DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, 0.25)
    assert out.shape == (3, 4, 16)
    for seq, length in enumerate(decode_lens):
        expected = (attention_float64(q64[seq:seq + 1], paged.keys[seq], paged.values[seq], length - 1, 0.25)[0]
                    if length else torch.zeros(4, 16, dtype=torch.float64))
        _assert_close(out[seq], expected, 1e-4)


def _needs_flash_attn():
    """Skip unless the flash_attn package imports and a GPU is present (benchmarks/flash_attn_check.sh installs it)."""
    from engine.kernels import flash_attn_backend

    if not flash_attn_backend.flash_attn_available():
        pytest.skip("needs the flash_attn package and CUDA")
    return flash_attn_backend


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_flash_attn_backend_against_float64_with_the_real_package(dtype, tolerance):
    """With the real flash-attn at Qwen3-0.6B's attention shape (16 query heads over 8 KV heads of 128, blocks of
    256): prompt chunks over cached prefixes (ragged, one query a single token, contexts crossing blocks) and
    decode (an empty row too) give the attention written out in float64, never reading the NaN-filled slots past
    a context or the table's padding block."""
    backend = _needs_flash_attn()
    generator = torch.Generator().manual_seed(12)
    scale = 128**-0.5
    prefix_lens, query_lens = [0, 250, 300, 700], [5, 20, 1, 333]
    paged = PagedContexts([p + n for p, n in zip(prefix_lens, query_lens)], 8, 128, 256, generator, dtype=dtype)
    q64 = torch.randn(sum(query_lens), 16, 128, generator=generator, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int64)
    out = backend.paged_prefill_attention(
        q64.to(DEVICE, dtype), paged.k_cache, paged.v_cache, cu.to(DEVICE), paged.seq_lens, paged.block_tables, scale)
    assert out.dtype == dtype and out.shape == q64.shape
    for seq, prefix in enumerate(prefix_lens):
        expected = attention_float64(q64[cu[seq]:cu[seq + 1]], paged.keys[seq], paged.values[seq], prefix, scale)
        _assert_close(out[cu[seq]:cu[seq + 1]], expected, tolerance)

    decode_lens = [257, 0, 3, 1000]
    paged = PagedContexts(decode_lens, 8, 128, 256, generator, dtype=dtype)
    q64 = torch.randn(4, 16, 128, generator=generator, dtype=torch.float64)
    out = backend.paged_decode_attention(
        q64.to(DEVICE, dtype), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, scale)
    assert out.shape == (4, 16, 128)
    for seq, length in enumerate(decode_lens):
        expected = (attention_float64(q64[seq:seq + 1], paged.keys[seq], paged.values[seq], length - 1, scale)[0]
                    if length else torch.zeros(16, 128, dtype=torch.float64))
        _assert_close(out[seq], expected, tolerance)


def test_flash_attn_decode_replays_in_a_cuda_graph_with_the_real_package():
    """The backend's decode takes no host sync, so a CUDA graph captured once follows new context lengths."""
    backend = _needs_flash_attn()
    generator = torch.Generator().manual_seed(13)
    paged = PagedContexts([300, 1000, 17], 8, 128, 256, generator, dtype=torch.bfloat16)
    q = torch.randn(3, 16, 128, generator=generator).to(DEVICE, torch.bfloat16)
    seq_lens = paged.seq_lens.clone()
    args = (q, paged.k_cache, paged.v_cache, seq_lens, paged.block_tables, 128**-0.5)
    backend.paged_decode_attention(*args)  # load the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.paged_decode_attention(*args)
    for lens in ([300, 1000, 17], [1, 999, 0], [256, 512, 16]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        expected = reference.paged_decode_attention(*args)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_flash_attn_backend_refuses_head_dims_a_forward_only_build_lacks(monkeypatch):
    """benchmarks/build_flash_attn.sh's wheel names its head dims; another one is refused before any kernel runs."""
    import sys
    import types

    from engine.kernels import flash_attn_backend

    stand_in = _FlashAttnStandIn()
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = stand_in.flash_attn_varlen_func
    module.flash_attn_with_kvcache = stand_in.flash_attn_with_kvcache
    module.TWINFER_HEAD_DIMS = (128,)
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    paged = PagedContexts([5], 2, 16, 256, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="head_dim 128 only, and the model's is 16"):
        flash_attn_backend.paged_decode_attention(
            torch.zeros(1, 4, 16, device=DEVICE), paged.k_cache, paged.v_cache, paged.seq_lens, paged.block_tables, 1.0)
    with pytest.raises(ValueError, match="head_dim 128 only"):
        flash_attn_backend.paged_prefill_attention(
            torch.zeros(5, 4, 16, device=DEVICE), paged.k_cache, paged.v_cache,
            torch.tensor([0, 5], device=DEVICE), paged.seq_lens, paged.block_tables, 1.0)
    assert stand_in.calls == []
