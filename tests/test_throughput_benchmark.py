"""The throughput benchmark's engine half on CPU: the figures it records."""

from twinfer.throughput_benchmark import run_twinfer


def test_run_twinfer_records_the_resolved_mixed_graph_option():
    """The default (None) resolves per device: the CPU has no CUDA graphs, so the record says False, not None."""
    result = run_twinfer("tiny-qwen3", [[1, 2, 3], [4, 5, 6, 7]], [3, 2], dtype="float32", max_model_len=64,
                         enforce_eager=False, device="cpu")
    assert result["output_tokens"] == 5
    assert result["mixed_cuda_graphs"] is False
    assert result["cuda_graph_steps"] == 0
