"""How many KV blocks a GPU holds for a model, sized the way the real engine sizes its cache."""

from simulator.gpu_specs import GIB, GpuSpec
from simulator.model_shape import ModelShape, dtype_bytes

NON_TORCH_BYTES = 0.75 * GIB
"""CUDA context, cuBLAS workspaces and captured graphs: memory torch's allocator never sees."""


def activation_peak_bytes(shape: ModelShape, *, tp: int, dtype: str, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Peak activations of the engine's profiling pass: the larger of the forward at the largest batch (the
    widest layer's buffers) and the sampler's filters over max_num_seqs rows of full-vocabulary logits."""
    element = dtype_bytes(dtype)
    q_size = shape.num_attention_heads * shape.head_dim // tp
    kv_size = max(1, shape.num_kv_heads // tp) * shape.head_dim
    # Residual + normed hidden, qkv output, attention output, and the MLP's gate_up and activation.
    per_token = element * (3 * shape.hidden_size + q_size + 2 * kv_size + q_size + 3 * shape.intermediate_size // tp)
    forward = per_token * max_num_batched_tokens
    # The runner profiles the sampler at max_num_seqs rows with top-k and top-p on (every rank gathers the
    # whole vocabulary). Live at its peak, per logit: the model-dtype logits, six float32 tensors (scaled,
    # sorted, probs, mass before, the scatter target and its masked source), the int64 sort order and the
    # bool drop mask. Measured: the H100 runs' blocks at 256 and 1024 seqs differ by ~37 bytes a logit.
    sampler_bytes_per_logit = element + 6 * 4 + 8 + 1
    sampler = max_num_seqs * shape.vocab_size * sampler_bytes_per_logit
    # The forward's buffers are freed before sampling; only its output rows stay.
    return max(forward, sampler + max_num_batched_tokens * shape.hidden_size * element)


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
    """KV blocks per rank: (memory * utilization - weights - activation peak - non-torch) / bytes per block.

    Within 1% of the real engine for qwen3-0.6b on an H100 (benchmarks/data/h100: 37,400 blocks at 1024
    seqs, 39,827 at 256); the non-torch reserve is a rough constant, so small models are the hardest test.
    """
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
