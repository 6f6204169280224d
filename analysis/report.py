"""One self-contained HTML report (plotly.js inlined once, works offline) of one or more runs.

It draws what analysis computed (metrics.py, timeseries.py, compare.py): a summary table per run, CDFs of
TTFT/TPOT/E2EL, engine state over time, per-request timelines and, for a real and a simulated run of the
same trace, their errors and predicted-versus-measured step durations.
"""

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.offline
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis.atomic_file import write_text_atomically
from analysis.compare import Comparison, compare_runs
from analysis.metrics import Metrics, compute_metrics
from analysis.summary import percentile_word
from analysis.timeseries import (
    cdf_points,
    request_timeline,
    length_histogram,
    run_time_range,
    step_event_rates,
    step_series,
    throughput_series,
)

REAL_KINDS = ("gpu", "cpu", "http")
SCATTER_POINTS = 5000
TIMELINE_COLORS = {"ttft": "#7f7f7f", "itl_ok": "#2ca02c", "itl_slow": "#d62728"}
TIMELINE_LABELS = {"ttft": "waiting for first token (TTFT)", "itl_ok": "token gaps <= {t}", "itl_slow": "token gaps > {t}"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
.note { color: #666; font-size: 13px; }
.twinfer-figure { margin: 8px 0 24px; }
"""


@dataclass(frozen=True)
class ReportContents:
    """What a built report holds: where it is and how many plots it draws."""

    path: Path
    num_figures: int
    comparisons: tuple[Comparison, ...]

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


def real_sim_pairs(runs) -> list[tuple[int, int]]:
    """(real, simulated) run indices that replayed the same trace (equal trace_fingerprint)."""
    pairs = []
    for sim_index, sim in enumerate(runs):
        if sim.executor_kind != "sim" or not sim.trace_fingerprint:
            continue
        for real_index, real in enumerate(runs):
            if real.executor_kind in REAL_KINDS and real.trace_fingerprint == sim.trace_fingerprint:
                pairs.append((real_index, sim_index))
    return pairs


def _escape(value) -> str:
    return html.escape("" if value is None else str(value))


def _label_runs(runs) -> list[str]:
    labels, seen = [], {}
    for run in runs:
        label = f"{run.name} ({run.executor_kind or '?'})"
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return labels


def _summary_table(runs, labels, metrics: list[Metrics], percentiles) -> str:
    def calibrated(run) -> str:
        kind = run.metadata.get("provenance")
        if kind is None and run.metadata.get("calibrated") is not None:  # runs written before provenance
            kind = "calibrated" if run.metadata["calibrated"] else "roofline"
        return {None: "n/a", "roofline": "UNCALIBRATED (roofline)"}.get(kind, kind)

    rows: list[tuple[str, list[str]]] = [
        ("executor", [_escape(r.executor_kind) for r in runs]),
        ("model", [_escape(r.metadata.get("model")) for r in runs]),
        ("GPU / profile", [_escape(r.metadata.get("gpu") or r.metadata.get("profile")) for r in runs]),
        ("cost model", [calibrated(r) for r in runs]),
        ("trace", [_escape(r.metadata.get("trace_name")) for r in runs]),
        ("complete", [_escape(r.metadata.get("complete")) for r in runs]),
        ("requests (completed / failed)", [f"{m.num_requests} ({m.completed} / {m.failed})" for m in metrics]),
        ("duration (s)", [f"{m.duration:.2f}" for m in metrics]),
        ("request throughput (req/s)", [f"{m.request_throughput:.2f}" for m in metrics]),
        ("output throughput (tok/s)", [f"{m.output_throughput:.2f}" for m in metrics]),
        ("total token throughput (tok/s)", [f"{m.total_token_throughput:.2f}" for m in metrics]),
    ]
    if any(m.request_goodput is not None for m in metrics):
        rows.append(("goodput (req/s)", ["n/a" if m.request_goodput is None else f"{m.request_goodput:.2f}" for m in metrics]))
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows.append((f"mean {name} (ms)", [f"{getattr(m, key).mean * 1000:.2f}" for m in metrics]))
        for p in percentiles:
            rows.append(
                (f"P{percentile_word(p)} {name} (ms)", [f"{getattr(m, key).percentile(p) * 1000:.2f}" for m in metrics])
            )
    head = "".join(f"<th>{_escape(label)}</th>" for label in labels)
    body = "".join(f"<tr><td>{name}</td>{''.join(f'<td>{v}</td>' for v in values)}</tr>" for name, values in rows)
    return f'<table class="summary"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def _comparison_table(comparison: Comparison) -> str:
    c = comparison
    mape = "n/a" if c.step_mape is None else f"{c.step_mape * 100:.2f}%"
    schedule = "identical" if c.identical_schedules else f"diverge at step {c.first_divergent_step}"
    facts = (
        f"<p class='note'>Schedules: {schedule}; {c.num_matched_steps} matched steps of "
        f"{c.num_real_steps} real / {c.num_simulated_steps} simulated; step duration MAPE {mape}; "
        f"busy time {c.real_busy_time:.3f} s real vs {c.simulated_busy_time:.3f} s simulated."
    )
    if c.predicted_step_mape is not None:
        facts += f" Cost model on the real run's own batches: step duration MAPE {c.predicted_step_mape * 100:.2f}%."
    facts += "</p>"
    facts += "".join(f"<p class='note'><b>Warning:</b> {_escape(warning)}</p>" for warning in c.warnings)
    rows = []
    for row in c.metric_errors.to_pylist():
        error = row["relative_error"]
        error_text = "n/a" if error is None or not np.isfinite(error) else f"{error * 100:+.2f}%"
        label = f"{row['statistic']} {row['metric']} ({row['unit']})".strip()
        rows.append(
            f"<tr><td>{_escape(label)}</td><td>{row['real']:.2f}</td><td>{row['simulated']:.2f}</td>"
            f"<td>{error_text}</td></tr>"
        )
    return (
        facts + "<table class='comparison'><thead><tr><th>metric</th><th>real</th><th>simulated</th>"
        f"<th>relative error</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _say_empty(figure: go.Figure, message: str) -> None:
    figure.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                          font={"size": 16, "color": "#888"})


def _cdf_figure(labels, metrics: list[Metrics], colors) -> go.Figure:
    keys = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2EL"))
    figure = make_subplots(rows=1, cols=3, subplot_titles=[f"{name} (ms)" for _, name in keys])
    for index, (label, m) in enumerate(zip(labels, metrics)):
        for column, (key, _) in enumerate(keys, start=1):
            points = cdf_points(getattr(m, key).samples * 1000)
            figure.add_trace(
                go.Scatter(
                    x=points.column("value").to_numpy(),
                    y=points.column("fraction").to_numpy(),
                    mode="lines",
                    name=label,
                    legendgroup=label,
                    showlegend=column == 1,
                    line={"color": colors[index], "shape": "hv"},
                ),
                row=1,
                col=column,
            )
    if not any(m.completed for m in metrics):
        _say_empty(figure, "no finished request: no latency to draw")
    figure.update_yaxes(title_text="fraction of requests", range=[0, 1.02], row=1, col=1)
    figure.update_layout(title="Latency CDFs", height=420)
    return figure


def _axis_time(time: np.ndarray, start: float, end: float, normalize: bool) -> np.ndarray:
    """Times from the run's own start, in seconds or (normalize) in % of the run's span."""
    since = time - start
    return since / max(end - start, 1e-12) * 100 if normalize else since


def _over_time_figure(runs, labels, colors, num_bins: int, normalize_time: bool = False) -> go.Figure:
    titles = ("output tokens/s (solid) and finished requests/s (dotted, right axis)",
              "running (solid) and waiting (dashed) requests", "tokens per step (batch)", "KV-cache usage (%)",
              "preemptions/s", "prefix-cache hit tokens/s")
    specs = [[{"secondary_y": True}]] + [[{}] for _ in titles[1:]]
    figure = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.05,
                           specs=specs)
    for index, (run, label) in enumerate(zip(runs, labels)):
        start, end = run_time_range(run.requests, run.steps)
        throughput = throughput_series(run.requests, start, end, num_bins)
        state = step_series(run.steps, start, end, num_bins)
        events = step_event_rates(run.steps, start, end, num_bins)
        time = _axis_time(state.column("time").to_numpy(), start, end, normalize_time)
        color = colors[index]
        common = {"mode": "lines", "legendgroup": label}

        def line(y, row, name=label, dash=None, secondary=False, show=False):
            figure.add_trace(go.Scatter(x=time, y=y, name=name, showlegend=show, line={"color": color, "dash": dash},
                                        **common), row=row, col=1, **({"secondary_y": True} if secondary else {}))

        line(throughput.column("output_tokens_per_s").to_numpy(), 1, show=True)
        line(throughput.column("finished_requests_per_s").to_numpy(), 1, name=f"{label} finished req/s", dash="dot",
             secondary=True)
        line(state.column("num_running").to_numpy(), 2)
        line(state.column("num_waiting").to_numpy(), 2, name=f"{label} waiting", dash="dash")
        line(state.column("num_batched_tokens").to_numpy(), 3)
        line(state.column("kv_cache_usage").to_numpy() * 100, 4)
        line(events.column("preemptions_per_s").to_numpy(), 5)
        line(events.column("prefix_hit_tokens_per_s").to_numpy(), 6)
    axis = "time (% of each run's span)" if normalize_time else "time from each run's own start (s)"
    figure.update_xaxes(title_text=axis, row=len(titles), col=1)
    figure.update_yaxes(title_text="req/s", row=1, col=1, secondary_y=True)
    figure.update_layout(title=f"Over time ({num_bins} bins per run; step columns weighted by step duration)",
                         height=1250)
    return figure


def _lengths_figure(runs, labels, colors) -> go.Figure:
    figure = make_subplots(rows=1, cols=2, subplot_titles=("prompt length (tokens)", "output length (tokens)"))
    for index, (run, label) in enumerate(zip(runs, labels)):
        for column, name in enumerate(("prompt_len", "max_tokens"), start=1):
            # Output: the trace's asked-for length (max_tokens), so rejected and unfinished requests count too.
            bins = length_histogram(run.requests.column(name).to_numpy(zero_copy_only=False))
            centers = (bins.column("bin_start").to_numpy() + bins.column("bin_end").to_numpy()) / 2
            figure.add_trace(
                go.Bar(x=centers, y=bins.column("count").to_numpy(), name=label, legendgroup=label,
                       showlegend=column == 1, marker={"color": colors[index]}, opacity=0.6,
                       width=(bins.column("bin_end").to_numpy() - bins.column("bin_start").to_numpy()),
                       customdata=np.stack([bins.column("bin_start").to_numpy(), bins.column("bin_end").to_numpy()], 1),
                       hovertemplate="%{customdata[0]:.0f}-%{customdata[1]:.0f} tokens: %{y} requests"),
                row=1, col=column)
    figure.update_yaxes(title_text="requests", row=1, col=1)
    figure.update_layout(title="Request lengths (every request of the trace)", barmode="overlay", height=400)
    return figure


def _timeline_figure(run, label: str, itl_threshold: float, max_requests: int) -> go.Figure:
    segments = request_timeline(run.requests, itl_threshold, max_requests)
    figure = go.Figure()
    threshold_text = f"{itl_threshold * 1000:.1f} ms"
    kinds = segments.column("kind").to_numpy(zero_copy_only=False)
    prompt_lens = dict(zip(run.requests.column("request_id").to_pylist(), run.requests.column("prompt_len").to_pylist()))
    for kind, color in TIMELINE_COLORS.items():
        chosen = np.flatnonzero(kinds == kind)
        rows = segments.column("row").to_numpy()[chosen]
        starts = segments.column("start").to_numpy()[chosen]
        ends = segments.column("end").to_numpy()[chosen]
        tokens = segments.column("num_tokens").to_numpy()[chosen]
        ids = segments.column("request_id").to_pylist()
        # As vLLM's timeline: the request id and the bar's times in ms.
        hover = [
            f"request {ids[i]} (prompt {prompt_lens.get(ids[i])} tokens)<br>"
            + (f"TTFT {1000 * (e - s):.1f} ms: {1000 * s:.1f} to {1000 * e:.1f} ms" if kind == "ttft" else
               f"{n} tokens in {1000 * (e - s):.1f} ms ({1000 * (e - s) / max(n, 1):.1f} ms each): "
               f"{1000 * s:.1f} to {1000 * e:.1f} ms")
            for i, s, e, n in zip(chosen, starts, ends, tokens)
        ]
        # One trace per colour: every bar is a line segment, separated by None (a gap in the line).
        x = np.empty(chosen.size * 3, dtype=object)
        y = np.empty(chosen.size * 3, dtype=object)
        text = np.empty(chosen.size * 3, dtype=object)
        x[0::3], x[1::3] = starts, ends
        y[0::3], y[1::3] = rows, rows
        text[0::3] = hover
        text[1::3] = hover
        figure.add_trace(
            go.Scatter(
                x=x, y=y, text=text, mode="lines", line={"color": color, "width": 4},
                name=TIMELINE_LABELS[kind].format(t=threshold_text), hoverinfo="text", connectgaps=False,
            )
        )
    count = len(set(segments.column("row").to_pylist()))
    if count == 0:
        _say_empty(figure, "no finished request to draw")
    figure.update_layout(
        title=f"Request timeline: {label} ({count} consecutive requests from the middle of the run)",
        xaxis_title="time from run start (s)",
        yaxis_title="request (by arrival)",
        height=max(360, min(1200, 8 * count + 160)),
    )
    figure.update_yaxes(autorange="reversed")
    return figure


def _step_scatter_figure(comparison: Comparison) -> go.Figure:
    # The cost model's predictions for the real batches cover every real step; matched steps only
    # cover the steps both schedules share.
    predicted = comparison.predicted_step_errors is not None
    steps = comparison.predicted_step_errors if predicted else comparison.step_errors
    mape_value = comparison.predicted_step_mape if predicted else comparison.step_mape
    which = "cost model on every real step's batch" if predicted else "steps with the same batch in both runs"
    real = steps.column("real_duration").to_numpy() * 1000
    simulated = steps.column("simulated_duration").to_numpy() * 1000
    if real.size > SCATTER_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(real.size, SCATTER_POINTS, replace=False))
        real, simulated = real[keep], simulated[keep]
    # Log axes: step durations span orders of magnitude (decode steps of ms, long prefills of 100s of ms), and on
    # linear axes most points crowd the origin.
    positive = (real > 0) & (simulated > 0)
    real, simulated = real[positive], simulated[positive]
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(x=real, y=simulated, mode="markers", name=which, marker={"size": 4, "opacity": 0.5},
                   hovertemplate="measured %{x:.2f} ms, predicted %{y:.2f} ms<extra></extra>")
    )
    low = float(min(real.min(initial=np.inf), simulated.min(initial=np.inf)))
    top = float(max(real.max(initial=0.0), simulated.max(initial=0.0)))
    if not np.isfinite(low) or top <= 0:
        low, top = 0.1, 1.0
    figure.add_trace(go.Scatter(x=[low, top], y=[low, top], mode="lines", name="predicted = measured",
                                line={"color": "#444", "dash": "dot"}))
    figure.update_xaxes(type="log")
    figure.update_yaxes(type="log")
    mape = "n/a" if mape_value is None else f"{mape_value * 100:.2f}%"
    figure.update_layout(
        title=f"Step duration: predicted vs measured ({comparison.simulated_name} vs {comparison.real_name}; MAPE {mape})",
        xaxis_title="measured step duration (ms, log)",
        yaxis_title="predicted step duration (ms, log)",
        height=520,
    )
    return figure


def build_report(
    runs,
    out_path: str | os.PathLike,
    *,
    title: str = "twinfer report",
    timeline_requests: int = 200,
    itl_threshold_ms: float | None = None,
    goodput: dict[str, float] | None = None,
    percentiles=(50.0, 90.0, 99.0),
    num_bins: int = 300,
    step_predictor_for=None,
    normalize_time: bool = False,
) -> ReportContents:
    """Write one self-contained HTML report of the runs; itl_threshold_ms defaults to the tpot SLO, else each
    run's p90 ITL. step_predictor_for(simulated_run) may return a step predictor for compare_runs (or None).
    Each run is drawn over time from its own start; normalize_time puts every run on 0-100% of its span."""
    runs = list(runs)
    if not runs:
        raise ValueError("build_report needs at least one run")
    labels = _label_runs(runs)
    colors = [qualitative.Plotly[i % len(qualitative.Plotly)] for i in range(len(runs))]
    metrics = [compute_metrics(run, goodput) for run in runs]
    if itl_threshold_ms is None and goodput and "tpot" in goodput:
        itl_threshold_ms = goodput["tpot"]
    # Without an SLO each run gets its own p90 ITL: the slowest tenth of its gaps stand out, whatever its
    # speed (a CPU run's gaps are seconds, a simulated H100's milliseconds).
    thresholds = [itl_threshold_ms / 1000 if itl_threshold_ms is not None else m.itl.p90 for m in metrics]
    sections: list[str] = [f"<h2>Summary</h2>{_summary_table(runs, labels, metrics, percentiles)}"]
    figures: list[tuple[str, go.Figure]] = []
    comparisons = []
    for real_index, sim_index in real_sim_pairs(runs):
        predictor = step_predictor_for(runs[sim_index]) if step_predictor_for is not None else None
        comparison = compare_runs(runs[real_index], runs[sim_index], goodput, step_predictor=predictor)
        comparisons.append(comparison)
        sections.append(
            f"<h2>Real vs simulated: {_escape(labels[sim_index])} against {_escape(labels[real_index])}</h2>"
            + _comparison_table(comparison)
        )
        if comparison.num_matched_steps or comparison.predicted_step_errors is not None:
            figures.append((f"real-vs-sim-{len(comparisons)}", _step_scatter_figure(comparison)))
    figures.append(("cdfs", _cdf_figure(labels, metrics, colors)))
    figures.append(("over-time", _over_time_figure(runs, labels, colors, num_bins, normalize_time)))
    figures.append(("lengths", _lengths_figure(runs, labels, colors)))
    for index, (run, label) in enumerate(zip(runs, labels)):
        figures.append((f"timeline-{index}", _timeline_figure(run, label, thresholds[index], timeline_requests)))

    figure_html = []
    for name, figure in figures:
        figure.update_layout(template="plotly_white", margin={"t": 60, "l": 60, "r": 20, "b": 50})
        div = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config={"responsive": True})
        figure_html.append(f'<div class="twinfer-figure" data-figure="{name}">{div}</div>')

    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{_escape(title)}</title><meta name='twinfer-figures' content='{len(figures)}'>"
        f"<style>{_STYLE}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        f"</head><body><h1>{_escape(title)}</h1>"
        f"<p class='note'>{len(runs)} run(s): {', '.join(_escape(l) for l in labels)}. Times in ms unless marked; "
        f"duration = last finish minus first arrival (vLLM's benchmark duration).</p>"
        + "".join(sections)
        + "<h2>Plots</h2>"
        + "".join(figure_html)
        + "</body></html>"
    )
    out_path = write_page(page, out_path)
    return ReportContents(path=out_path, num_figures=len(figures), comparisons=tuple(comparisons))


def write_page(page: str, out_path: str | os.PathLike) -> Path:
    """Write an HTML page whole or not at all (a full disk leaves neither half a report nor a temporary)."""
    return write_text_atomically(out_path, page)
