"""vLLM's metrics and summary against values computed by hand on a five-request run."""

import numpy as np
import pytest

from analysis.metrics import compute_metrics, inter_token_latencies
from analysis.run_schema import STEPS_SCHEMA, requests_table
from analysis.summary import format_summary, parse_goodput
from engine.stats import RequestRecord


def hand_table():
    """Three finished requests, one rejected, one aborted (times in seconds)."""
    records = [
        RequestRecord("r0", 0.0, prompt_len=10, max_tokens=3, first_scheduled_time=0.1, first_token_time=0.5,
                      finish_time=0.8, output_len=3, status="finished", reason="length",
                      token_times=[0.5, 0.6, 0.8]),
        RequestRecord("r1", 1.0, prompt_len=20, max_tokens=2, first_scheduled_time=1.0, first_token_time=1.2,
                      finish_time=1.5, output_len=2, status="finished", reason="length", token_times=[1.2, 1.5]),
        RequestRecord("r2", 2.0, prompt_len=5, max_tokens=1, first_scheduled_time=2.5, first_token_time=3.0,
                      finish_time=3.0, output_len=1, status="finished", reason="length", token_times=[3.0]),
        RequestRecord("r3", 2.5, prompt_len=100_000, max_tokens=5, status="rejected",
                      reason="prompt longer than max_model_len"),
        RequestRecord("r4", 0.2, prompt_len=7, max_tokens=9, first_scheduled_time=0.2, first_token_time=0.4,
                      output_len=1, status="aborted", reason="client abort", token_times=[0.4]),
    ]
    return requests_table(records)


