"""Capacity planner: SLO parsing, the early-stop rule, the rate search, ranking, outputs, report, Ray."""

import importlib.util
import json
import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis.metrics import compute_metrics
from analysis.plan_report import build_plan_report
from simulator.cluster import ClusterRun
from simulator.gpu_prices import parse_prices
from simulator.model_shape import PRESETS_DIR
from simulator.plan_table import read_plan, write_plan
from simulator.planner import PlanConfig, PlanSettings, plan, replica_builder, run_probe, search_config
from simulator.router import make_router
from simulator.slo import SloMonitor, parse_slos, slo_values
from simulator.trace_requests import TraceRequests
from traces.arrivals import Poisson
from traces.synthetic import random_workload
from twinfer.cli import main
from twinfer.cli.plan import parse_int_list

MODEL = "qwen3-0.6b"
SLOS = "ttft:150 tpot:10"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trace(count: int = 120):
    return random_workload(num_prompts=count, input_len=512, output_len=64, range_ratio=0.5,
                           arrivals=Poisson(rate=10.0), seed=3)


def _settings(**overrides):
    values = dict(model=MODEL, slos=parse_slos(SLOS), target_rate=100.0, search_steps=3)
    values.update(overrides)
    return PlanSettings(**values)


def _requests(trace, settings):
    return TraceRequests.from_trace(trace, vocab_size=151936)


