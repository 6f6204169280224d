"""Which cost model a (gpu, model, tp, dtype) gets: explicit file > bundled calibrated > composed from the GPU's
operator profile > roofline; `kind` forces one; every kind says its provenance and round-trips through a run."""

import warnings

import numpy as np
import pytest

from analysis.run_store import read_run
from engine.stats import BatchFeatures
from simulator.composed import ComposedCostModel
from simulator.cost_model import CostModel
from simulator.profile_library import (
    PROFILES_DIR,
    cost_model_for,
    operator_profile_filename,
    step_predictor_of,
)
from simulator.roofline import Roofline
from simulator.simulated_engine import build_simulated_engine
from tests.synthetic_operators import synthetic_operator_profile
from traces.arrivals import Poisson
from traces.synthetic import random_workload
from twinfer.cli import build_parser
from twinfer.cli.options import engine_args_from
from twinfer.replay import replay


@pytest.fixture(scope="module")
def operators_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("operators")
    synthetic_operator_profile(directory / operator_profile_filename("h200"), models=("qwen3-0.6b", "qwen3-8b"))
    return directory


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    return result, [str(warning.message) for warning in caught]


def test_a_bundled_calibrated_profile_comes_first(operators_dir):
    model, warned = quietly(cost_model_for, "h200", "qwen3-8b", operator_profiles_dir=operators_dir)
    assert isinstance(model, CostModel) and model.provenance == "calibrated" and not warned


def test_an_unprofiled_model_is_composed_from_the_gpus_operator_profile(operators_dir):
    model, warned = quietly(cost_model_for, "NVIDIA H200", "qwen3-4b", operator_profiles_dir=operators_dir)
    assert isinstance(model, ComposedCostModel) and model.provenance == "composed" and not model.calibrated
    assert not warned and model.label.startswith("composed h200 qwen3-4b tp1 bfloat16")


def test_without_an_operator_profile_the_roofline_warns(tmp_path, operators_dir):
    model, warned = quietly(cost_model_for, "h100", "qwen3-4b", operator_profiles_dir=operators_dir)
    assert isinstance(model, Roofline) and model.provenance == "roofline"
    assert "no calibrated profile" in warned[0] and "no operator profile for gpu=h100" in warned[0]
    assert "uncalibrated roofline" in warned[0]


def test_an_operator_profile_that_cannot_compose_the_model_falls_back_and_says_why(tmp_path):
    synthetic_operator_profile(tmp_path / "h200_operators.parquet", head_dims=(64,))
    model, warned = quietly(cost_model_for, "h200", "qwen3-4b", operator_profiles_dir=tmp_path)
    assert isinstance(model, Roofline) and "no decode_attention rows for head_dim 128" in warned[0]
    with pytest.raises(ValueError, match="head_dim 128"):
        cost_model_for("h200", "qwen3-4b", kind="composed", operator_profiles_dir=tmp_path)


def test_kind_forces_one(operators_dir):
    composed = cost_model_for("h200", "qwen3-8b", kind="composed", operator_profiles_dir=operators_dir)
    assert composed.provenance == "composed"
    roofline, warned = quietly(cost_model_for, "h200", "qwen3-8b", kind="roofline")
    assert roofline.provenance == "roofline" and not warned
    with pytest.raises(FileNotFoundError, match="no calibrated profile for gpu=h200 model=qwen3-4b"):
        cost_model_for("h200", "qwen3-4b", kind="calibrated")
    with pytest.raises(FileNotFoundError, match=r"no operator profile for gpu=h100.*twinfer profile --operators"):
        cost_model_for("h100", "qwen3-8b", kind="composed", operator_profiles_dir=operators_dir)
    with pytest.raises(ValueError, match="cost model kind 'fitted' is unknown"):
        cost_model_for("h200", "qwen3-8b", kind="fitted")


def test_an_explicit_file_wins_and_its_kind_is_checked(operators_dir):
    operators = operators_dir / "h200_operators.parquet"
    assert isinstance(cost_model_for("h100", "qwen3-8b", profile_path=operators), ComposedCostModel)
    calibrated = PROFILES_DIR / "h200_qwen3-8b_tp1_bfloat16.json"
    assert isinstance(cost_model_for("h100", "qwen3-4b", profile_path=calibrated), CostModel)
    with pytest.raises(ValueError, match="is an operator profile, which gives a composed cost model, not a calibrated"):
        cost_model_for("h200", "qwen3-8b", profile_path=operators, kind="calibrated")


