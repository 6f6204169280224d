"""How many KV blocks a GPU holds for a model, sized the way the real engine sizes its cache."""

from simulator.gpu_specs import GIB, GpuSpec
from simulator.model_shape import ModelShape, dtype_bytes

NON_TORCH_BYTES = 0.75 * GIB
"""CUDA context, cuBLAS workspaces and captured graphs: memory torch's allocator never sees."""


def activation_peak_bytes(shape: ModelShape, *, tp: int, dtype: str, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Peak activations of the warm-up forward at the largest batch: the widest layer's buffers plus logits."""
    element = dtype_bytes(dtype)
    q_size = shape.num_attention_heads * shape.head_dim // tp
    kv_size = max(1, shape.num_kv_heads // tp) * shape.head_dim
    # Residual + normed hidden, qkv output, attention output, and the MLP's gate_up and activation.
    per_token = element * (3 * shape.hidden_size + q_size + 2 * kv_size + q_size + 3 * shape.intermediate_size // tp)
    sampled_rows = min(max_num_seqs, max_num_batched_tokens)
    logits = sampled_rows * shape.vocab_size * 4 * 2  # float32 logits and their softmax
    return per_token * max_num_batched_tokens + logits


def estimate_num_kv_blocks(
    gpu: GpuSpec,
    shape: ModelShape,
    *,
    tp: int = 1,
    dtype: str = "bfloat16",
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
) -> int:
    """KV blocks per rank: (memory * utilization - weights - activation peak - non-torch) / bytes per block."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    weights = shape.weight_bytes(dtype) / tp
    activations = activation_peak_bytes(
        shape, tp=tp, dtype=dtype, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
    )
    free = gpu.memory_bytes * gpu_memory_utilization - weights - activations - NON_TORCH_BYTES
    kv_heads_per_rank = max(1, shape.num_kv_heads // tp)
    bytes_per_block = block_size * 2 * shape.num_layers * kv_heads_per_rank * shape.head_dim * dtype_bytes(dtype)
    num_blocks = int(free // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(
            f"model {shape.name!r} ({weights / GIB:.1f} GiB of weights per rank at tp={tp}) leaves no room for "
            f"a KV cache on {gpu.name} ({gpu.memory_gib:.0f} GiB at utilization {gpu_memory_utilization})"
        )
    return num_blocks
