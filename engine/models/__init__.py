"""Supported model architectures, by the name config.json's `architectures` gives."""

from engine.model_config import SUPPORTED_ARCHITECTURES


def model_class(architecture: str) -> type:
    """The model class for a Hugging Face architecture name, or a clear error naming the supported ones."""
    if architecture == "Qwen3ForCausalLM":
        from engine.models.qwen3 import Qwen3ForCausalLM
        return Qwen3ForCausalLM
    if architecture == "Qwen2ForCausalLM":
        from engine.models.qwen2 import Qwen2ForCausalLM
        return Qwen2ForCausalLM
    if architecture == "LlamaForCausalLM":
        from engine.models.llama import LlamaForCausalLM
        return LlamaForCausalLM
    raise ValueError(f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def attention_features(architecture: str, attention_bias: bool) -> tuple[bool, bool]:
    """(qkv_bias, qk_norm) of an architecture, given config.json's attention_bias."""
    cls = model_class(architecture)
    return cls.always_qkv_bias or attention_bias, cls.qk_norm