@pytest.mark.parametrize("cost_model, provenance, flags", [
    ("auto", "composed", []), ("roofline", "roofline", []),
    # The engine's table width and host/device overlap reach the composed model, its run's metadata, and back.
    ("auto", "composed", ["--max-model-len", "4096", "--async-scheduling"])])
def test_a_simulated_run_stores_its_cost_model_and_predicts_its_own_steps_back(tmp_path, operators_dir, cost_model,
                                                                                provenance, flags):
    args = build_parser().parse_args(["simulate", "unused", "--model", "qwen3-0.6b", "--out", "unused", *flags])
    profile = str(operators_dir / "h200_operators.parquet") if cost_model == "auto" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, metadata = build_simulated_engine(engine_args_from(args), gpu="h200", profile=profile,
                                                  cost_model_kind=cost_model)
    assert metadata["provenance"] == provenance and metadata["calibrated"] is False
    if flags:
        assert (engine.executor.cost_model.max_model_len, engine.executor.cost_model.async_scheduling) == (4096, True)
    trace = random_workload(num_prompts=40, input_len=500, output_len=40, range_ratio=0.9, arrivals=Poisson(rate=30.0),
                            seed=2)
    path = replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False, metadata=metadata).path
    run = read_run(path)
    predicted = step_predictor_of(run)(run.steps)
    np.testing.assert_allclose(predicted, run.steps.column("duration").to_numpy(), rtol=1e-9)


def test_the_calibrated_model_round_trips_through_a_run_too(tmp_path):
    args = build_parser().parse_args(["simulate", "unused", "--model", "qwen3-0.6b", "--out", "unused"])
    engine, metadata = build_simulated_engine(engine_args_from(args), gpu="h200")
    assert metadata["provenance"] == "calibrated" and metadata["calibrated"] is True
    trace = random_workload(num_prompts=20, input_len=200, output_len=20, range_ratio=0.9, arrivals=Poisson(rate=30.0),
                            seed=1)
    run = read_run(replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False,
                          metadata=metadata).path)
    np.testing.assert_allclose(step_predictor_of(run)(run.steps), run.steps.column("duration").to_numpy(), rtol=1e-9)


PRESETS = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "llama-3-8b", "llama-3-70b",
           "qwen2.5-7b", "qwen2.5-72b"]


def test_the_bundled_h200_operator_profile_composes_every_preset():
    """On an H200 a model without a calibrated profile is composed from the shipped operator profile, at any TP, and
    bigger models take longer per decode step."""
    decode_ms = {}
    for model in PRESETS:
        composed, warned = quietly(cost_model_for, "h200", model, kind="composed")
        assert composed.provenance == "composed" and not warned
        tp4, _ = quietly(cost_model_for, "h200", model, tp=4, kind="composed")
        step = BatchFeatures(0, 0, 32, 32, 32 * 1000, 0, 0.0, 32)
        decode_ms[model] = composed.predict(step, 32) * 1e3
        assert 0 < tp4.predict(step, 32) < composed.predict(step, 32)
    assert quietly(cost_model_for, "h200", "llama-3-8b")[0].provenance == "composed"  # auto: no calibrated one
    assert decode_ms["qwen3-0.6b"] < decode_ms["qwen3-8b"] < decode_ms["qwen3-32b"] < decode_ms["qwen2.5-72b"]
    # An 8B decode step of 32 sequences on an H200 reads 16 GB of weights: several milliseconds, not one or fifty.
    assert 4 < decode_ms["qwen3-8b"] < 15


@pytest.mark.parametrize("cost_model, warned", [("roofline", True), ("auto", False)])
def test_asynchronous_scheduling_on_a_model_of_synchronous_steps_is_said(operators_dir, caplog, cost_model, warned):
    """Only a composed model overlaps host and device; with any other, asynchronous scheduling is warned about."""
    args = build_parser().parse_args(["simulate", "unused", "--model", "qwen3-0.6b", "--out", "unused",
                                      "--async-scheduling"])
    profile = str(operators_dir / "h200_operators.parquet") if cost_model == "auto" else None
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("ignore")
        build_simulated_engine(engine_args_from(args), gpu="h200", profile=profile, cost_model_kind=cost_model)
    assert ("come out long where the host's work would overlap" in caplog.text) == warned
