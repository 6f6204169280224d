"""Real-vs-simulated comparison on two runs whose errors are known by construction: an engine run and
the same run with its times changed."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from analysis.compare import compare_runs
from analysis.run_store import Run, run_metadata
from tests.runs import engine_run

TIME_COLUMNS = ("arrival_time", "first_scheduled_time", "first_token_time", "finish_time", "ttft", "tpot", "e2e")


def scaled_requests(requests: pa.Table, factor: float) -> pa.Table:
    """Every time (and so every latency) multiplied by factor."""
    for name in TIME_COLUMNS:
        requests = requests.set_column(requests.schema.get_field_index(name), name,
                                       pc.multiply(requests.column(name), factor))
    token_times = requests.column("token_times").combine_chunks()
    scaled = pa.ListArray.from_arrays(token_times.offsets, pc.multiply(token_times.values, factor))
    return requests.set_column(requests.schema.get_field_index("token_times"), "token_times", scaled)


def with_durations(steps: pa.Table, durations) -> pa.Table:
    return steps.set_column(steps.schema.get_field_index("duration"), "duration", pa.array(durations, pa.float64()))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    requests, steps = engine_run(60, request_rate=30.0, seed=2)
    return Run(tmp_path_factory.mktemp("real"), requests, steps,
               run_metadata(executor_kind="gpu", trace_fingerprint="abc", name="real"))


def sim_of(real: Run, requests: pa.Table, steps: pa.Table, fingerprint="abc") -> Run:
    return Run(real.path.parent / "sim", requests, steps,
               run_metadata(executor_kind="sim", trace_fingerprint=fingerprint, name="sim"))


def test_uniformly_slower_simulation(real_run):
    durations = real_run.steps.column("duration").to_numpy()
    sim = sim_of(real_run, scaled_requests(real_run.requests, 1.1), with_durations(real_run.steps, durations * 1.1))
    comparison = compare_runs(real_run, sim)
    assert comparison.identical_schedules
    assert comparison.num_matched_steps == real_run.steps.num_rows
    assert comparison.step_mape == pytest.approx(0.10)
    assert comparison.busy_time_error == pytest.approx(0.10)
    errors = {(r["metric"], r["statistic"]): r["relative_error"] for r in comparison.metric_errors.to_pylist()}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for statistic in ("mean", "p50", "p90", "p99"):
            assert errors[(metric, statistic)] == pytest.approx(0.10), (metric, statistic)
    for metric in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert errors[(metric, "")] == pytest.approx(1 / 1.1 - 1)
    text = comparison.to_text()
    assert "Step duration MAPE:                      10.00%" in text
    assert "Schedules:                               identical" in text
    assert "+10.00%" in text and "-9.09%" in text


def test_mixed_step_errors_give_their_mape(real_run):
    durations = real_run.steps.column("duration").to_numpy()
    factors = np.where(np.arange(durations.size) % 2 == 0, 1.2, 0.9)  # +20% and -10%: MAPE 15% when even count
    sim = sim_of(real_run, real_run.requests, with_durations(real_run.steps, durations * factors))
    comparison = compare_runs(real_run, sim)
    expected = np.abs(factors - 1).mean()
    assert comparison.step_mape == pytest.approx(expected)
    assert comparison.step_errors.column("relative_error").to_numpy() == pytest.approx(factors - 1)


def test_divergent_schedule_is_reported(real_run):
    steps = real_run.steps
    prefill = steps.column("num_prefill_tokens").to_numpy().copy()
    prefill[5] += 1
    diverged = steps.set_column(steps.schema.get_field_index("num_prefill_tokens"), "num_prefill_tokens",
                                pa.array(prefill))
    comparison = compare_runs(real_run, sim_of(real_run, real_run.requests, diverged.slice(0, steps.num_rows - 3)))
    assert not comparison.identical_schedules
    assert comparison.first_divergent_step == 5
    assert comparison.num_matched_steps == steps.num_rows - 4
    assert comparison.step_mape == pytest.approx(0.0)
    assert "diverge at step 5" in comparison.to_text()
    # Only a length difference: the first step the shorter run lacks.
    shorter = compare_runs(real_run, sim_of(real_run, real_run.requests, steps.slice(0, 10)))
    assert shorter.first_divergent_step == 10 and shorter.num_matched_steps == 10


def test_different_traces_are_refused(real_run):
    other = sim_of(real_run, real_run.requests, real_run.steps, fingerprint="xyz")
    with pytest.raises(ValueError, match="different traces"):
        compare_runs(real_run, other)


def test_comparison_as_json(real_run):
    import json

    durations = real_run.steps.column("duration").to_numpy()
    comparison = compare_runs(real_run, sim_of(real_run, real_run.requests, with_durations(real_run.steps, durations * 0.95)))
    data = json.loads(json.dumps(comparison.to_dict(), allow_nan=False))
    assert data["step_mape"] == pytest.approx(0.05)
    assert data["identical_schedules"] is True
    assert {"metric": "ttft", "statistic": "p99"}.items() <= data["metric_errors"][3].items()
    assert comparison.format() == comparison.to_text()


def test_step_predictor_measures_the_cost_model_on_real_batches(real_run):
    # Schedules that diverged at step 0 have no matched step, but a predictor still scores every real step.
    steps = real_run.steps
    shuffled = steps.take(np.roll(np.arange(steps.num_rows), 1))
    predictor = lambda table: table.column("duration").to_numpy() * 1.04  # noqa: E731
    comparison = compare_runs(real_run, sim_of(real_run, real_run.requests, shuffled), step_predictor=predictor)
    assert comparison.predicted_step_mape == pytest.approx(0.04)
    assert comparison.predicted_step_errors.num_rows == steps.num_rows
    assert f"cost model on real batches: 4.00% ({steps.num_rows} steps)" in " ".join(comparison.to_text().split())
    with pytest.raises(ValueError, match="predictions for"):
        compare_runs(real_run, real_run, step_predictor=lambda table: np.zeros(3))


def test_incomplete_runs_and_different_requests_are_flagged(real_run):
    # The simulation stopped early: the first 40 requests only, marked incomplete.
    partial = real_run.requests.slice(0, 40)
    stopped = Run(real_run.path.parent / "sim", partial, real_run.steps,
                  run_metadata(executor_kind="sim", trace_fingerprint="abc", name="sim", complete=False))
    comparison = compare_runs(real_run, stopped)
    text = comparison.to_text()
    assert "WARNING: the simulated run" in text and "is incomplete" in text
    assert "60 real and 40 simulated requests, 40 in common" in text
    assert comparison.to_dict()["warnings"] == list(comparison.warnings)
    assert not compare_runs(real_run, sim_of(real_run, real_run.requests, real_run.steps)).warnings
    # Without trace fingerprints, different requests mean different traces: refused, not compared.
    renamed = real_run.requests.set_column(0, "request_id", pa.array([f"x{i}" for i in range(60)]))
    unknown = Run(real_run.path.parent / "sim", renamed, real_run.steps, run_metadata(executor_kind="sim"))
    with pytest.raises(ValueError, match="hold different requests .* do not both record a trace fingerprint"):
        compare_runs(real_run, unknown)


def test_a_latency_without_samples_has_no_error(real_run):
    # Every request of the simulated run produced one token: it has no TPOT or ITL at all, which is not a
    # -100% error (nor, when neither run has any, a perfect match).
    requests = real_run.requests
    one_token = requests.set_column(requests.schema.get_field_index("tpot"), "tpot",
                                    pa.nulls(requests.num_rows, pa.float64()))
    one_token = one_token.set_column(one_token.schema.get_field_index("output_len"), "output_len",
                                     pa.array(np.ones(requests.num_rows, np.int64)))
    first_only = pc.list_slice(one_token.column("token_times"), 0, 1)
    one_token = one_token.set_column(one_token.schema.get_field_index("token_times"), "token_times", first_only)
    comparison = compare_runs(real_run, sim_of(real_run, one_token, real_run.steps))
    errors = {(r["metric"], r["statistic"]): r["relative_error"] for r in comparison.metric_errors.to_pylist()}
    assert np.isnan(errors[("tpot", "mean")]) and np.isnan(errors[("itl", "p99")])
    assert errors[("ttft", "mean")] == pytest.approx(0.0)
    assert "p99 tpot (ms)" in comparison.to_text()
    both = compare_runs(sim_of(real_run, one_token, real_run.steps), sim_of(real_run, one_token, real_run.steps))
    assert all(np.isnan(r["relative_error"]) for r in both.metric_errors.to_pylist() if r["metric"] == "tpot")
