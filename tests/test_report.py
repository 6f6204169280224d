"""The HTML report: self-contained, every plot present, real-vs-simulated views only for a matching pair."""

import re

import numpy as np
import pyarrow as pa
import pytest

from analysis.metrics import compute_metrics
from analysis.report import _over_time_figure, _step_scatter_figure, _timeline_figure, build_report, real_sim_pairs
from analysis.compare import compare_runs
from analysis.run_store import Run, read_run, run_metadata, write_run
from analysis.timeseries import (cdf_points, length_histogram, request_timeline, step_event_rates, step_series,
                                 throughput_series)
from tests.runs import engine_run


@pytest.fixture(scope="module")
def tables():
    return engine_run(300, request_rate=20.0, seed=3)


def make_run(path, tables, kind, fingerprint="trace-1", **extra):
    requests, steps = tables
    return Run(path, requests, steps, run_metadata(executor_kind=kind, trace_fingerprint=fingerprint, **extra))


def figure_names(html: str) -> list[str]:
    return re.findall(r'<div class="twinfer-figure" data-figure="([^"]+)">', html)


def test_single_run_report_has_every_plot(tmp_path, tables):
    write_run(tmp_path / "run", *tables, run_metadata(executor_kind="cpu", model="tiny", trace_name="t"))
    contents = build_report([read_run(tmp_path / "run")], tmp_path / "report.html")
    html = contents.path.read_text()
    assert figure_names(html) == ["cdfs", "over-time", "lengths", "timeline-0"]
    assert contents.num_figures == 4
    assert html.count("Plotly.newPlot(") == 4
    # plotly.js inlined exactly once and nothing fetched from elsewhere: the file works offline.
    assert html.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]*\ssrc=", html)
    assert "Real vs simulated" not in html
    metrics = compute_metrics(read_run(tmp_path / "run"))
    assert f"<td>{metrics.output_throughput:.2f}</td>" in html
    for label in ("TTFT (ms)", "TPOT (ms)", "E2EL (ms)", "KV-cache usage (%)", "running (solid) and waiting",
                  "tokens per step", "Request timeline", "preemptions/s", "prefix-cache hit tokens/s",
                  "finished requests/s", "prompt length (tokens)", "output length (tokens)"):
        assert label in html.replace("\\u002f", "/"), label


def test_real_and_simulated_runs_get_a_comparison(tmp_path, tables):
    requests, steps = tables
    sim_steps = steps.set_column(steps.schema.get_field_index("duration"), "duration",
                                 pa.array(steps.column("duration").to_numpy() * 1.05))
    real = make_run(tmp_path / "real", tables, "gpu", name="H100 real")
    sim = make_run(tmp_path / "sim", (requests, sim_steps), "sim", name="H100 sim", calibrated=False)
    other = make_run(tmp_path / "other", tables, "sim", fingerprint="trace-2", name="other trace")
    assert real_sim_pairs([real, sim, other]) == [(0, 1)]
    contents = build_report([real, sim, other], tmp_path / "report.html")
    html = contents.path.read_text()
    assert figure_names(html) == ["real-vs-sim-1", "cdfs", "over-time", "lengths", "timeline-0",
                                  "timeline-1", "timeline-2"]
    assert "Real vs simulated: H100 sim (sim) against H100 real (gpu)" in html
    assert "step duration MAPE 5.00%" in html
    assert "UNCALIBRATED" in html
    assert len(contents.comparisons) == 1


@pytest.mark.slow
def test_a_report_does_not_grow_with_the_run(tmp_path, tables):
    """Plots of thinned data (quantiles, bins, a sample of timelines): a run four times as long, here of
    1,200 requests, makes a report of about the same size. How fast it builds is benchmarks/report_build.py's."""
    data_sizes = []
    for name, run_tables in (("small", tables), ("large", engine_run(1200, request_rate=20.0, seed=4))):
        contents = build_report([make_run(tmp_path / name, run_tables, "sim")], tmp_path / f"{name}.html",
                                timeline_requests=150)
        html = contents.path.read_text()
        assert len(html) < 8_000_000  # a few MB of plotly.js plus the data
        scripts = re.findall(r"<script[^>]*>.*?</script>", html, re.S)
        data_sizes.append(len(html) - max(map(len, scripts)))  # all but plotly.js
    small, large = data_sizes
    assert large < 1.25 * small


