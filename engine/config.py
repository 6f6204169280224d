"""The engine's scheduling and cache settings, validated where they are built, and vLLM's defaults for its limits."""

from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN_CAP = 32768


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Settings the scheduler and block manager share, with vLLM's defaults."""

    block_size: int = 16
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None
    """Force the KV block count (vLLM's num_gpu_blocks_override); None takes the executor's."""
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int = 32000
    """Range of the token ids made up for requests given only a prompt length."""
    async_scheduling: bool = False
    """Schedule the next step while the current one runs (vLLM's --async-scheduling): the host's
    scheduling and input preparation overlap the GPU's work; a stop token costs one extra step."""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive integer or None, got {self.num_kv_blocks!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) so that every prompt fits in one step"
            )
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))


def vllm_default_limits(gpu_memory_gib: float | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) as vLLM v1 picks them for an online server on this GPU."""
    if gpu_memory_gib is not None and gpu_memory_gib >= 70:
        return 1024, 8192
    return 256, 2048


def default_max_model_len(model_max_len: int | None) -> int:
    """max_model_len when none is given: the model's max_position_embeddings, capped at DEFAULT_MAX_MODEL_LEN_CAP."""
    return min(model_max_len or DEFAULT_MAX_MODEL_LEN_CAP, DEFAULT_MAX_MODEL_LEN_CAP)
