"""Qwen2: the Llama decoder with biases on the q, k and v projections."""

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 (and Qwen2.5): q/k/v projections always carry a bias."""

    always_qkv_bias = True
