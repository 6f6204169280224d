"""Calibration quality gates: a fit above 10% held-out MAPE, or with too few serving-loop steps, is stored as
poorly calibrated, warned about when written and when used, and shown in run metadata and plan rows."""

import json

import numpy as np
import pyarrow as pa
import pytest

from analysis.run_store import read_run
from simulator.calibrate import fit
from simulator.calibration_quality import MAX_HELDOUT_MAPE, PoorCalibrationWarning, assess, quality_of
from simulator.cost_model import CostModel
from simulator.plan_table import format_plan
from tests.runs import engine_run
from twinfer.cli import main


@pytest.fixture(scope="module")
def steps_table():
    return engine_run(200, request_rate=20.0, seed=2)[1]


@pytest.fixture(scope="module")
def steps(steps_table):
    return {name: steps_table.column(name).to_numpy().astype(np.float64) for name in steps_table.column_names}


def fitted(columns, serving=1.0):
    columns = {**columns, "serving": np.full(len(columns["duration"]), serving)}
    return fit(columns, gpu="h100", model="qwen3-0.6b", source="test")


def test_a_good_fit_passes(steps):
    report = fitted(steps).cost_model.fit_report
    assert report["heldout_mape"] < MAX_HELDOUT_MAPE
    assert report["num_serving_steps"] == len(steps["duration"]) >= 100
    assert report["calibration_quality"] == {"poorly_calibrated": False, "reasons": []}


def test_noisy_steps_are_poorly_calibrated(steps):
    noisy = dict(steps, duration=steps["duration"] * np.random.default_rng(0).lognormal(0, 0.8, len(steps["duration"])))
    quality = fitted(noisy).cost_model.fit_report["calibration_quality"]
    assert quality["poorly_calibrated"] and "held-out MAPE" in quality["reasons"][0]


def test_a_grid_without_serving_steps_is_poorly_calibrated(steps):
    quality = fitted(steps, serving=0.0).cost_model.fit_report["calibration_quality"]
    assert quality["poorly_calibrated"] and "only 0 serving-loop steps" in quality["reasons"][0]


def test_bundled_profiles_pass_and_old_reports_are_assessed():
    from simulator.profile_library import load_profile

    for model in ("qwen3-0.6b", "qwen3-8b"):
        assert quality_of(load_profile("h200", model))["poorly_calibrated"] is False
    assert assess({"heldout_mape": 0.51})["reasons"] == ["held-out MAPE 51% is above 10%"]


@pytest.fixture(scope="module")
def poor_profile(steps, tmp_path_factory):
    noisy = dict(steps, duration=steps["duration"] * np.random.default_rng(0).lognormal(0, 0.8, len(steps["duration"])))
    path = tmp_path_factory.mktemp("profiles") / "poor.json"
    fitted(noisy).cost_model.save(path)
    return path


def test_poor_profile_warned_when_used_and_recorded_in_the_run(poor_profile, tmp_path, capsys):
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--profile", str(poor_profile),
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: calibrated h100 qwen3-0.6b tp1 bfloat16 is poorly calibrated: held-out MAPE" in err
    assert "(used to simulate)" in err
    assert read_run(tmp_path / "run").metadata["calibration_quality"]["poorly_calibrated"] is True
    # Loaded back, the profile keeps its verdict.
    assert quality_of(CostModel.load(poor_profile))["poorly_calibrated"] is True
    with pytest.warns(PoorCalibrationWarning):
        from simulator.calibration_quality import warn_if_poor
        warn_if_poor(CostModel.load(poor_profile), "a check")


def test_poor_fit_warned_when_written_by_calibrate(steps_table, tmp_path, capsys):
    import pyarrow.parquet as pq

    from analysis.run_schema import STEPS_SCHEMA

    steps = steps_table
    noise = np.random.default_rng(0).lognormal(0, 0.8, steps.num_rows)
    steps = steps.set_column(steps.schema.get_field_index("duration"), STEPS_SCHEMA.field("duration"),
                             pa.array(steps.column("duration").to_numpy() * noise))
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(steps, run / "steps.parquet")
    out = tmp_path / "fit.json"
    assert main(["calibrate", str(run), "--gpu", "h100", "--model", "qwen3-0.6b", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "is poorly calibrated" in captured.err and f"written to {out}" in captured.err
    assert json.loads(out.read_text())["fit"]["calibration_quality"]["poorly_calibrated"] is True


def test_plan_rows_show_a_poor_calibration():
    from simulator.plan_table import PLAN_SCHEMA

    row = {name: None for name in PLAN_SCHEMA.names}
    row.update(rank=1, gpu="h100", tp=1, max_num_seqs=16, status="ok", replicas=1, gpus=1, max_rate_per_replica=2.0,
               max_rate_is_lower_bound=False, hourly_cost=2.5, calibration="calibrated",
               calibration_quality="poorly calibrated: held-out MAPE 51% is above 10%")
    assert "calibrated (POORLY CALIBRATED)" in format_plan(pa.Table.from_pylist([row], schema=PLAN_SCHEMA))