def test_build_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        build_report([], tmp_path / "r.html")


def test_series_are_bounded_and_correct(tables):
    requests, steps = tables
    points = cdf_points(np.arange(10_000.0), max_points=100)
    assert points.num_rows <= 100
    assert points.column("value")[points.num_rows - 1].as_py() == 9999.0
    assert points.column("fraction")[points.num_rows - 1].as_py() == 1.0
    small = cdf_points([3.0, 1.0, 2.0])
    assert small.column("value").to_pylist() == [1.0, 2.0, 3.0]
    assert small.column("fraction").to_pylist() == pytest.approx([1 / 3, 2 / 3, 1.0])

    start, end = 0.0, float(np.nanmax(requests.column("finish_time").to_numpy(zero_copy_only=False)))
    series = throughput_series(requests, start, end, num_bins=50)
    width = (end - start) / 50
    total_tokens = sum(len(t) for t in requests.column("token_times").to_pylist())
    assert series.num_rows == 50
    assert (series.column("output_tokens_per_s").to_numpy() * width).sum() == pytest.approx(total_tokens)

    state = step_series(steps, start, end, num_bins=50)
    usage = state.column("kv_cache_usage").to_numpy()
    assert np.nanmax(usage) <= 1.0 and np.nanmin(usage) >= 0.0
    assert np.nanmax(state.column("num_running").to_numpy()) <= steps.column("num_running").to_numpy().max()


def test_timeline_merges_gaps_by_threshold():
    requests = pa.table({
        "request_id": ["a", "b"],
        "arrival_time": [0.0, 0.5],
        "status": ["finished", "finished"],
        "token_times": [[1.0, 1.1, 1.2, 2.0, 2.1], [0.7, 0.8]],
    })
    segments = request_timeline(requests, itl_threshold=0.5).to_pylist()
    a = [(s["kind"], s["start"], s["end"]) for s in segments if s["request_id"] == "a"]
    assert a == [("ttft", 0.0, 1.0), ("itl_ok", 1.0, 1.2), ("itl_slow", 1.2, 2.0), ("itl_ok", 2.0, 2.1)]
    b = [(s["kind"], s["start"], s["end"]) for s in segments if s["request_id"] == "b"]
    assert b == [("ttft", 0.5, 0.7), ("itl_ok", 0.7, 0.8)]
    assert len(request_timeline(requests, 0.5, max_requests=1).column("request_id").unique()) == 1


def test_report_uses_a_step_predictor_when_given(tmp_path, tables):
    real = make_run(tmp_path / "real", tables, "gpu")
    sim = make_run(tmp_path / "sim", tables, "sim")
    html = build_report(
        [real, sim], tmp_path / "r.html",
        step_predictor_for=lambda run: (lambda steps: steps.column("duration").to_numpy() * 0.9),
    ).path.read_text()
    assert "Cost model on the real run's own batches: step duration MAPE 10.00%" in html
    assert "cost model on every real step" in html


def shifted(tables, seconds, stretch=1.0):
    """The run's tables with every time moved by `seconds` and spans stretched by `stretch`."""
    requests, steps = tables
    def move(table, names):
        for name in names:
            index = table.schema.get_field_index(name)
            values = table.column(name)
            if pa.types.is_list(values.type):
                flat = pa.compute.list_flatten(values).to_numpy() * stretch + seconds
                moved = pa.ListArray.from_arrays(values.combine_chunks().offsets, pa.array(flat))
            else:
                moved = pa.compute.add(pa.compute.multiply(values, stretch), seconds)
            table = table.set_column(index, table.schema.field(index), moved)
        return table
    return (move(requests, ["arrival_time", "first_scheduled_time", "first_token_time", "finish_time", "token_times"]),
            move(steps, ["start_time"]))


