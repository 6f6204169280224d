"""Transforms: time scale, target rate, slices, length caps reported in the notes."""

import numpy as np
import pytest

from traces import (
    ConstantRate,
    cap_lengths,
    random_workload,
    read_trace,
    scale_time,
    slice_count,
    slice_time,
    with_request_rate,
)


@pytest.fixture
def trace():
    return random_workload(num_prompts=11, input_len=100, output_len=20, range_ratio=0.5, prefix_len=64, arrivals=ConstantRate(2.0), seed=0)


def test_scale_time_stretches_arrivals(trace):
    scaled = scale_time(trace, 0.5)
    assert scaled.duration == pytest.approx(trace.duration * 0.5)
    assert scaled.notes[-1] == "arrival times scaled by 0.5"
    assert trace.duration == 5.0  # the input is not changed


def test_target_request_rate_on_a_real_trace():
    azure = read_trace("azure-conv")
    faster = with_request_rate(azure, 30.0)
    assert (len(faster) - 1) / faster.duration == pytest.approx(30.0)
    assert np.allclose(np.diff(faster.table.column("arrival_time").to_numpy()) * 30.0 / ((len(azure) - 1) / azure.duration),
                       np.diff(azure.table.column("arrival_time").to_numpy()))


def test_target_rate_needs_a_time_span():
    with pytest.raises(ValueError, match="no time span"):
        with_request_rate(random_workload(num_prompts=3), 5.0)


def test_slice_time_keeps_the_window_relative_to_its_start(trace):
    window = slice_time(trace, 1.0, 3.0)
    assert window.table.column("arrival_time").to_pylist() == [0.0, 0.5, 1.0, 1.5]
    assert "4 of 11" in window.notes[-1]


def test_slice_count(trace):
    head = slice_count(trace, 3)
    assert len(head) == 3 and head.table.column("arrival_time").to_pylist() == [0.0, 0.5, 1.0]
    assert len(slice_count(trace, 100)) == 11


def test_caps_clip_lengths_and_their_lists_and_report_counts(trace):
    prompts = trace.table.column("prompt_len").to_numpy()
    outputs = trace.table.column("output_len").to_numpy()
    capped = cap_lengths(trace, max_prompt_len=120, max_output_len=15)
    assert capped.table.column("prompt_len").to_numpy().max() == 120
    assert capped.table.column("output_len").to_numpy().max() == 15
    assert f"clipped the prompt of {np.count_nonzero(prompts > 120)} of 11 requests to 120 tokens" in capped.notes
    assert f"clipped the output of {np.count_nonzero(outputs > 15)} of 11 requests to 15 tokens" in capped.notes
    # 64 shared tokens = 4 blocks of 16, within the 120-token cap's 8 blocks: kept.
    assert capped.table.column("prefix_block_ids").to_pylist()[0] == [0, 1, 2, 3]
    tiny = cap_lengths(trace, max_prompt_len=20)
    assert tiny.table.column("prefix_block_ids").to_pylist()[0] == [0, 1]


@pytest.mark.parametrize("call", [lambda t: scale_time(t, 0), lambda t: slice_time(t, 3, 1), lambda t: cap_lengths(t, max_prompt_len=0), lambda t: with_request_rate(t, -1)])
def test_bad_transform_arguments(trace, call):
    with pytest.raises(ValueError):
        call(trace)


def test_load_trace_applies_the_options_in_order():
    from traces import TraceOptions, load_trace

    options = TraceOptions(max_requests=200, request_rate=10.0, duration=5.0, max_output_len=50)
    trace = load_trace("azure-conv", options)
    arrivals = trace.table.column("arrival_time").to_numpy()
    assert arrivals.max() < 5.0 and 10 <= len(trace) <= 100  # about 10 req/s over 5 s, bursty
    assert trace.table.column("output_len").to_numpy().max() <= 50
    assert [note.split()[0] for note in trace.notes] == ["sliced", "arrival", "sliced", "clipped"]


def test_load_trace_arrivals_for_length_tables_and_others(tmp_path):
    from traces import TraceOptions, load_trace

    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "10,5\n" * 50)
    table = load_trace(path, TraceOptions(arrivals="constant:5"))
    assert table.duration == pytest.approx(49 / 5)
    redrawn = load_trace("azure-conv", TraceOptions(arrivals="constant:100", max_requests=11))
    assert redrawn.duration == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs", [{"time_scale": 2.0, "request_rate": 3.0}, {"max_requests": 0}, {"arrivals": "sometimes"}, {"format": "csv"}, {"duration": -1.0}]
)
def test_bad_trace_options(kwargs):
    from traces import TraceOptions

    with pytest.raises(ValueError):
        TraceOptions(**kwargs)



def test_rescaling_keeps_the_first_arrival_of_a_trace_that_starts_late(tmp_path):
    # A native trace keeps its arrival times as written, so its first request may come at 2 s, not 0.
    path = tmp_path / "late.csv"
    path.write_text("arrival_time,prompt_len,output_len\n2,40,3\n5,20,3\n11,30,3\n")
    late = read_trace(path)
    assert late.table.column("arrival_time").to_pylist() == [2.0, 5.0, 11.0]
    assert scale_time(late, 2.0).table.column("arrival_time").to_pylist() == [2.0, 8.0, 20.0]
    assert with_request_rate(late, 1.0).table.column("arrival_time").to_pylist() == pytest.approx([2.0, 2.0 + 2 / 3, 4.0])
