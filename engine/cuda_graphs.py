"""The captured CUDA graphs: of the decode forward (model + LM head) per batch size, and of the forward of
steps with prompt chunks per padded token count. Which one a step replays is engine/graph_dispatch.py's rule.

Each graph reads static input buffers; a step copies its rows in and pads the rest harmlessly (slot -1
writes no KV, seq_len 0 attends to nothing). The block-table buffer is as wide as max_model_len needs,
so any sequence fits.
"""

import torch

from engine.attention import AttentionMetadata
from engine.kernels.decode_tiling import DecodeTiling


@torch.inference_mode()
def capture_graphs(sizes, run, graphs: dict, outputs: dict, pool=None):
    """Capture run(size) for every size into graphs/outputs, largest first so the smaller graphs reuse its
    pool memory; returns the pool (pass it on to share it with another set of graphs)."""
    for size in sorted(sizes, reverse=True):
        run(size)  # warm-up: compiles kernels and settles allocations outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = run(size)
        pool = graph.pool() if pool is None else pool
        graphs[size] = graph
    torch.cuda.synchronize()
    return pool


class DecodeGraphs:
    """One captured graph per batch size, sharing a memory pool and one set of static input buffers."""

    def __init__(self, model, batch_sizes: tuple[int, ...], max_blocks_per_seq: int, device: torch.device) -> None:
        self.model = model
        self.batch_sizes = sorted(batch_sizes)
        max_bs = self.batch_sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _run(self, batch_size: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
        )
        hidden = self.model(self.input_ids[:batch_size], self.positions[:batch_size], metadata)
        return self.model.compute_logits(hidden)

    def capture(self, pool=None):
        """Capture every batch size (see capture_graphs); returns the pool."""
        return capture_graphs(self.batch_sizes, self._run, self.graphs, self.outputs, pool)

    def replay(self, batch_size: int, input_ids: torch.Tensor, positions: torch.Tensor,
               metadata: AttentionMetadata) -> torch.Tensor:
        """Run the graph of batch_size on inputs already padded to it; logits [batch_size, vocab]."""
        self.input_ids[:batch_size].copy_(input_ids)
        self.positions[:batch_size].copy_(positions)
        self.slot_mapping[:batch_size].copy_(metadata.slot_mapping)
        self.seq_lens[:batch_size].copy_(metadata.seq_lens)
        block_tables = metadata.block_tables
        self.block_tables[:batch_size, :block_tables.shape[1]].copy_(block_tables)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size]


class MixedStepGraphs:
    """One CUDA graph of the model's forward (no LM head) per padded token count, for steps with prompt chunks.

    The attention runs in its fixed layout (AttentionMetadata.decode_seq_lens, decode_work and tile_map): the sequence
    buffers hold max_seqs rows, so a graph serves any batch of up to that many sequences and its token
    count; padding rows write no KV (slot -1) and attend to nothing. The LM head runs outside, on the rows
    that sample.
    """

    def __init__(self, model, token_sizes: tuple[int, ...], max_seqs: int, max_blocks_per_seq: int, block_q: int,
                 device: torch.device, min_work_capacity: int = 1024) -> None:
        self.model = model
        self.min_work_capacity = min_work_capacity
        self.token_sizes = sorted(token_sizes)
        self.max_seqs = max_seqs
        self.block_q = block_q
        max_tokens = self.token_sizes[-1]
        int32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_tokens, **int32)
        self.positions = torch.zeros(max_tokens, **int32)
        self.slot_mapping = torch.full((max_tokens,), -1, **int32)
        self.seq_lens = torch.zeros(max_seqs, **int32)
        self.decode_seq_lens = torch.zeros(max_seqs, **int32)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, **int32)
        self.cu_seqlens_q = torch.zeros(max_seqs + 1, **int32)
        self.tile_map = torch.full((2, self.tile_capacity(max_tokens)), -1, **int32)
        self.decode_work = torch.full((2, self.work_capacity(max_tokens)), -1, **int32)
        self.decode_work_starts = torch.zeros(max_seqs, **int32)
        self.decode_partition_size = torch.full((1,), DecodeTiling().partition_size, **int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def tile_capacity(self, num_tokens: int) -> int:
        """Map entries a step of num_tokens may need: its query tiles, plus one partial tile per sequence."""
        return -(-num_tokens // self.block_q) + self.max_seqs

    def work_capacity(self, num_tokens: int) -> int:
        """Decode work-map entries of a step of num_tokens: two partitions per possible one-token row, and at
        least min_work_capacity (a few long rows then keep 512-token partitions: see decode_work_map)."""
        return max(2 * min(num_tokens, self.max_seqs), self.min_work_capacity)

    def _metadata(self, num_tokens: int) -> AttentionMetadata:
        capacity = self.tile_capacity(num_tokens)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            cu_seqlens_q=self.cu_seqlens_q,
            decode_seq_lens=self.decode_seq_lens,
            tile_map=(self.tile_map[0, :capacity], self.tile_map[1, :capacity]),
            decode_work=(self.decode_work[:, :self.work_capacity(num_tokens)], self.decode_work_starts,
                         self.decode_partition_size),
        )

    def _run(self, num_tokens: int) -> torch.Tensor:
        return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], self._metadata(num_tokens))

    def capture(self, pool=None):
        """Capture every token count (see capture_graphs); returns the pool."""
        return capture_graphs(self.token_sizes, self._run, self.graphs, self.outputs, pool)

    def replay(self, num_tokens: int, input_ids: torch.Tensor, positions: torch.Tensor,
               metadata: AttentionMetadata) -> torch.Tensor:
        """Run the graph of num_tokens on inputs already padded to it (sequence arrays to max_seqs rows, the
        tile map to tile_capacity(num_tokens), the decode work map to work_capacity(num_tokens)); hidden
        states [num_tokens, hidden]."""
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping)
        self.seq_lens.copy_(metadata.seq_lens)
        self.decode_seq_lens.copy_(metadata.decode_seq_lens)
        self.cu_seqlens_q.copy_(metadata.cu_seqlens_q)
        rows, width = metadata.block_tables.shape
        self.block_tables[:rows, :width].copy_(metadata.block_tables)
        capacity = self.tile_capacity(num_tokens)
        self.tile_map[0, :capacity].copy_(metadata.tile_map[0])
        self.tile_map[1, :capacity].copy_(metadata.tile_map[1])
        work_map, starts, partition_size = metadata.decode_work
        # Exactly this graph's width (a narrower map would leave another step's entries behind it).
        self.decode_work[:, :self.work_capacity(num_tokens)].copy_(work_map)
        self.decode_work_starts.copy_(starts)
        self.decode_partition_size.copy_(partition_size)
        self.graphs[num_tokens].replay()
        return self.outputs[num_tokens]
