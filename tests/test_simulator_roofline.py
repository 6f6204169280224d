"""Model shapes, GPU specs, KV capacity and the uncalibrated roofline give the magnitudes a user expects."""

import json
from pathlib import Path

import pytest

from engine.stats import BatchFeatures
from simulator.gpu_specs import gpu_key, gpu_spec
from simulator.kv_capacity import estimate_num_kv_blocks
from simulator.model_shape import ModelShape
from simulator.roofline import Roofline


def decode(num_seqs: int, context: int) -> BatchFeatures:
    return BatchFeatures(0, 0, num_seqs, num_seqs, num_seqs * context, 0, 0.0, num_seqs)


def prefill(tokens: int) -> BatchFeatures:
    return BatchFeatures(1, tokens, 0, 0, 0, 0, tokens * (tokens + 1) / 2, tokens)


@pytest.mark.parametrize("preset, billions", [("qwen3-0.6b", 0.596), ("qwen3-8b", 8.19), ("llama-3-8b", 8.03), ("qwen3-32b", 32.8)])
def test_parameter_counts_match_the_published_sizes(preset, billions):
    assert ModelShape.load(preset).num_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_kv_bytes_per_token():
    # Qwen3-8B: 36 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes.
    assert ModelShape.load("qwen3-8b").kv_bytes_per_token("bfloat16") == 36 * 8 * 128 * 2 * 2


def test_qwen3_8b_decode_at_batch_1_on_h100_reads_its_weights():
    roofline = Roofline(gpu_spec("h100"), ModelShape.load("qwen3-8b"))
    seconds = roofline.predict(decode(1, 1000), cuda_graph_batch_size=1)
    assert 5e-3 < seconds < 6.5e-3  # ~16 GB at ~3 TB/s
    assert not roofline.calibrated and "uncalibrated" in roofline.label


def test_roofline_orders_gpus_batches_and_tp_sensibly():
    shape = ModelShape.load("qwen3-8b")
    h100, h200 = Roofline(gpu_spec("h100"), shape), Roofline(gpu_spec("h200"), shape)
    assert h200.predict(decode(1, 1000), 1) < h100.predict(decode(1, 1000), 1)
    # Decode is weight-read bound: 64 sequences cost far less than 64 single ones.
    assert h100.predict(decode(64, 1000), 64) < 2 * h100.predict(decode(1, 1000), 1)
    # A long prefill is compute bound: 8192 tokens of an 8B model is ~134 TFLOP, ~0.1-0.3 s on an H100.
    assert 0.1 < h100.predict(prefill(8192)) < 0.3
    # Long contexts cost KV reads.
    assert h100.predict(decode(64, 8000), 64) > h100.predict(decode(64, 100), 64) * 1.5
    # TP=2 halves each GPU's weight read; host time and the all-reduces do not shrink.
    tp1_seconds = h100.predict(decode(1, 1000), 1)
    tp2_seconds = Roofline(gpu_spec("h100"), shape, tp=2).predict(decode(1, 1000), 1)
    assert 0.5 * tp1_seconds < tp2_seconds < 0.8 * tp1_seconds


def test_kv_capacity_sizes_like_the_engine():
    shape = ModelShape.load("qwen3-8b")
    blocks = estimate_num_kv_blocks(gpu_spec("h100"), shape, max_num_batched_tokens=8192)
    tokens = blocks * 16
    # 0.9 * 79 GiB - 15.3 GiB of weights - activations leaves ~54 GiB: ~390k tokens at 144 KiB each.
    assert 330_000 < tokens < 420_000
    assert estimate_num_kv_blocks(gpu_spec("h200"), shape) > 1.8 * blocks
    with pytest.raises(ValueError, match="leaves no room for a KV cache on l4"):
        estimate_num_kv_blocks(gpu_spec("l4"), ModelShape.load("qwen3-32b"))


REAL_H100_DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "h100"


@pytest.mark.parametrize("source, max_num_seqs", [
    ("runs/real-h100-qwen3-0.6b-azure-conv/metadata.json", 1024),
    ("session3/throughput.json", 256),
])
def test_kv_capacity_matches_the_real_engine_on_an_h100(source, max_num_seqs):
    # The real engine's profiling pass samples max_num_seqs rows of 152k-token logits with top-k/top-p on:
    # ~5 GiB at 1024 seqs, which an estimate counting two float32 copies missed by 6% of the cache.
    path = REAL_H100_DATA / source
    if not path.is_file():
        pytest.skip(f"{path} not present")
    recorded = json.loads(path.read_text())
    real_blocks = recorded["num_kv_blocks"] if "num_kv_blocks" in recorded else recorded["twinfer"]["num_kv_blocks"]
    estimate = estimate_num_kv_blocks(
        gpu_spec("h100"), ModelShape.load("qwen3-0.6b"), max_num_batched_tokens=8192, max_num_seqs=max_num_seqs,
        gpu_memory_utilization=0.9,
    )
    assert abs(estimate / real_blocks - 1) < 0.015, (estimate, real_blocks)


def test_gpu_names_and_unknown_models():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_key("NVIDIA H200") == "h200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "a100-80g"
    assert gpu_key("NVIDIA A100-SXM4-40GB") == "a100-40g"
    assert gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_key("NVIDIA L4") == "l4" and gpu_key("NVIDIA L40S") == "l40s"
    # Other cards that merely contain a known name keep their own key, not a wrong spec.
    assert gpu_key("NVIDIA L40") == "l40" and gpu_key("NVIDIA GH200 480GB") == "gh200-480gb"
    with pytest.raises(KeyError, match="unknown GPU 'l40'"):
        gpu_spec("l40")
    with pytest.raises(KeyError, match="known GPUs: .*h100"):
        gpu_spec("tpu-v5")
    with pytest.raises(FileNotFoundError, match="neither a preset .*qwen3-8b"):
        ModelShape.load("no-such-model")


def test_config_errors_name_the_field(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        ModelShape.load(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="config.json: line 1"):
        ModelShape.load(tmp_path)


def test_simulating_an_unknown_gpu_is_an_error_naming_the_known_ones(tmp_path, capsys):
    from twinfer.cli import main

    code = main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "tpu-v5", "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 2
    assert "unknown GPU 'tpu-v5'; known GPUs: a100-40g" in capsys.readouterr().err
