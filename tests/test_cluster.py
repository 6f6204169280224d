"""Cluster simulation: routers, one-replica equivalence with replay, and the CLI's run folder."""

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.metrics import compute_metrics
from analysis.run_store import read_run
from simulator.cluster import ClusterRun, read_replica_assignment
from simulator.simulated_engine import build_simulated_engine
from simulator.trace_requests import TraceRequests
from twinfer.cli import build_parser, main
from twinfer.cli.options import engine_args_from
from simulator.router import (
    LeastOutstandingRouter,
    PrefixAffinityRouter,
    RoundRobinRouter,
    RoutedRequest,
    make_router,
)
from traces.arrivals import ConstantRate, Poisson
from twinfer.replay import replay
from traces.synthetic import random_workload, shared_prefix_workload
from traces.trace_builder import build_trace

MODEL = "qwen3-0.6b"


def _args(*extra: str):
    return build_parser().parse_args(["simulate", "unused", "--model", MODEL, "--out", "unused", *extra])


def _engines(count: int, *extra: str):
    engine_args = engine_args_from(_args(*extra))
    engines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(count):
            engine, metadata = build_simulated_engine(engine_args, gpu="h100")
            engines.append(engine)
    return engines, metadata


def _cluster(trace, count: int, router, *extra: str, **run_options):
    engines, _ = _engines(count, *extra)
    requests = TraceRequests.from_trace(trace, vocab_size=engines[0].config.vocab_size)
    return ClusterRun(requests, engines, router).run(**run_options)


def test_one_replica_routed_request_by_request_gives_exactly_the_replay(tmp_path):
    """The planner's probes route one request at a time (to check SLOs as they go); replay queues them all at
    once and lets the engine admit each at its arrival time. Both make the same run."""
    trace = shared_prefix_workload(
        num_groups=4, prompts_per_group=6, system_prompt_len=256, question_len=40, output_len=60,
        arrivals=Poisson(rate=40.0),
    )
    (engine,), metadata = _engines(1, "--max-num-seqs", "8")
    replay_path = replay(trace, engine, tmp_path / "replay", executor_kind="sim", show_progress=False,
                         metadata=metadata).path
    result = _cluster(trace, 1, RoundRobinRouter(), "--max-num-seqs", "8", stop_check=lambda now, replicas: None,
                      check_every=1)
    cluster_path = result.write(tmp_path / "cluster", {"executor_kind": "sim"})

    single, cluster = read_run(replay_path), read_run(cluster_path)
    key = pa.compute.sort_indices(single.requests, [("request_id", "ascending")])
    cluster_key = pa.compute.sort_indices(cluster.requests, [("request_id", "ascending")])
    assert single.requests.take(key).equals(cluster.requests.take(cluster_key))
    assert single.steps.equals(cluster.steps)
    assert single.steps.num_rows > 10  # the workload really batched and queued


def test_round_robin_spreads_requests_evenly():
    trace = random_workload(num_prompts=40, input_len=64, output_len=8, arrivals=ConstantRate(rate=20.0))
    result = _cluster(trace, 4, RoundRobinRouter())
    assert result.requests_per_replica() == [10, 10, 10, 10]
    assert result.assignment[:5] == [0, 1, 2, 3, 0]


def _skewed_trace():
    # Every other request is long: round-robin over 2 replicas sends all of them to replica 0.
    count = 40
    output_len = np.where(np.arange(count) % 2 == 0, 1500, 8)
    return build_trace(
        source=None,
        arrival_time=np.arange(count) * 0.05,
        prompt_len=np.full(count, 64),
        output_len=output_len,
        name="skewed",
        source_format="synthetic",
    )


def test_least_outstanding_beats_round_robin_on_a_skewed_workload():
    trace = _skewed_trace()
    limits = ("--max-num-seqs", "4")
    round_robin = _cluster(trace, 2, RoundRobinRouter(), *limits)
    least = _cluster(trace, 2, LeastOutstandingRouter(), *limits)
    rr_metrics = compute_metrics(_requests(round_robin))
    lo_metrics = compute_metrics(_requests(least))
    assert rr_metrics.completed == lo_metrics.completed == 40
    # Round-robin queues short requests behind long ones on replica 0; least-outstanding avoids that.
    assert lo_metrics.ttft.p99 < 0.9 * rr_metrics.ttft.p99
    assert lo_metrics.ttft.mean < rr_metrics.ttft.mean
    assert lo_metrics.e2el.mean < rr_metrics.e2el.mean