def test_parse_slos_and_bad_input():
    slos = parse_slos(["ttft:2000", "tpot:100", "e2el:9000"])
    assert [(s.metric, s.percentile, s.limit_ms) for s in slos] == [
        ("ttft", 99.0, 2000.0), ("tpot", 99.0, 100.0), ("e2el", 99.0, 9000.0)]
    slos = parse_slos("ttft:2000,tpot:100", percentile=99.9)
    assert slos[1].name == "tpot_p99.9"
    for bad, message in [("ttft", "METRIC:MS"), ("ttfb:5", "unknown"), ("ttft:-1", "positive"), ("", "no objective"),
                         ("ttft:1 ttft:2", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_slos(bad)
    with pytest.raises(ValueError, match="percentile"):
        parse_slos("ttft:5", percentile=120)
    # The old form is refused in one line that spells the new one.
    with pytest.raises(ValueError, match=r"old form; write vLLM's METRIC:MS, e.g. --slo ttft:2000 --slo-percentile 99$"):
        parse_slos("ttft_p99=2000")


def test_slo_values_match_the_run_metrics(tmp_path):
    settings = _settings()
    requests = _requests(_trace(60), settings).at_rate(20.0)
    build, _ = replica_builder(PlanConfig("h100", 1, 16), settings)
    engines = [build(), build()]
    result = ClusterRun(requests, engines, make_router("least-outstanding")).run()
    values = slo_values(settings.slos, engines, now=0.0)
    metrics = compute_metrics(result.tables()[0])
    assert values["ttft_p99"] == pytest.approx(metrics.ttft.p99 * 1000, rel=1e-9)
    assert values["tpot_p99"] == pytest.approx(metrics.tpot.p99 * 1000, rel=1e-9)
    assert values["e2el_p99"] == pytest.approx(metrics.e2el.p99 * 1000, rel=1e-9)


def test_early_stop_only_when_the_slo_is_surely_broken():
    settings = _settings()
    requests = _requests(_trace(), settings)
    build, _ = replica_builder(PlanConfig("h100", 1, 8), settings)
    overloaded = run_probe(build, settings, requests, 400.0, 1, "search")
    assert overloaded.stopped_early and not overloaded.sustained
    # Run the same rate to the end: the SLO the monitor named is indeed broken.
    scaled = requests.at_rate(400.0)
    engines = [build()]
    ClusterRun(scaled, engines, make_router("round-robin")).run()
    full = slo_values(settings.slos, engines, now=0.0)
    broken = overloaded.reason.split(" ")[0]
    assert full[broken] > {"ttft_p99": 150, "tpot_p99": 10}[broken]
    easy = run_probe(build, settings, requests, 2.0, 1, "search")
    assert easy.sustained and not easy.stopped_early


@pytest.mark.parametrize("replicas", [1, 2])
def test_probes_stopped_early_give_the_verdicts_of_running_to_the_end(replicas):
    """Across rates on both sides of a configuration's edge: a probe that stops once an SLO is decided says
    sustained or not exactly as the same simulation run to its end and judged whole."""
    settings = _settings()
    requests = _requests(_trace(600), settings)
    build, _ = replica_builder(PlanConfig("h100", 1, 8), settings)
    verdicts = []
    for rate in (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 120.0, 240.0):
        probe = run_probe(build, settings, requests, rate * replicas, replicas, "verify")
        engines = [build() for _ in range(replicas)]
        ClusterRun(requests.at_rate(rate * replicas), engines, make_router("least-outstanding")).run()
        whole = slo_values(settings.slos, engines, now=0.0)
        sustained = all(whole[slo.name] <= slo.limit_ms for slo in settings.slos)
        assert probe.sustained == sustained, (rate, probe.reason, whole)
        verdicts.append((probe.sustained, probe.stopped_early))
    assert (True, False) in verdicts and (False, True) in verdicts


def test_a_request_rejected_after_the_monitors_last_look_still_fails_the_probe():
    # 201 requests: the monitor looks every 2 arrivals, so not after the last one, a prompt too long for
    # max_model_len arriving when every other request is done. No rate can serve it.
    settings = _settings(slos=parse_slos("ttft:2000"), target_rate=1.0, max_model_len=1024)
    count = 201
    rng = np.random.default_rng(0)
    lens = [64] * (count - 1) + [2000]
    requests = TraceRequests("late-long", tuple(str(i) for i in range(count)),
                               np.r_[np.arange(count - 1) * 0.01, 1000.0],
                               tuple(rng.integers(0, 1000, n).astype(np.int32) for n in lens),
                               np.full(count, 4, dtype=np.int64))
    build, _ = replica_builder(PlanConfig("h100", 1, 16), settings)
    probe = run_probe(build, settings, requests, requests.mean_rate, 1, "search")
    assert not probe.sustained and "1 request(s) rejected" in probe.reason and "max_model_len" in probe.reason


def test_monitor_threshold_is_the_percentile_rule():
    # p99 of 101 samples: broken once 2 samples exceed the limit (positions 99 and 100), not with 1.
    requests = _requests(_trace(101), _settings())
    monitor = SloMonitor(parse_slos("ttft:100"), requests)
    assert monitor._threshold == [2]
    values = np.zeros(101)
    values[-1] = 1.0
    assert np.percentile(values, 99) <= 0.1 < np.percentile(np.r_[values[:-2], 1.0, 1.0], 99)


def test_search_finds_the_edge_and_replicas_cover_the_target():
    settings = _settings(target_rate=60.0)
    window = _requests(_trace(), settings)
    result = search_config(PlanConfig("h100", 1, 16), settings, window)
    assert result.status == "ok", result.note
    search = [p for p in result.probes if p.phase == "search"]
    sustained = [p.rate for p in search if p.sustained]
    broken = [p.rate for p in search if not p.sustained]
    assert result.max_rate == max(sustained)
    above = min(r for r in broken if r > result.max_rate)
    assert above / result.max_rate <= 2 ** (1 / 2**settings.search_steps) + 1e-9
    assert result.replicas >= math.ceil(settings.target_rate / result.max_rate)
    verify = [p for p in result.probes if p.phase == "verify"]
    assert verify[-1].sustained and verify[-1].replicas == result.replicas
    assert all(not p.sustained for p in verify[:-1])


def test_plan_ranks_by_cost_and_writes_table_and_report(tmp_path):
    settings = _settings(target_rate=60.0)
    configs = [PlanConfig("h100", 1, 16), PlanConfig("h200", 1, 16), PlanConfig("h100", 2, 16)]
    result = plan(_trace(), configs, settings, prices={"h100": 2.0, "h200": 3.0}, search_requests=80,
                  verify_top=1, workers=1, show_progress=False)
    rows = result.table.to_pylist()
    ranked = [row for row in rows if row["rank"] is not None]
    assert [row["rank"] for row in ranked] == list(range(1, len(ranked) + 1))
    costs = [(row["hourly_cost"], row["gpus"]) for row in ranked]
    assert costs == sorted(costs)
    for row in ranked:
        assert row["hourly_cost"] == pytest.approx(row["gpus"] * {"h100": 2.0, "h200": 3.0}[row["gpu"]])
        assert row["gpus"] == row["replicas"] * row["tp"]
        assert row["calibration"] in ("calibrated", "composed", "roofline")
    assert ranked[0]["verified_on"] == "all 120 requests"
    assert any(row["pareto"] for row in ranked)

    paths = write_plan(result, tmp_path / "plan")
    assert pq.read_table(paths["plan.parquet"]).equals(result.table)
    assert paths["plan.csv"].read_text().startswith('"rank","gpu","tp"')
    again = read_plan(tmp_path / "plan")
    assert again.probes.num_rows == result.probes.num_rows > 0
    report = build_plan_report(again, tmp_path / "plan" / "plan.html").read_text()
    assert "fig-latency" in report and "fig-pareto" in report and "SLO ttft_p99" in report


def test_config_that_does_not_fit_is_reported_not_ranked():
    settings = _settings(model="qwen3-32b")
    result = plan(_trace(10), [PlanConfig("l4", 1, 16)], settings, prices={"l4": 0.8}, workers=1,
                  show_progress=False)
    row = result.table.to_pylist()[0]
    assert row["rank"] is None and row["status"] == "error" and "KV cache" in row["note"]


def test_missing_price_is_a_clear_error():
    with pytest.raises(ValueError, match="no price for GPU.*a100-80g.*--price"):
        plan(_trace(10), [PlanConfig("a100-80g", 1, 16)], _settings(), workers=1, show_progress=False)


def test_process_pool_gives_the_same_plan_as_one_process():
    settings = _settings(target_rate=60.0, search_steps=1)
    configs = [PlanConfig("h100", 1, 16), PlanConfig("h200", 1, 16)]
    serial = plan(_trace(60), configs, settings, verify_top=0, workers=1, show_progress=False)
    pooled = plan(_trace(60), configs, settings, verify_top=0, workers=2, show_progress=False)
    assert serial.table.equals(pooled.table)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install ray)")
def test_ray_runs_the_same_per_config_function():
    import ray

    settings = _settings(target_rate=60.0, search_steps=1)
    configs = [PlanConfig("h100", 1, 16), PlanConfig("h200", 1, 16)]
    serial = plan(_trace(60), configs, settings, verify_top=0, workers=1, show_progress=False)
    try:
        on_ray = plan(_trace(60), configs, settings, verify_top=0, ray_address="local", show_progress=False)
    finally:
        ray.shutdown()
    assert serial.table.equals(on_ray.table)


def test_plan_cli_writes_outputs(tmp_path, capsys):
    trace_path = tmp_path / "trace.csv"
    import pyarrow.csv as pa_csv

    table = _trace(60).table.select(["request_id", "arrival_time", "prompt_len", "output_len"])
    pa_csv.write_csv(table, trace_path)
    out = tmp_path / "plan"
    code = main(["plan", str(trace_path), "--model", MODEL, "--gpu", "h100,a100-80g", "--tp", "1",
                 "--max-num-seqs", "16", "--price", "a100-80g=2.0", "--slo", *SLOS.split(), "--target-rate", "40",
                 "--workers", "1", "--search-steps", "1", "--verify-top", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rank config" in printed and "roofline" in printed
    assert {p.name for p in out.iterdir()} >= {"plan.csv", "plan.parquet", "probes.parquet", "plan.json", "plan.html"}
    assert main(["plan", str(trace_path), "--model", MODEL, "--slo", "ttft_p99=5", "--target-rate", "4",
                 "--out", str(out)]) == 2
    assert "old form; write vLLM's METRIC:MS, e.g. --slo ttft:5" in capsys.readouterr().err


def test_an_slo_no_rate_can_meet_is_infeasible_after_a_few_probes():
    settings = _settings(slos=parse_slos("ttft:1"), target_rate=10.0)
    result = search_config(PlanConfig("h100", 1, 16), settings, _requests(_trace(), settings))
    assert result.status == "infeasible" and "no rate sustained" in result.note
    assert result.replicas == 0 and len(result.probes) <= 10  # not all 13 halvings


def test_whole_trace_check_takes_the_top_and_near_misses():
    from simulator.planner import _to_verify

    def row(seqs, tp, replicas, rate, price=3.0):
        return {"gpu": "h100", "tp": tp, "max_num_seqs": seqs, "rank": 1, "replicas": replicas,
                "max_rate_per_replica": rate, "price_per_gpu_hour": price, "hourly_cost": replicas * tp * price}

    rows = [row(1, 1, 1, 20.0), row(2, 1, 1, 25.0, 4.0),
            row(3, 1, 2, 14.0),   # one replica fewer would tie the best, and 14 >= 0.8 * 16
            row(4, 1, 2, 9.0),    # too far from 16 to hope
            row(5, 2, 1, 40.0)]   # one fewer is none
    assert [seqs for _, _, seqs in _to_verify(rows, 1, 16.0)] == [1, 3]
    assert [seqs for _, _, seqs in _to_verify(rows, 2, 16.0)] == [1, 2, 3]


def test_whole_trace_check_removes_replicas_a_pessimistic_window_asked_for():
    from simulator.planner import ConfigPlan, verify_config

    settings = _settings(target_rate=20.0)
    too_many = ConfigPlan(PlanConfig("h100", 1, 16), "ok", max_rate=8.0, replicas=3)
    verified = verify_config(too_many, settings, _requests(_trace(60), settings))
    assert verified.status == "ok" and verified.replicas == 1
    assert [p.replicas for p in verified.probes] == [3, 2, 1]
    assert verified.verified_on == "all 60 requests"


def test_whole_trace_check_that_adds_a_replica_does_not_rerun_the_count_that_failed():
    from simulator.planner import ConfigPlan, verify_config

    settings = _settings(target_rate=120.0)
    too_few = ConfigPlan(PlanConfig("h100", 1, 16), "ok", max_rate=100.0, replicas=1)
    verified = verify_config(too_few, settings, _requests(_trace(60), settings))
    assert verified.status == "ok" and verified.replicas == 2
    # Each probe is a simulation of the whole trace: one replica failed once, it is not simulated again.
    assert [(p.replicas, p.sustained) for p in verified.probes] == [(1, False), (2, True)]


def test_a_rate_never_seen_broken_is_shown_as_a_lower_bound(tmp_path):
    """With SLOs no rate breaks, the search stops at its ceiling: the table and the report say '>=', not a limit."""
    from simulator.plan_table import format_plan

    settings = _settings(slos=parse_slos("ttft:1000000 tpot:1000000"), target_rate=5.0)
    result = plan(_trace(40), [PlanConfig("h100", 1, 16)], settings, prices={"h100": 2.0}, search_requests=40,
                  verify_top=0, workers=1, show_progress=False)
    row = result.table.to_pylist()[0]
    assert row["status"] == "ok" and row["max_rate_is_lower_bound"] is True
    assert f">={row['max_rate_per_replica']:.2f}" in format_plan(result.table)
    write_plan(result, tmp_path / "plan")
    report = build_plan_report(read_plan(tmp_path / "plan"), tmp_path / "plan" / "plan.html").read_text()
    assert f"&gt;={row['max_rate_per_replica']:.2f}" in report

    settings = _settings(target_rate=60.0)  # SLOs that break: a measured limit, shown plainly
    broken = search_config(PlanConfig("h100", 1, 16), settings, _requests(_trace(), settings))
    assert not broken.max_rate_is_lower_bound


def test_a_tp_the_engine_cannot_shard_is_an_error_row_not_a_plan():
    """qwen3-0.6b has 8 key/value heads: TP 16 (or 3) cannot shard them, so the real engine refuses it."""
    settings = _settings()
    window = _requests(_trace(40), settings)
    for tp in (3, 16):
        result = search_config(PlanConfig("h100", tp, 16), settings, window)
        assert result.status == "error" and "must divide" in result.note and "key/value heads (8)" in result.note
    assert search_config(PlanConfig("h100", 2, 16), settings, window).status != "error"


def test_a_tp_wider_than_one_host_is_an_error_row(tmp_path):
    """A model whose heads TP 16 could shard still cannot run over 16 H100s: the engine's TP is one host's GPUs."""
    config = json.loads((PRESETS_DIR / "qwen3-0.6b.json").read_text())
    config.update(num_attention_heads=32, num_key_value_heads=16)
    model = tmp_path / "wide-heads"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    settings = _settings(model=str(model))
    window = _requests(_trace(40), settings)
    result = search_config(PlanConfig("h100", 16, 16), settings, window)
    assert result.status == "error" and "more than one h100 host (8 GPUs each)" in result.note
    assert search_config(PlanConfig("h100", 8, 16), settings, window).status != "error"


def test_roofline_rows_rank_after_calibrated_and_composed_ones_unless_mixed():
    """A cheap configuration only the roofline predicted (20-40% optimistic in BENCHMARKS.md) does not outrank one a
    profile predicted; --mix-roofline ranks them by cost alone."""
    from simulator.plan_table import EXPECTED_ERROR, rank_plans
    from simulator.planner import ConfigPlan

    settings = _settings(target_rate=10.0)
    cheap_roofline = ConfigPlan(PlanConfig("h100", 1, 16), "ok", provenance="roofline", max_rate=10.0, replicas=1)
    dearer_composed = ConfigPlan(PlanConfig("h200", 1, 16), "ok", provenance="composed", max_rate=10.0, replicas=1)
    prices = {"h100": 2.0, "h200": 3.0}
    apart = rank_plans([cheap_roofline, dearer_composed], settings, prices).to_pylist()
    assert [row["calibration"] for row in apart] == ["composed", "roofline"]
    assert apart[1]["expected_error"] == EXPECTED_ERROR["roofline"]
    mixed = rank_plans([cheap_roofline, dearer_composed], settings, prices, mix_roofline=True).to_pylist()
    assert [row["calibration"] for row in mixed] == ["roofline", "composed"]


def test_pareto_legend_names_each_markers_calibration_kind():
    from analysis.plan_report import pareto_figure

    def row(gpu, kind, cost, rate, quality=""):
        return {"gpu": gpu, "tp": 1, "max_num_seqs": 16, "calibration": kind, "calibration_quality": quality,
                "replica_hourly_cost": cost, "max_rate_per_replica": rate, "pareto": True, "gpus": 1,
                "hourly_cost": cost}
    figure = pareto_figure([row("h100", "calibrated", 2.0, 5.0), row("h100", "roofline", 4.0, 9.0),
                            row("a100-80g", "calibrated", 1.5, 3.0, "poorly calibrated: held-out MAPE 51%")])
    names = {trace.name: trace.marker.symbol for trace in figure.data if trace.mode == "markers"}
    assert names == {"h100: \u25c6 calibrated": "diamond", "h100: \u25cb roofline": "circle-open",
                     "a100-80g: \u25c6 calibrated (POORLY CALIBRATED)": "diamond"}


def test_probes_sharing_a_composed_cost_model_simulate_as_with_a_fresh_one(tmp_path):
    """A composed model fills its tables as steps ask; the planner gives one to every probe of a configuration, so a
    probe after others must see exactly the step times a model built for it alone gives."""
    from engine.engine_args import EngineArgs
    from simulator.simulated_engine import build_simulated_engine
    from tests.synthetic_operators import synthetic_operator_profile

    operators = str(synthetic_operator_profile(tmp_path / "h200_operators.parquet"))
    args = EngineArgs(model="qwen3-8b", tensor_parallel_size=2, max_num_seqs=64)
    requests = _requests(_trace(150), _settings())

    def simulate(rate: float, cost_model=None):
        engine, _ = build_simulated_engine(args, gpu="h200", profile=operators, cost_model=cost_model)
        ClusterRun(requests.at_rate(rate), [engine]).run()
        return engine

    shared = simulate(4.0).executor.cost_model
    assert shared.provenance == "composed"
    simulate(40.0, shared)  # bigger batches: the shared model's tables grow
    again, fresh = simulate(12.0, shared), simulate(12.0)
    assert again.executor.cost_model is shared and fresh.executor.cost_model is not shared
    assert len(again.step_records) > 500
    assert list(again.step_records) == list(fresh.step_records)
