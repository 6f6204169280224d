"""The planner's simulations shared between configurations that differ only in max_num_seqs: the same plan as
simulating every probe, shared only where the limits decided nothing."""

import dataclasses
import warnings

import pytest

from simulator.planner import (PlanConfig, PlanSettings, memo_probe, replica_builder, search_config, simulate_probe,
                               verify_config)
from simulator.probe_memo import ProbeMemo
from simulator.slo import parse_slos
from simulator.trace_requests import TraceRequests
from traces.arrivals import Poisson
from traces.synthetic import random_workload

MODEL = "qwen3-0.6b"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _requests(count: int = 150, prefix_len: int = 0) -> TraceRequests:
    trace = random_workload(num_prompts=count, input_len=512, output_len=64, range_ratio=0.5, prefix_len=prefix_len,
                            arrivals=Poisson(rate=10.0), seed=3)
    return TraceRequests.from_trace(trace, vocab_size=151936)


def _settings(**overrides) -> PlanSettings:
    values = dict(model=MODEL, slos=parse_slos("ttft:150 tpot:10"), target_rate=60.0, search_steps=3)
    return PlanSettings(**(values | overrides))


def _timeless(plan):
    return dataclasses.replace(plan, probes=tuple(dataclasses.replace(p, seconds=0.0) for p in plan.probes))


def test_sharing_simulations_gives_the_plan_of_simulating_every_probe():
    settings = _settings()
    window, full = _requests(60), _requests(150)
    configs = [PlanConfig("h100", 1, seqs) for seqs in (4, 16, 64, 256)]
    memo = ProbeMemo()
    alone = [search_config(config, settings, window) for config in configs]
    shared = [search_config(config, settings, window, memo) for config in configs]
    assert [_timeless(p) for p in shared] == [_timeless(p) for p in alone]
    assert [_timeless(verify_config(p, settings, full, memo)) for p in shared] == \
        [_timeless(verify_config(p, settings, full)) for p in alone]
    # Some probes of the larger limits were not simulated again (a probe shared says 0 s)...
    reused = sum(p.seconds == 0.0 for plan in shared for p in plan.probes)
    assert reused > sum(p.seconds == 0.0 for plan in alone for p in plan.probes)
    # ... and none of the smallest limit's, which a batch of 60 requests at these rates fills.
    assert all(p.seconds > 0 for p in shared[0].probes if p.phase == "search")


def _probe(memo, config, requests, rate, settings=None):
    settings = settings or _settings()
    build, metadata = replica_builder(config, settings)
    return memo_probe(memo, build, config, metadata["num_kv_blocks"], settings, requests, rate, 1, "search")


def test_a_run_that_filled_its_batch_is_not_shared():
    memo, requests = ProbeMemo(), _requests(60)
    first = _probe(memo, PlanConfig("h100", 1, 4), requests, 60.0)
    assert first.seconds > 0
    assert _probe(memo, PlanConfig("h100", 1, 256), requests, 60.0).seconds > 0  # 4 ran at once: 256 runs its own
    # The run of 256 never had 64 running: 64 shares it, 8 (below its peak) does not.
    assert _probe(memo, PlanConfig("h100", 1, 64), requests, 60.0).seconds == 0.0
    assert _probe(memo, PlanConfig("h100", 1, 8), requests, 60.0).seconds > 0
    # Another GPU or rate is another simulation.
    assert _probe(memo, PlanConfig("h200", 1, 64), requests, 60.0).seconds > 0
    assert _probe(memo, PlanConfig("h100", 1, 64), requests, 30.0).seconds > 0


def test_prompts_that_can_meet_in_the_prefix_cache_are_never_shared():
    memo, requests = ProbeMemo(), _requests(40, prefix_len=64)
    _probe(memo, PlanConfig("h100", 1, 256), requests, 20.0)
    assert _probe(memo, PlanConfig("h100", 1, 128), requests, 20.0).seconds > 0
    # Without prefix caching the cache's contents decide nothing: shared.
    settings = _settings(enable_prefix_caching=False)
    _probe(memo, PlanConfig("h100", 1, 256), requests, 20.0, settings)
    assert _probe(memo, PlanConfig("h100", 1, 128), requests, 20.0, settings).seconds == 0.0


def test_a_cache_too_small_for_the_peak_or_the_largest_request_is_another_simulation():
    from simulator.probe_memo import SharedProbe

    shared = SharedProbe(probe=None, max_num_seqs=64, peak_num_running=10, peak_num_used_blocks=500,
                         largest_request_blocks=80, independent=True)
    assert shared.holds_for(32, 500) and shared.holds_for(1024, 10**6)
    assert not shared.holds_for(32, 499)
    assert not shared.holds_for(10, 10**6)  # 10 running would have reached a limit of 10
    assert not dataclasses.replace(shared, peak_num_used_blocks=10).holds_for(32, 79)
    assert not dataclasses.replace(shared, independent=False).holds_for(32, 500)


def test_a_run_without_the_prefix_cache_stands_for_one_with_it_only_while_nothing_is_preempted():
    """Prompts that cannot meet in the cache: the planner simulates without it (cheaper), and again with it when
    a preemption lets a request find its own blocks. Either way the probe is the one the cache-on run gives."""
    requests = _requests(60)
    for utilization, preempts in ((0.035, True), (0.04, False), (0.9, False)):
        settings = _settings(gpu_memory_utilization=utilization)
        build, metadata = replica_builder(PlanConfig("h100", 1, 64), settings)
        expected, engines = simulate_probe(build, settings, requests, 60.0, 1, "search")
        assert bool(engines[0].scheduler.num_preemptions) == preempts
        quick, quick_engines = simulate_probe(build.without_prefix_caching, settings, requests, 60.0, 1, "search")
        assert bool(quick_engines[0].scheduler.num_preemptions) == preempts
        assert not quick_engines[0].block_manager.enable_prefix_caching
        # A preempted request finds its own blocks again only with the cache: then the runs differ.
        same = dataclasses.replace(quick, seconds=0.0) == dataclasses.replace(expected, seconds=0.0)
        assert same != preempts
        probe = memo_probe(ProbeMemo(), build, PlanConfig("h100", 1, 64), metadata["num_kv_blocks"], settings,
                           requests, 60.0, 1, "search")
        assert dataclasses.replace(probe, seconds=0.0) == dataclasses.replace(expected, seconds=0.0)
