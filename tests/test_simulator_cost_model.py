"""The calibrated cost model: scalar and vectorized predictions agree, JSON round trips, bad files are named."""

import json
import random

import numpy as np
import pytest

from engine.stats import BatchFeatures
from simulator.cost_model import CostModel, FEATURE_COLUMNS

COEFFICIENTS = {
    "step": 2e-3,
    "eager_step": 3e-3,
    "mixed_step": 1e-3,
    "decode_seq": 5e-6,
    "prefill_seq": 2e-5,
    "prefill_token": 3e-8,
    "token": 1e-7,
    "token_over_128": 1.5e-6,
    "token_over_1024": 2e-7,
    "prefill_attention_pair": 1e-11,
    "decode_context_token": 4e-8,
    "mixed_decode_context_token": 6e-8,
    "prefill_context_token": 2e-8,
}


def make_model(**overrides) -> CostModel:
    return CostModel("h100", "qwen3-0.6b", 1, "bfloat16", COEFFICIENTS, **overrides)


def random_features(rng: random.Random) -> tuple[BatchFeatures, int]:
    num_decode = rng.randint(0, 600)
    num_prefill = rng.randint(0 if num_decode else 1, 4)
    prefill_tokens = sum(rng.randint(1, 2048) for _ in range(num_prefill))
    prefill_context = rng.randint(0, 4096) * (num_prefill > 0)
    features = BatchFeatures(
        num_prefill_seqs=num_prefill,
        num_prefill_tokens=prefill_tokens,
        num_decode_seqs=num_decode,
        num_decode_tokens=num_decode,
        decode_context_tokens=num_decode * rng.randint(1, 4096),
        prefill_context_tokens=prefill_context,
        prefill_attention_work=prefill_tokens * (prefill_context + (prefill_tokens + 1) / 2),
        num_batched_tokens=prefill_tokens + num_decode,
    )
    graph = 0 if num_prefill or num_decode > 512 or rng.random() < 0.2 else min(512, -(-num_decode // 8) * 8)
    return features, graph


@pytest.mark.parametrize("eager_overlap", [False, True])
def test_scalar_and_vectorized_predictions_agree(eager_overlap):
    rng = random.Random(1)
    model = make_model(eager_overlap=eager_overlap)
    samples = [random_features(rng) for _ in range(300)]
    columns = {name: [getattr(f, name) for f, _ in samples] for name in FEATURE_COLUMNS if name != "cuda_graph_batch_size"}
    columns["cuda_graph_batch_size"] = [graph for _, graph in samples]
    vectorized = model.predict_columns(columns)
    scalar = np.array([model.predict(f, graph) for f, graph in samples])
    np.testing.assert_allclose(scalar, vectorized, rtol=1e-12)


def test_a_step_mixing_prefill_and_decodes_costs_mixed_step_more():
    model = make_model()
    prefill_only = BatchFeatures(1, 64, 0, 0, 0, 0, 64 * 32.5, 64)
    with_one_decode = BatchFeatures(1, 64, 1, 1, 100, 0, 64 * 32.5, 65)
    decode_only = BatchFeatures(0, 0, 1, 1, 100, 0, 0.0, 1)
    extra = model.predict(with_one_decode, 0) - model.predict(prefill_only, 0)
    # One more decode row: its host and context costs, a token, and the mixed step's second kernel.
    assert extra == pytest.approx(1e-3 + 5e-6 + 1e-7 + 100 * 6e-8)
    assert model.predict(decode_only, 0) == pytest.approx(2e-3 + 3e-3 + 5e-6 + 1e-7 + 100 * 4e-8)


def test_serving_overhead_applies_to_eager_steps_only():
    plain = make_model()
    serving = CostModel("h100", "qwen3-0.6b", 1, "bfloat16", {**COEFFICIENTS, "serving_eager_step": 7e-4})
    mixed = BatchFeatures(1, 64, 1, 1, 100, 0, 64 * 32.5, 65)
    decode = BatchFeatures(0, 0, 8, 8, 800, 0, 0.0, 8)
    assert serving.predict(mixed, 0) - plain.predict(mixed, 0) == pytest.approx(7e-4)
    assert serving.predict(decode, 8) == plain.predict(decode, 8)
    # The bulk decode path adds it the same way, bit for bit.
    assert serving.predict_decode_run(8, 800, 1)[0] == serving.predict(decode, 0)


def test_graph_steps_cost_the_padded_batch_and_skip_launch_overhead():
    model = make_model()
    features = BatchFeatures(0, 0, 130, 130, 130 * 100, 0, 0.0, 130)
    eager = model.predict(features, 0)
    graph = model.predict(features, 136)
    # The graph runs 136 rows through the matmuls but saves the eager launch cost.
    assert graph == pytest.approx(eager - 3e-3 + 136 * 1e-7 - 130 * 1e-7 + (136 - 130) * 1.5e-6)


def test_overlapping_launches_hide_short_gpu_work():
    model = make_model(eager_overlap=True)
    tiny = BatchFeatures(1, 8, 0, 0, 0, 0, 36.0, 8)
    huge = BatchFeatures(1, 8192, 0, 0, 0, 0, 8192 * 8193 / 2, 8192)
    host = 2e-3 + 2e-5 + 3e-8 * 8
    assert model.predict(tiny) == pytest.approx(host + 3e-3)  # launch-bound: GPU work hidden
    assert make_model().predict(huge) - model.predict(huge) == pytest.approx(3e-3)  # launches hidden


def test_save_load_round_trip(tmp_path):
    model = make_model(fit_report={"heldout_mape": 0.02}, eager_overlap=True)
    path = tmp_path / "profile.json"
    model.save(path)
    loaded = CostModel.load(path)
    rng = random.Random(2)
    for _ in range(50):
        features, graph = random_features(rng)
        assert loaded.predict(features, graph) == model.predict(features, graph)
    assert loaded.fit_report == {"heldout_mape": 0.02}
    assert path.stat().st_size < 4096


def test_bad_profile_files_name_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: line 1"):
        CostModel.load(path)
    data = make_model().to_json()
    data["coefficients"]["token"] = -1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: .*'token' must be a non-negative"):
        CostModel.load(path)
    del data["knots"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing field 'knots'"):
        CostModel.load(path)
    with pytest.raises(ValueError, match=r"unknown terms \['token_over_99'\]"):
        CostModel("h100", "m", 1, "bfloat16", {"token_over_99": 1.0})
