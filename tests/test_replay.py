"""Replay: every trace request lands in the run folder, interrupts keep the finished part, the CLI round trip."""

import json
import re

import pytest

from analysis.metrics import compute_metrics
from analysis.run_store import read_run
from twinfer.cli import main
from engine.config import EngineConfig
from engine.engine import Engine
from traces.arrivals import Poisson
from twinfer.replay import replay
from traces.synthetic import random_workload
from tests.fake_executor import PredictingExecutor


def _trace(num_prompts=30):
    return random_workload(num_prompts=num_prompts, input_len=40, output_len=12, range_ratio=0.5,
                           arrivals=Poisson(rate=50.0), seed=3)


def test_every_request_is_in_the_run_finished_or_rejected(tmp_path):
    trace = _trace()
    # A cache of 4 blocks of 16 tokens cannot hold the longest prompts: those are rejected, with the reason.
    config = EngineConfig(block_size=16, max_model_len=512, num_kv_blocks=4, vocab_size=1000)
    engine = Engine(config, PredictingExecutor(4, 16))
    path = replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False).path
    run = read_run(path)
    requests = run.requests.to_pylist()
    assert sorted(r["request_id"] for r in requests) == sorted(trace.table.column("request_id").to_pylist())
    rejected = [r for r in requests if r["status"] == "rejected"]
    finished = [r for r in requests if r["status"] == "finished"]
    assert rejected and finished and len(rejected) + len(finished) == len(requests)
    assert all("KV blocks" in r["reason"] for r in rejected)
    lengths = dict(zip(trace.table.column("request_id").to_pylist(), trace.table.column("output_len").to_pylist()))
    assert all(r["output_len"] == lengths[r["request_id"]] for r in finished)
    assert run.metadata["complete"] is True and run.metadata["executor_kind"] == "sim"
    assert run.steps.num_rows == engine.step_records.num_drained  # streamed out as the run went


class InterruptingExecutor(PredictingExecutor):
    """Raises after some steps, as Ctrl-C or a failing GPU would."""

    def __init__(self, *args, fail_after: int, error: BaseException) -> None:
        super().__init__(*args)
        self.fail_after = fail_after
        self.error = error

    def execute(self, scheduler_output):
        if len(self.steps) == self.fail_after:
            raise self.error
        return super().execute(scheduler_output)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("device lost")])
def test_an_interrupted_replay_keeps_what_finished(tmp_path, capsys, error):
    trace = _trace(40)
    executor = InterruptingExecutor(400, 16, fail_after=60, error=error)
    config = EngineConfig(block_size=16, max_model_len=512, num_kv_blocks=400, vocab_size=1000)
    engine = Engine(config, executor, fast_forward=False)
    if isinstance(error, KeyboardInterrupt):
        path = replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False).path
    else:
        with pytest.raises(RuntimeError, match="finished part is in"):
            replay(trace, engine, tmp_path / "run", executor_kind="sim", show_progress=False)
        path = tmp_path / "run"
    run = read_run(path)
    assert run.metadata["complete"] is False
    statuses = run.requests.column("status").to_pylist()
    assert len(statuses) == 40
    assert "finished" in statuses and "aborted" in statuses
    assert set(statuses) <= {"finished", "aborted"}
    reasons = [r for r, s in zip(run.requests.column("reason").to_pylist(), statuses) if s == "aborted"]
    assert all(("interrupted" in r) or ("device lost" in r) for r in reasons)
    assert main(["summary", str(path)]) == 0
    assert f"interrupted run: {statuses.count('finished')} of 40 requests finished" in capsys.readouterr().err


def test_cli_replay_summary_and_result_json(tmp_path, capsys):
    out = tmp_path / "sim"
    result = tmp_path / "result.json"
    assert main(["replay", "demo", "--executor", "sim", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out),
                 "--no-progress", "--time-scale", "0.5", "--save-result", str(result), "--goodput", "ttft:500"]) == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Mean TTFT (ms):" in printed
    saved = json.loads(result.read_text())
    assert saved["completed"] == 24 and "mean_ttft_ms" in saved and "request_goodput" in saved
    assert main(["summary", str(out), "--percentiles", "50,99"]) == 0
    assert "P50 TTFT (ms):" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "missing.csv"), "--executor", "sim", "--model", "qwen3-0.6b",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["simulate", "demo", "--model", "no-such-model", "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_cli_simulate_with_asynchronous_scheduling(tmp_path, capsys):
    """--async-scheduling reaches the engine: recorded in the run, every request served, and with requests
    arriving over time the batches differ from the synchronous run's (admissions wait for the step in flight)."""
    runs = {}
    for flag in ("--async-scheduling", "--no-async-scheduling"):
        out = tmp_path / flag
        assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out),
                     "--no-progress", flag]) == 0
        runs[flag] = read_run(out)
    capsys.readouterr()
    for flag, run in runs.items():
        assert run.metadata["engine_config"]["async_scheduling"] is (flag == "--async-scheduling")
        assert set(run.requests.column("status").to_pylist()) == {"finished"}
    async_run, sync_run = runs["--async-scheduling"], runs["--no-async-scheduling"]
    assert async_run.requests.column("output_len").to_pylist() == sync_run.requests.column("output_len").to_pylist()
    assert async_run.steps.column("num_batched_tokens").to_pylist() != sync_run.steps.column("num_batched_tokens").to_pylist()