def test_each_run_is_drawn_from_its_own_start_and_normalized_on_request(tmp_path, tables):
    short = make_run(tmp_path / "a", tables, "cpu", name="short")
    late_long = make_run(tmp_path / "b", shifted(tables, 400.0, stretch=20.0), "sim", name="long")
    colors = ["#1f77b4", "#ff7f0e"]
    figure = _over_time_figure([short, late_long], ["short", "long"], colors, 50)
    starts = {trace.name: trace.x[0] for trace in figure.data if trace.name in ("short", "long")}
    ends = {trace.name: trace.x[-1] for trace in figure.data if trace.name in ("short", "long")}
    # Both start near 0 (not at 400 s), each ending at its own span.
    assert max(starts.values()) < 0.02 * ends["long"]
    assert ends["long"] > 10 * ends["short"]
    normalized = _over_time_figure([short, late_long], ["short", "long"], colors, 50, normalize_time=True)
    last = [trace.x[-1] for trace in normalized.data if trace.name in ("short", "long")]
    assert last == pytest.approx([99.0] * len(last)) and len(last) >= 2  # bin centres: the last at 99% of 50 bins
    assert "% of each run" in normalized.layout.xaxis6.title.text


def test_event_rates_and_length_histograms_count_everything(tables):
    requests, steps = tables
    end = float((steps.column("start_time").to_numpy() + steps.column("duration").to_numpy()).max())
    rates = step_event_rates(steps, 0.0, end, num_bins=40)
    width = end / 40
    assert (rates.column("preemptions_per_s").to_numpy() * width).sum() == pytest.approx(
        steps.column("num_preempted").to_numpy().sum())
    assert steps.column("num_preempted").to_numpy().sum() > 0  # the fixture's run does preempt
    assert (rates.column("prefix_hit_tokens_per_s").to_numpy() * width).sum() == pytest.approx(
        steps.column("prefix_cache_hit_tokens").to_numpy().sum())
    lengths = length_histogram(requests.column("prompt_len").to_numpy())
    assert lengths.column("count").to_numpy().sum() == requests.num_rows


def test_step_scatter_has_log_axes_and_timeline_hover_says_request_and_ms(tmp_path, tables):
    real, sim = make_run(tmp_path / "r", tables, "gpu"), make_run(tmp_path / "s", tables, "sim")
    scatter = _step_scatter_figure(compare_runs(real, sim))
    assert scatter.layout.xaxis.type == "log" and scatter.layout.yaxis.type == "log"
    timeline = _timeline_figure(real, "r", itl_threshold=0.05, max_requests=20)
    hover = [text for trace in timeline.data for text in trace.text if text]
    first_id = sorted(set(t.split()[1] for t in hover))[0]
    assert first_id.startswith("req-")
    assert any(text.startswith("request req-") and "TTFT" in text and " ms" in text for text in hover)
    assert any("tokens in" in text and "ms each" in text for text in hover)


def test_report_cli_flags(tmp_path, tables, capsys):
    from twinfer.cli import main

    write_run(tmp_path / "run", *tables, run_metadata(executor_kind="cpu", model="tiny", trace_name="t"))
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "run"), "-o", str(out), "--goodput", "ttft:500", "tpot:50",
                 "--itl-threshold", "25", "--metric-percentiles", "75,99.9", "--normalize-time",
                 "--timeline-requests", "30"]) == 0
    html = out.read_text().replace("\\u002f", "/").replace("\\u003e", ">")
    assert "P75 TTFT (ms)" in html and "P99.9 E2EL (ms)" in html and "P90 TTFT" not in html
    assert "goodput (req/s)" in html
    assert "token gaps > 25.0 ms" in html
    assert "% of each run" in html
    assert "30 consecutive requests" in html
    assert main(["report", str(tmp_path / "run"), "-o", str(out), "--itl-threshold", "-1"]) == 2
    assert "--itl-threshold must be a positive" in capsys.readouterr().err