def test_counts_throughput_and_duration():
    m = compute_metrics(hand_table())
    assert (m.completed, m.failed, m.num_rejected, m.num_aborted) == (3, 2, 1, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (35, 6)
    # From the first arrival (0.0) to the last finish (3.0).
    assert m.duration == pytest.approx(3.0)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(2.0)
    assert m.total_token_throughput == pytest.approx(41 / 3)
    assert m.max_output_tokens_per_s == 3  # 0.5, 0.6, 0.8 in the first second
    assert m.max_concurrent_requests == 1


def test_latency_distributions():
    m = compute_metrics(hand_table())
    assert m.ttft.count == 3
    assert m.ttft.mean == pytest.approx((0.5 + 0.2 + 1.0) / 3)
    assert m.ttft.median == pytest.approx(0.5)
    # numpy's linear interpolation over [0.2, 0.5, 1.0]: rank 0.99 * 2 = 1.98.
    assert m.ttft.p99 == pytest.approx(0.5 + 0.98 * 0.5)
    assert m.ttft.percentile(50) == pytest.approx(0.5)
    # TPOT only for requests with more than one output token.
    assert m.tpot.count == 2
    assert m.tpot.mean == pytest.approx((0.15 + 0.3) / 2)
    # ITL pools gaps inside each finished request, never across requests nor from the aborted one.
    assert sorted(m.itl.samples) == pytest.approx([0.1, 0.2, 0.3])
    assert m.itl.median == pytest.approx(0.2)
    assert m.e2el.mean == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert m.e2el.p90 == pytest.approx(np.percentile([0.8, 0.5, 1.0], 90))


def test_goodput_uses_every_slo():
    table = hand_table()
    both = compute_metrics(table, goodput={"ttft": 600, "tpot": 200})
    assert both.num_good == 1  # r0 only: r1's TPOT is 300 ms, r2's TTFT 1000 ms
    assert both.request_goodput == pytest.approx(1 / 3)
    # A one-token request has TPOT 0 for goodput, as in vLLM.
    assert compute_metrics(table, goodput={"tpot": 100}).num_good == 1
    assert compute_metrics(table, goodput={"ttft": 1000}).num_good == 3
    assert compute_metrics(table, goodput={"e2el": 900}).num_good == 2
    assert compute_metrics(table).request_goodput is None


def test_itl_with_empty_and_single_token_requests():
    table = hand_table()
    assert inter_token_latencies(table.slice(3, 2)).size == 0
    assert inter_token_latencies(table.slice(1, 1)) == pytest.approx([0.3])


def test_empty_run_reports_zeros():
    m = compute_metrics(hand_table().slice(3, 1))
    assert m.completed == 0 and m.failed == 1
    assert m.request_throughput == 0.0 and m.ttft.mean == 0.0
    assert "Successful requests:                     0" in format_summary(m)


def test_summary_layout_is_vllms():
    text = format_summary(compute_metrics(hand_table(), goodput={"ttft": 600}), percentiles=(90, 99, 99.9))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     3         " in lines
    assert "Benchmark duration (s):                  3.00      " in lines
    assert "Request throughput (req/s):              1.00      " in lines
    assert "Request goodput (req/s):                 0.67      " in lines
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "Mean TTFT (ms):                          566.67    " in lines
    assert "P99.9 ITL (ms):                          299.80    " in lines
    for label in ("Total input tokens:", "Total generated tokens:", "Output token throughput (tok/s):",
                  "Total Token throughput (tok/s):", "Median TPOT (ms):", "P90 E2EL (ms):"):
        assert any(line.startswith(label) for line in lines), label
    # Default prints p99 only.
    default = format_summary(compute_metrics(hand_table()))
    assert "P99 TTFT (ms):" in default and "P90 TTFT (ms):" not in default


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput("e2el:2000") == {"e2el": 2000.0}
    with pytest.raises(ValueError, match="METRIC:MILLISECONDS"):
        parse_goodput(["ttft500"])
    with pytest.raises(ValueError, match="not a number"):
        parse_goodput(["ttft:fast"])
    with pytest.raises(ValueError, match="unknown goodput SLO 'itl'"):
        parse_goodput(["itl:5"])
    with pytest.raises(ValueError, match="non-negative"):
        parse_goodput(["ttft:-1"])
    with pytest.raises(ValueError, match="twice"):
        parse_goodput(["ttft:1", "ttft:2"])


def test_interrupted_run_duration_ends_at_the_interruption():
    # Interrupted at 3.2 s: the in-flight request is aborted then, the requests still to come are recorded
    # as aborted at their (later) arrival times. They never ran, so they must not stretch the duration.
    from analysis.timeseries import run_time_range

    records = [
        RequestRecord("r0", 0.0, prompt_len=10, max_tokens=3, first_scheduled_time=0.1, first_token_time=0.5,
                      finish_time=1.0, output_len=3, status="finished", reason="length", token_times=[0.5, 0.7, 1.0]),
        RequestRecord("r1", 2.0, prompt_len=10, max_tokens=9, first_scheduled_time=2.0, first_token_time=2.5,
                      finish_time=3.2, output_len=2, status="aborted", reason="interrupted", token_times=[2.5, 3.0]),
        RequestRecord("r2", 3.1, prompt_len=10, max_tokens=9, finish_time=3.2, status="aborted", reason="interrupted"),
        RequestRecord("r3", 40.0, prompt_len=10, max_tokens=9, finish_time=40.0, status="aborted",
                      reason="interrupted"),
        RequestRecord("r4", 90.0, prompt_len=10, max_tokens=9, finish_time=90.0, status="aborted",
                      reason="interrupted"),
    ]
    table = requests_table(records)
    m = compute_metrics(table)
    assert m.duration == pytest.approx(3.2)
    assert m.request_throughput == pytest.approx(1 / 3.2)
    assert m.failed == 4
    empty_steps = STEPS_SCHEMA.empty_table()
    assert run_time_range(table, empty_steps) == pytest.approx((0.0, 3.2))


@pytest.mark.parametrize("batch", [1, 3, 2048])
@pytest.mark.parametrize("gaps_held", [0, 1 << 23])
def test_metrics_of_a_requests_file_read_in_batches_are_those_of_the_whole_table(tmp_path, monkeypatch, batch,
                                                                                 gaps_held):
    """The streamed computation (token times read a few requests at a time, exact ITL percentiles in passes over
    the file, or over the gaps held when they are few) gives the numbers of compute_metrics on the table in
    memory, and the percentiles asked for besides."""
    import pyarrow.parquet as pq

    import analysis.metrics
    from analysis.metrics import compute_metrics_of_file
    from tests.runs import engine_run

    monkeypatch.setattr(analysis.metrics, "_TOKEN_TIME_BATCH", batch)
    monkeypatch.setattr(analysis.metrics, "_GAPS_HELD_AT_MOST", gaps_held)
    requests, _ = engine_run(60, request_rate=30.0, seed=4, num_kv_blocks=300)
    pq.write_table(requests, tmp_path / "requests.parquet", row_group_size=7)
    slos = {"ttft": 300.0, "tpot": 40.0}
    in_memory = compute_metrics(requests, slos)
    streamed = compute_metrics_of_file(tmp_path / "requests.parquet", slos, percentiles=(25.0, 99.0))
    assert streamed == in_memory  # every field but the samples themselves
    assert streamed.itl.count == in_memory.itl.count > 1000
    for p in (25.0, 50.0, 99.0, 99.9):
        assert streamed.itl.percentile(p) == in_memory.itl.percentile(p)
    assert streamed.itl.std == pytest.approx(in_memory.itl.std, rel=1e-12)
    with pytest.raises(ValueError, match="percentile 75 was not computed"):
        streamed.itl.percentile(75)