def test_cli_simulate_ends_with_its_speed(tmp_path, capsys):
    """The last line says how much serving was simulated in how much wall-clock time, start-up included."""
    out = tmp_path / "sim"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"simulated ([\d,.]+) s of serving in ([\d,.]+) s wall-clock, start-up included: "
                         r"([\d,]+)x real time", last)
    assert match, last
    simulated, wall = (float(group.replace(",", "")) for group in match.groups()[:2])
    assert simulated == pytest.approx(compute_metrics(read_run(out)).duration, abs=0.1) and wall > 0


@pytest.mark.parametrize("flags, graphs_expected", [([], True), (["--no-mixed-cuda-graphs"], False),
                                                     (["--enforce-eager"], False), (["--tp", "2"], False),
                                                     (["--attention-backend", "flash-attn"], False),
                                                     (["--attention-backend", "torch"], False)])
@pytest.mark.filterwarnings("ignore:no calibrated profile")  # TP 2 has none: the roofline, as intended
def test_cli_simulate_mixed_cuda_graphs_as_the_real_engine(tmp_path, capsys, flags, graphs_expected):
    """As the real engine: steps with prompt chunks run as (padded) CUDA graphs by default at TP 1, eagerly
    with --no-mixed-cuda-graphs, --enforce-eager, TP > 1 or a backend other than triton; the run records which."""
    out = tmp_path / "sim"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out), "--no-progress",
                 *flags]) == 0
    capsys.readouterr()
    run = read_run(out)
    assert run.metadata["mixed_cuda_graphs"] is graphs_expected
    prefill = [n > 0 for n in run.steps.column("num_prefill_seqs").to_pylist()]
    graphs = run.steps.column("cuda_graph_batch_size").to_pylist()
    tokens = run.steps.column("num_batched_tokens").to_pylist()
    assert any(prefill)
    with_prefill = [(graph, count) for graph, count, has_prefill in zip(graphs, tokens, prefill) if has_prefill]
    if graphs_expected:
        assert all(graph >= count for graph, count in with_prefill)
    else:
        assert all(graph == 0 for graph, _ in with_prefill)


def test_cli_simulate_mixed_cuda_graphs_need_the_triton_backend(tmp_path, capsys):
    """As the real engine, which refuses the option with another backend."""
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--out", str(tmp_path / "sim"), "--no-progress",
                 "--mixed-cuda-graphs", "--attention-backend", "flash-attn"]) == 2
    assert "needs the triton attention backend, not flash-attn" in capsys.readouterr().err


def test_cli_simulate_of_the_cpu_executor_runs_every_step_eagerly(tmp_path, capsys):
    """The CPU executor has no CUDA graphs, so its twin (--gpu cpu) records none either."""
    from simulator.cost_model import CostModel

    profile = tmp_path / "cpu.json"
    CostModel("cpu", "qwen3-0.6b", 1, "bfloat16", {"step": 1e-3, "prefill_token": 1e-6, "eager_step": 2e-4}).save(profile)
    out = tmp_path / "sim"
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "cpu", "--profile", str(profile),
                 "--num-gpu-blocks-override", "64", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    run = read_run(out)
    assert run.metadata["enforce_eager"] is True and run.metadata["mixed_cuda_graphs"] is False
    assert set(run.steps.column("cuda_graph_batch_size").to_pylist()) == {0}


def test_cli_simulate_without_prefix_caching_needs_only_the_prompt_lengths(tmp_path, monkeypatch, capsys):
    """Without a prefix cache a simulation never reads its prompts' tokens, so it is given zeros of their lengths
    instead of the trace's synthesized tokens: the run is the one those tokens give."""
    import simulator.trace_requests

    made = []
    original = simulator.trace_requests.TraceRequests.from_trace.__func__

    def from_trace(cls, *args, token_contents=True, **kwargs):
        made.append(token_contents)
        return original(cls, *args, token_contents=token_contents or force, **kwargs)

    monkeypatch.setattr(simulator.trace_requests.TraceRequests, "from_trace", classmethod(from_trace))
    runs = []
    for force in (False, True):
        out = tmp_path / f"tokens-{force}"
        assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(out),
                     "--no-progress", "--no-enable-prefix-caching", "--max-num-seqs", "8"]) == 0
        runs.append(read_run(out))
    capsys.readouterr()
    assert made == [False, False]  # what replay asked for; the second run was given the tokens regardless
    assert runs[0].requests.equals(runs[1].requests) and runs[0].steps.equals(runs[1].steps)
    assert len(runs[0].steps) > 100
