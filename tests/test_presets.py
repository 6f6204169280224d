"""The bundled model configs: each is the model's public config.json, reads as the engine and the simulator need,
and its architecture builds and runs in the real engine (shrunk to a tiny size, on CPU)."""

import json
import math

import pytest

from engine.clock import VirtualClock
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import checkpoint_shapes
from engine.model_config import PRESETS_DIR, load_model_config, preset_names
from engine.models import attention_features
from engine.sampling_params import SamplingParams
from simulator.model_shape import ModelShape

# name: (published parameters in billions, layers, hidden, intermediate, heads, KV heads, head_dim, vocab, tied)
PUBLISHED = {
    "qwen3-1.7b": (1.72, 28, 2048, 6144, 16, 8, 128, 151936, True),
    "qwen3-4b": (4.02, 36, 2560, 9728, 32, 8, 128, 151936, True),
    "qwen3-14b": (14.8, 40, 5120, 17408, 40, 8, 128, 151936, False),
    "llama-3-70b": (70.6, 80, 8192, 28672, 64, 8, 128, 128256, False),
    "qwen2.5-7b": (7.62, 28, 3584, 18944, 28, 4, 128, 152064, False),
    "qwen2.5-72b": (72.7, 80, 8192, 29568, 64, 8, 128, 152064, False),
}
# What each family's forward adds: (q/k/v biases, per-head q/k norms).
FEATURES = {"qwen3": (False, True), "qwen2.5": (True, False), "llama": (False, False)}


def family(name: str) -> str:
    return next(prefix for prefix in FEATURES if name.startswith(prefix))


def test_every_preset_is_listed():
    assert set(PUBLISHED) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_shape(name):
    billions, layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied = PUBLISHED[name]
    config, shape = load_model_config(name), ModelShape.load(name)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size, config.tie_word_embeddings) == (
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.num_attention_heads,
            shape.num_kv_heads, shape.head_dim, shape.vocab_size, shape.tie_word_embeddings) == (
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied)
    qkv_bias, qk_norm = attention_features(config.architecture, config.attention_bias)
    assert (qkv_bias, qk_norm) == FEATURES[family(name)] == (shape.attention_bias, shape.qk_norm)
    # Every tensor of the checkpoint the engine would load (biases and norms included) adds up to the model card.
    total = sum(math.prod(size) for size in checkpoint_shapes(config, qkv_bias, qk_norm).values())
    assert total / 1e9 == pytest.approx(billions, rel=0.01)
    assert shape.num_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_rope_and_context_as_published():
    assert load_model_config("llama-3-70b").rope.theta == 500000.0
    assert load_model_config("llama-3-70b").max_position_embeddings == 8192
    assert load_model_config("qwen2.5-72b").max_position_embeddings == 131072
    assert load_model_config("qwen3-14b").rope.theta == 1e6
    assert all(load_model_config(name).rope.rope_type == "default" for name in PUBLISHED)


def shrunk(name: str, folder) -> str:
    """The preset's config.json with tiny sizes and everything else (architecture, biases, tying, rope) kept."""
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    raw.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, torch_dtype="float32")
    if "head_dim" in raw:
        raw["head_dim"] = 16
    (folder / "config.json").write_text(json.dumps(raw))
    return str(folder)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_engine_builds_and_runs_each_architecture(name, tmp_path):
    from engine.model_executor import ModelExecutor

    folder = shrunk(name, tmp_path)
    config = EngineConfig(max_model_len=128, vocab_size=300, num_kv_blocks=32, max_num_seqs=4)
    executor = ModelExecutor(folder, config, device="cpu", dtype="float32", load_format="dummy",
                             attention_backend="torch")
    model = executor.runner.model
    names = {param_name for param_name, _ in model.named_parameters()}
    qkv_bias, qk_norm = FEATURES[family(name)]
    assert any(n.endswith("qkv_proj.bias") for n in names) == qkv_bias
    assert any(n.endswith("q_norm.weight") for n in names) == qk_norm
    engine = Engine(config, executor, clock=VirtualClock())
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=list(range(3, 3 + n)), sampling_params=params) for n in (7, 20)]
    engine.run()
    assert all(len(engine.output_token_ids(request_id)) == 5 for request_id in ids)
