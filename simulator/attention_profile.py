"""The operator profile's attention tables: the engine's paged prefill and decode kernels over sequences, new tokens
and cached context for every head layout per rank, laid out as eager steps and as mixed-step CUDA graphs run them."""

from dataclasses import dataclass

import numpy as np

from simulator.operator_shapes import BLOCK_SIZE, attention_layouts
from simulator.operator_timing import ProfileContext, TableRun


@dataclass
class PagedCase:
    """Sequences laid out in a paged KV cache as the engine lays them out, in `copies` disjoint sets of random
    blocks (call i reads set i % copies, as layer after layer reads its own cache)."""

    k_cache: object
    v_cache: object
    blocks: object
    """[copies, num_seqs, blocks per sequence] int64 on the device."""
    copies: int

    def tables(self, rows: int, width: int):
        """[copies, rows, width] int32 block tables: each sequence's blocks first, padding rows and columns 0. The
        width is rounded up to 16 entries: every copy then starts 64-byte aligned, as the engine's buffers do, so
        Triton (which specializes on pointer alignment) runs one compiled variant for all of them."""
        import torch

        copies, num_seqs, needed = self.blocks.shape
        width = -(-max(width, needed) // 16) * 16
        tables = torch.zeros(copies, rows, width, dtype=torch.int32, device=self.blocks.device)
        tables[:, :num_seqs, :needed] = self.blocks
        return tables


def paged_case(context: ProfileContext, num_seqs: int, tokens: int, kv_heads: int, head_dim: int,
               bytes_per_call: int) -> PagedCase:
    """A cache holding num_seqs sequences of `tokens` tokens each, random values, enough copies to overflow L2."""
    import torch

    copies = context.copies(bytes_per_call, most=64)
    needed = -(-tokens // BLOCK_SIZE)
    num_blocks = copies * num_seqs * needed
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = context.random(*shape), context.random(*shape)
    order = torch.randperm(num_blocks, device=context.device).view(copies, num_seqs, needed)
    return PagedCase(k_cache, v_cache, order, copies)


def decode_attention_table(run: TableRun, context: ProfileContext) -> None:
    """The paged decode kernel over sequences x contexts for every head layout: variant "" with tables as wide as
    decode CUDA graphs make them, "exact_table" as wide as the context (eager steps), "work_map" as mixed-step
    graphs call it."""
    grid = context.grid
    for layout in attention_layouts(context.models, grid):
        for num_seqs in grid.decode_seqs:
            for context_len in grid.decode_contexts:
                if num_seqs * context_len > grid.decode_max_tokens:
                    continue
                if not run.open():
                    return
                with run.guard(f"decode {layout} seqs={num_seqs} context={context_len}"):
                    _decode_shape(run, context, layout, num_seqs, context_len)


def _decode_shape(run: TableRun, context: ProfileContext, layout, num_seqs: int, context_len: int) -> None:
    import torch

    heads, kv_heads, head_dim = layout
    grid, backend, size = context.grid, context.backend, context.itemsize
    kv_bytes = 2 * num_seqs * context_len * kv_heads * head_dim * size
    case = paged_case(context, num_seqs, context_len, kv_heads, head_dim, kv_bytes)
    calls = context.calls(context.ceilings.estimate(0, kv_bytes) + 5e-6, case.copies, most=64)
    scale = head_dim**-0.5
    shape = dict(num_seqs=num_seqs, context_len=context_len, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    q = context.random(num_seqs, heads, head_dim)
    seq_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=context.device)
    for variant, width in (("", grid.decode_table_tokens // BLOCK_SIZE), ("exact_table", 0)):
        tables = case.tables(num_seqs, width)
        run.time("decode_attention", lambda i: backend.paged_decode_attention(
            q, case.k_cache, case.v_cache, seq_lens, tables[i % case.copies], scale), calls=calls, variant=variant,
            **shape)
    if backend.name == "triton":
        call = _work_map_call(context, layout, case, num_seqs, context_len, scale)
        run.time("decode_attention", call, calls=calls, variant="work_map", **shape)


def _work_map_call(context: ProfileContext, layout, case: PagedCase, num_seqs: int, context_len: int, scale: float):
    """The decode kernel as a mixed-step graph runs it: over the graph's sequence rows (the decodes first, padding
    after), its work map, and tables as wide as the graph's."""
    import torch
    from engine.kernels.decode_attention import decode_work_map

    heads, _, head_dim = layout
    grid = context.grid
    rows = max(num_seqs, min(grid.mixed_graph_tokens, grid.mixed_graph_seqs))
    work_capacity = context.mixed_graphs(layout).work_capacity(grid.mixed_graph_tokens)
    lens = np.zeros(rows, np.int32)
    lens[:num_seqs] = context_len
    work, starts, partition_size = decode_work_map(lens, work_capacity)
    device = context.device
    work_tensors = (torch.from_numpy(work).to(device), torch.from_numpy(starts).to(device),
                    torch.tensor([partition_size], dtype=torch.int32, device=device))
    seq_lens = torch.from_numpy(lens).to(device)
    q = context.random(rows, heads, head_dim)
    out = torch.empty_like(q)
    tables = case.tables(rows, grid.decode_table_tokens // BLOCK_SIZE)
    return lambda i: context.backend.paged_decode_attention(
        q, case.k_cache, case.v_cache, seq_lens, tables[i % case.copies], scale, out=out, work=work_tensors)


def prefill_attention_table(run: TableRun, context: ProfileContext) -> None:
    """The paged prefill kernel over sequences x new tokens x cached context for every head layout: variant "" as
    eager steps call it (grid bounded by the longest chunk), "tile_map" as mixed-step graphs do."""
    grid = context.grid
    for layout in attention_layouts(context.models, grid):
        for num_seqs in grid.prefill_seqs:
            for query_len in grid.prefill_query_lens:
                if num_seqs * query_len > grid.prefill_max_tokens:
                    continue
                for context_len in grid.prefill_contexts:
                    if not run.open():
                        return
                    with run.guard(f"prefill {layout} seqs={num_seqs} new={query_len} cached={context_len}"):
                        _prefill_shape(run, context, layout, num_seqs, query_len, context_len)


def _prefill_shape(run: TableRun, context: ProfileContext, layout, num_seqs: int, query_len: int,
                   context_len: int) -> None:
    import torch

    heads, kv_heads, head_dim = layout
    backend, size, device = context.backend, context.itemsize, context.device
    seq_len = context_len + query_len
    bytes_per_call = 2 * num_seqs * (seq_len * kv_heads + query_len * heads) * head_dim * size
    flops = 4 * heads * head_dim * num_seqs * query_len * (context_len + (query_len + 1) / 2)
    case = paged_case(context, num_seqs, seq_len, kv_heads, head_dim, bytes_per_call)
    calls = context.calls(context.ceilings.estimate(flops / 0.4, bytes_per_call) + 5e-6, case.copies, most=64)
    scale = head_dim**-0.5
    shape = dict(num_seqs=num_seqs, query_len=query_len, context_len=context_len, num_heads=heads,
                 num_kv_heads=kv_heads, head_dim=head_dim)
    q = context.random(num_seqs * query_len, heads, head_dim)
    cu_seqlens = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * query_len
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    tables = case.tables(num_seqs, 0)
    bound = {"max_query_len": query_len} if backend.name == "triton" else {}
    run.time("prefill_attention", lambda i: backend.paged_prefill_attention(
        q, case.k_cache, case.v_cache, cu_seqlens, seq_lens, tables[i % case.copies], scale, **bound), calls=calls,
        **shape)
    if backend.name == "triton":
        call = _tile_map_call(context, layout, case, q, num_seqs, query_len, seq_len, scale)
        run.time("prefill_attention", call, calls=calls, variant="tile_map", **shape)


def _tile_map_call(context: ProfileContext, layout, case: PagedCase, q, num_seqs: int, query_len: int, seq_len: int,
                   scale: float):
    """The prefill kernel as a mixed-step graph runs it: sequence arrays padded to the graph's rows, its tile map."""
    import torch
    from engine.kernels.prefill_attention import prefill_tile_map

    grid, device = context.grid, context.device
    rows = max(num_seqs, grid.mixed_graph_seqs)
    graphs = context.mixed_graphs(layout)
    query_lens = np.zeros(rows, np.int64)
    query_lens[:num_seqs] = query_len
    tile_map = prefill_tile_map(query_lens, graphs.block_q, graphs.tile_capacity(num_seqs * query_len))
    tiles = torch.from_numpy(tile_map).to(device)
    cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)).to(device)
    seq_lens = torch.from_numpy(np.where(query_lens > 0, seq_len, 0).astype(np.int32)).to(device)
    tables = case.tables(rows, grid.decode_table_tokens // BLOCK_SIZE)
    out = torch.empty_like(q)
    return lambda i: context.backend.paged_prefill_attention(
        q, case.k_cache, case.v_cache, cu_seqlens, seq_lens, tables[i % case.copies], scale, out=out,
        tile_map=(tiles[0], tiles[1]))
