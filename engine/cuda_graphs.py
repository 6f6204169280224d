"""CUDA graphs of the decode forward (model + LM head) over vLLM's batch-size ladder.

Each graph reads static input buffers; a step copies its rows in and pads the rest harmlessly (slot -1
writes no KV, seq_len 0 attends to nothing). The block-table buffer is as wide as max_model_len needs,
so any sequence fits; steps wider than the largest graph run eagerly.
"""

import torch

from engine.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int, largest: int = 512) -> list[int]:
    """vLLM's ladder 1, 2, 4, 8, 16, 24, ... up to the first size covering max_num_seqs (at most `largest`)."""
    ladder = [1, 2, 4] + list(range(8, largest + 1, 8))
    sizes = []
    for size in ladder:
        sizes.append(size)
        if size >= max_num_seqs:
            break
    return sizes


class DecodeGraphs:
    """One captured graph per batch size, sharing a memory pool and one set of static input buffers."""

    def __init__(self, model, batch_sizes: list[int], max_blocks_per_seq: int, device: torch.device) -> None:
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

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _run(self, batch_size: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
        )
        hidden = self.model(self.input_ids[:batch_size], self.positions[:batch_size], metadata)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so smaller graphs reuse its pool memory."""
        pool = None
        for batch_size in reversed(self.batch_sizes):
            self._run(batch_size)  # warm-up: compiles kernels and settles allocations outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self._run(batch_size)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured batch size holding num_seqs rows, or None when eager must run."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def replay(self, batch_size: int, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               seq_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Run the graph of batch_size on inputs already padded to it; logits [batch_size, vocab]."""
        self.input_ids[:batch_size].copy_(input_ids)
        self.positions[:batch_size].copy_(positions)
        self.slot_mapping[:batch_size].copy_(slot_mapping)
        self.seq_lens[:batch_size].copy_(seq_lens)
        self.block_tables[:batch_size, :block_tables.shape[1]].copy_(block_tables)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size]
