"""Which CUDA graph a step takes: vLLM's decode ladder, mixed-step token counts, and eager past them."""

import pytest

from engine.graph_dispatch import GraphDispatch, decode_graph_sizes, mixed_step_token_sizes, resolve_mixed_cuda_graphs


def test_vllm_ladder():
    ladder = decode_graph_sizes()
    assert ladder[:5] == (1, 2, 4, 8, 16) and ladder[-1] == 512 and len(ladder) == 67
    # An engine captures up to the first size holding max_num_seqs, and pads every batch it runs the same.
    assert decode_graph_sizes(20) == (1, 2, 4, 8, 16, 24)
    assert decode_graph_sizes(4096) == ladder
    whole, engine = GraphDispatch(ladder), GraphDispatch.for_engine(20, 512, cuda_graphs=True, mixed=False)
    assert [engine.decode_size(n) for n in range(21)] == [whole.decode_size(n) for n in range(21)]


def test_mixed_step_token_counts_pad_by_at_most_a_third():
    sizes = mixed_step_token_sizes(8192)
    assert sizes[:6] == (16, 32, 64, 96, 128, 192) and sizes[-1] == 8192
    # From 64 tokens up, a step just past one size fills at least two thirds of the next graph.
    assert all(3 * smaller >= 2 * larger for smaller, larger in zip(sizes, sizes[1:]) if smaller >= 64)
    assert mixed_step_token_sizes(24) == (16, 24)


def test_one_token_per_row_takes_a_decode_graph_padded_by_sequences():
    graphs = GraphDispatch.for_engine(256, 2048, cuda_graphs=True, mixed=True)
    assert graphs.graph_size(num_tokens=5, num_seqs=5) == 8  # decodes, or a one-token prompt chunk among them
    assert graphs.graph_size(num_tokens=6, num_seqs=5) == 16  # a prompt chunk: tokens padded
    assert graphs.graph_size(num_tokens=300, num_seqs=200) == 384
    assert graphs.graph_size(num_tokens=2049, num_seqs=3) == 0  # past the largest graph: eager
    assert graphs.graph_size(num_tokens=300, num_seqs=257) == 0  # more rows than its buffers hold: eager
    assert graphs.decode_size(257) == 0
    without = GraphDispatch.for_engine(256, 2048, cuda_graphs=True, mixed=False)
    assert without.graph_size(6, 5) == 0 and without.graph_size(5, 5) == 8
    assert graphs.without_mixed_graphs() == without
    eager = GraphDispatch.for_engine(256, 2048, cuda_graphs=False, mixed=True)
    assert eager.graph_size(5, 5) == 0 and eager.graph_size(6, 5) == 0


def test_mixed_graphs_need_the_triton_backend():
    assert resolve_mixed_cuda_graphs(None, "triton", 1) and not resolve_mixed_cuda_graphs(None, "triton", 2)
    assert not resolve_mixed_cuda_graphs(None, "flash-attn", 1)
    with pytest.raises(ValueError, match="needs the triton attention backend"):
        resolve_mixed_cuda_graphs(True, "flash-attn", 1)