def _requests(result):
    return result.tables()[0]


def test_least_outstanding_picks_the_least_loaded_and_breaks_ties_by_index():
    engines, _ = _engines(3)
    router = LeastOutstandingRouter()
    request = RoutedRequest("r", 0.0, [1, 2, 3])
    assert router.route(request, engines) == 0
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engines[0].add_request(prompt_len=8, sampling_params=params, arrival_time=0.0)
    assert router.route(request, engines) == 1
    engines[1].add_request(prompt_len=8, sampling_params=params, arrival_time=0.0)
    assert router.route(request, engines) == 2


def test_prefix_affinity_keeps_groups_together_and_hits_the_cache_more():
    trace = shared_prefix_workload(
        num_groups=8, prompts_per_group=8, system_prompt_len=512, question_len=32, output_len=16,
        arrivals=Poisson(rate=20.0),
    )
    affinity_router = PrefixAffinityRouter()
    affinity = _cluster(trace, 4, affinity_router)
    round_robin = _cluster(trace, 4, RoundRobinRouter())
    groups = {}
    for request_id, replica in zip(affinity.requests.request_ids, affinity.assignment):
        groups.setdefault(request_id.split("-")[0], set()).add(replica)
    assert affinity_router.num_fallback == 0
    assert all(len(replicas) == 1 for replicas in groups.values())
    assert len(set().union(*groups.values())) > 1  # groups still spread over replicas
    assert affinity.prefix_cache_hit_rate > round_robin.prefix_cache_hit_rate + 0.1


def test_prefix_affinity_falls_back_when_home_is_overloaded():
    engines, _ = _engines(2)
    router = PrefixAffinityRouter(max_extra=2, max_ratio=1.5)
    request = RoutedRequest("r", 0.0, list(range(32)))
    home = router.home(request, 2)
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for _ in range(3):
        engines[home].add_request(prompt_len=8, sampling_params=params, arrival_time=0.0)
    assert router.route(request, engines) == 1 - home
    assert router.num_fallback == 1


def test_unknown_router_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown router 'random'.*round-robin"):
        make_router("random")


