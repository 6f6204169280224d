"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k before the rotary embedding."""

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense): q_norm and k_norm over head_dim, no q/k/v bias unless attention_bias."""

    qk_norm = True
