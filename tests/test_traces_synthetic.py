"""Arrival processes and synthetic workloads: the rates, spreads and sharing a user asked for, reproducibly."""

import numpy as np
import pytest

from traces import (
    AllAtOnce,
    ConstantRate,
    Gamma,
    Poisson,
    parse_arrival_process,
    random_workload,
    shared_prefix_workload,
)


def gaps(times):
    return np.diff(times)


@pytest.mark.parametrize("process", [Poisson(8.0), Gamma(8.0, cv=3.0), Gamma(8.0, cv=0.25), ConstantRate(8.0)])
def test_mean_rate_is_the_one_asked_for(process):
    times = process.arrival_times(20000, seed=3)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert 1.0 / gaps(times).mean() == pytest.approx(8.0, rel=0.05)


@pytest.mark.parametrize("process, cv", [(Poisson(2.0), 1.0), (Gamma(2.0, cv=3.0), 3.0), (Gamma(2.0, cv=0.25), 0.25), (ConstantRate(2.0), 0.0)])
def test_burstiness_is_the_coefficient_of_variation(process, cv):
    intervals = gaps(process.arrival_times(40000, seed=1))
    assert intervals.std() / intervals.mean() == pytest.approx(cv, abs=0.08 * max(cv, 1))


def test_arrivals_are_seeded():
    assert np.array_equal(Poisson(3.0).arrival_times(50, 7), Poisson(3.0).arrival_times(50, 7))
    assert not np.array_equal(Poisson(3.0).arrival_times(50, 7), Poisson(3.0).arrival_times(50, 8))
    assert np.all(AllAtOnce().arrival_times(5, 0) == 0)


@pytest.mark.parametrize(
    "spec, expected",
    [("poisson:2.5", Poisson(2.5)), ("gamma:4:2", Gamma(4.0, 2.0)), ("constant:1", ConstantRate(1.0)), ("all-at-once", AllAtOnce())],
)
def test_parse_arrival_process(spec, expected):
    assert parse_arrival_process(spec) == expected


@pytest.mark.parametrize("spec", ["poisson", "poisson:x", "uniform:3", "gamma:1", "poisson:-1", "poisson:0"])
def test_bad_arrival_spec(spec):
    with pytest.raises(ValueError):
        parse_arrival_process(spec)


def test_random_workload_lengths_span_the_range_ratio():
    trace = random_workload(num_prompts=2000, input_len=1000, output_len=100, range_ratio=0.5, seed=1)
    prompts = trace.table.column("prompt_len").to_numpy()
    outputs = trace.table.column("output_len").to_numpy()
    assert prompts.min() >= 500 and prompts.max() <= 1500 and prompts.mean() == pytest.approx(1000, rel=0.03)
    assert outputs.min() >= 50 and outputs.max() <= 150
    assert trace.duration == 0.0  # vLLM's default request rate is infinite


def test_random_workload_prefix_is_shared_in_whole_blocks_and_seeded():
    trace = random_workload(num_prompts=10, input_len=50, output_len=5, prefix_len=100, arrivals=Poisson(1.0), seed=4)
    assert trace.table.column("prefix_block_ids").to_pylist() == [list(range(6))] * 10  # 100 // 16 blocks
    assert min(trace.table.column("prompt_len").to_pylist()) == 150
    again = random_workload(num_prompts=10, input_len=50, output_len=5, prefix_len=100, arrivals=Poisson(1.0), seed=4)
    assert again.table.equals(trace.table)


def test_shared_prefix_workload_groups_share_only_their_system_prompt():
    trace = shared_prefix_workload(num_groups=3, prompts_per_group=4, system_prompt_len=64, question_len=10, output_len=7, seed=2)
    rows = trace.table.to_pylist()
    assert len(rows) == 12
    assert {row["prompt_len"] for row in rows} == {74} and {row["output_len"] for row in rows} == {7}
    by_group = {}
    for row in rows:
        by_group.setdefault(row["session_id"], set()).add(tuple(row["prefix_block_ids"]))
    assert all(len(ids) == 1 for ids in by_group.values())  # one prefix per group
    prefixes = [next(iter(ids)) for ids in by_group.values()]
    assert len({block for prefix in prefixes for block in prefix}) == 3 * 4  # no block shared across groups
    assert [row["session_id"] for row in rows] != sorted(row["session_id"] for row in rows)  # interleaved


@pytest.mark.parametrize(
    "kwargs",
    [{"num_prompts": 0}, {"num_prompts": 5, "range_ratio": 1.0}, {"num_prompts": 5, "input_len": -1}, {"num_prompts": 5, "prefix_len": -3}],
)
def test_bad_random_workload_arguments(kwargs):
    with pytest.raises(ValueError):
        random_workload(**kwargs)


def test_workload_specs_as_the_command_line_gives_them():
    from traces import TraceOptions, load_trace

    trace = load_trace("random:num_prompts=40,input_len=100,output_len=10,range_ratio=0.5", TraceOptions(arrivals="poisson:4", seed=3))
    assert len(trace) == 40 and trace.source_format == "synthetic" and trace.duration > 0
    assert 50 <= min(trace.table.column("prompt_len").to_pylist())
    grouped = load_trace("shared-prefix:num_groups=2,prompts_per_group=3,system_prompt_len=32", TraceOptions(max_requests=4))
    assert len(grouped) == 4 and grouped.table.column("prompt_len").to_pylist()[0] == 32 + 128


@pytest.mark.parametrize(
    "spec, message",
    [("random:num_prompts=x", "num_prompts must be a number"), ("random:num_prompts", "expected key=value"),
     ("random:num_prompts=3,colour=2", "unexpected keyword argument 'colour'; random takes"),
     ("random:input_len=3", "missing 1 required keyword-only argument: 'num_prompts'"), ("zipf:n=3", "unknown workload")],
)
def test_bad_workload_specs(spec, message):
    from traces.synthetic import workload_from_spec

    with pytest.raises(ValueError, match=message):
        workload_from_spec(spec)