def test_simulate_cli_writes_one_run_with_replica_tables(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "demo", "--model", MODEL, "--gpu", "h100", "--replicas", "2",
                 "--router", "least-outstanding", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "requests per replica" in printed
    run = read_run(out)
    assert run.metadata["replicas"] == 2 and run.metadata["router"] == "least-outstanding"
    assignment = read_replica_assignment(out)
    assert assignment.num_rows == run.requests.num_rows == 24
    assert set(assignment.column("replica").to_pylist()) == {0, 1}
    step_replicas = pa.parquet.read_table(out / "step_replicas.parquet")
    assert step_replicas.num_rows == run.steps.num_rows
    assert np.all(np.diff(run.steps.column("start_time").to_numpy()) >= 0)


def test_busiest_window_is_scaled_as_the_whole_trace():
    # Ten requests a second, except a burst of five in 0.1 s from t=2.
    arrivals = np.r_[np.arange(0, 2, 0.1), 2 + np.arange(5) * 0.025, 2.2 + np.arange(20) * 0.1]
    trace = build_trace(source=None, arrival_time=arrivals, prompt_len=np.full(arrivals.size, 32),
                        output_len=np.full(arrivals.size, 4), name="bursty", source_format="synthetic")
    requests = TraceRequests.from_trace(trace, vocab_size=1000)
    window = requests.busiest_window(5)
    assert window.request_ids == requests.request_ids[20:25]
    assert window.arrival_times[0] == 0.0
    # At twice the whole trace's mean rate, the burst is squeezed by the same factor as in the whole trace.
    full, part = requests.at_rate(2 * requests.mean_rate), window.at_rate(2 * requests.mean_rate)
    np.testing.assert_allclose(np.diff(part.arrival_times), np.diff(full.arrival_times[20:25]))
    assert window.prompt_token_ids[0].tolist() == requests.prompt_token_ids[20].tolist()


class InterruptingRouter(RoundRobinRouter):
    """Round-robin until the given arrival, where Ctrl-C comes."""

    def __init__(self, interrupt_at: int) -> None:
        super().__init__()
        self.interrupt_at = interrupt_at
        self.routed = 0

    def route(self, request, replicas) -> int:
        if self.routed == self.interrupt_at:
            raise KeyboardInterrupt
        self.routed += 1
        return super().route(request, replicas)


def test_an_interrupted_cluster_run_keeps_every_request(tmp_path, capsys):
    """As a replay: what finished is kept, the rest (routed or not) is aborted, and the run says it is incomplete."""
    trace = random_workload(num_prompts=40, input_len=64, output_len=200, arrivals=ConstantRate(rate=20.0))
    engines, metadata = _engines(2)
    path = replay(trace, engines, tmp_path / "run", executor_kind="sim", router=InterruptingRouter(30),
                  show_progress=False, metadata=metadata).path
    assert "interrupted" in capsys.readouterr().out
    run = read_run(path)
    statuses = run.requests.column("status").to_pylist()
    assert run.metadata["complete"] is False and len(statuses) == 40
    assert "finished" in statuses and "aborted" in statuses and set(statuses) <= {"finished", "aborted"}
    assert sum(run.metadata["requests_per_replica"]) == 40
    assert read_replica_assignment(path).num_rows == 40


@pytest.mark.parametrize("count, router", [(1, None), (3, "least-outstanding")])
def test_a_streamed_run_writes_exactly_the_tables_kept_in_memory(tmp_path, monkeypatch, count, router):
    """Streaming (requests added a batch ahead, records and steps written as they end) changes nothing: with tiny
    batches and row groups, so that every boundary is crossed many times, the tables equal the in-memory run's."""
    import simulator.cluster
    from analysis.run_writer import RunWriter

    monkeypatch.setattr(simulator.cluster, "ADD_BATCH", 7)
    monkeypatch.setattr(simulator.cluster, "DRAIN_EVERY", 5)
    trace = shared_prefix_workload(num_groups=6, prompts_per_group=30, system_prompt_len=256, question_len=64,
                                   output_len=40, arrivals=Poisson(rate=40.0), seed=3)
    kept = _cluster(trace, count, make_router(router, block_size=16) if router else None, "--max-num-seqs", "16")
    kept_path = kept.write(tmp_path / "kept", {"executor_kind": "sim"})

    engines, _ = _engines(count, "--max-num-seqs", "16")
    requests = TraceRequests.from_trace(trace, vocab_size=engines[0].config.vocab_size, lazy=True)
    writer = RunWriter(tmp_path / "streamed", num_replicas=count, requests_per_group=11, steps_per_group=13)
    streamed = ClusterRun(requests, engines, make_router(router, block_size=16) if router else None)
    most_held = []
    streamed.run(writer=writer, on_progress=lambda engine: most_held.append(len(engine.requests)))
    streamed.finish_stream()
    streamed_path = writer.commit({"executor_kind": "sim"})

    kept_run, streamed_run = read_run(kept_path), read_run(streamed_path)
    assert streamed_run.requests.equals(kept_run.requests)
    assert streamed_run.steps.equals(kept_run.steps)
    if count > 1:
        for name in ("replicas.parquet", "step_replicas.parquet"):
            assert pq.read_table(streamed_path / name).equals(pq.read_table(kept_path / name))
    # The engines held a bounded window of the trace, never all of it.
    assert max(most_held) < 60 < trace.table.num_rows


def test_an_interrupted_streamed_run_records_every_request_once(tmp_path, monkeypatch):
    import simulator.cluster
    from analysis.run_writer import RunWriter

    monkeypatch.setattr(simulator.cluster, "ADD_BATCH", 4)
    monkeypatch.setattr(simulator.cluster, "DRAIN_EVERY", 3)
    trace = random_workload(num_prompts=200, input_len=64, output_len=30, arrivals=ConstantRate(rate=50.0))
    (engine,), _ = _engines(1)
    requests = TraceRequests.from_trace(trace, vocab_size=engine.config.vocab_size, lazy=True)
    writer = RunWriter(tmp_path / "run", requests_per_group=8)
    cluster = ClusterRun(requests, [engine])
    steps = 0

    def interrupt(_engine):
        nonlocal steps
        steps += 1
        if steps == 300:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cluster.run(writer=writer, on_progress=interrupt)
    cluster.abort("interrupted")
    cluster.finish_stream()
    run = read_run(writer.commit({"executor_kind": "sim", "complete": False}))
    assert run.requests.column("request_id").to_pylist() == trace.table.column("request_id").to_pylist()
    statuses = run.requests.column("status").to_pylist()
    assert {"finished", "aborted"} == set(statuses)
    never_arrived = [r for r in run.requests.to_pylist() if r["status"] == "aborted" and r["first_scheduled_time"] is None]
    assert never_arrived and all(r["finish_time"] >= r["arrival_time"] for r in never_arrived)
