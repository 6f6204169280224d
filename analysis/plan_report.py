"""The plotly HTML report of a capacity plan: the ranked table, latency-versus-rate curves from the
search's probes with the SLO lines, and the cost/throughput Pareto front. It draws what
simulator/planner.py computed (simulator/plan_table.py holds its tables); nothing is decided here."""

from __future__ import annotations

import html
import os
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis.report import write_page

MARKERS = {"calibrated": "diamond", "composed": "square", "roofline": "circle-open"}
"""The Pareto plot's marker of each kind of cost model, so a reader tells predictions of different trust apart."""
MARKER_NAMES = {"diamond": "&#9670;", "square": "&#9632;", "circle-open": "&#9675;"}
MARKER_GLYPHS = {"diamond": "\u25c6", "square": "\u25a0", "circle-open": "\u25cb"}
"""The same shapes as characters, for the plot's legend."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
td.text, th.text { text-align: left; }
thead th { background: #f3f3f3; }
tr.infeasible td { color: #999; }
.note { color: #666; font-size: 13px; }
"""

_TABLE_COLUMNS = (
    ("rank", "rank", "{}"),
    ("config", "config", "{}"),
    ("replicas", "replicas", "{}"),
    ("gpus", "GPUs", "{}"),
    ("max_rate_per_replica", "max req/s per replica", "{}"),
    ("hourly_cost", "$ / hour", "{:.2f}"),
    ("cost_per_million_requests", "$ / M requests", "{:.2f}"),
    ("calibration", "calibration", "{}"),
    ("verified_on", "verified on", "{}"),
    ("note", "note", "{}"),
)


def _config_label(row: dict) -> str:
    return f"{row['gpu']} tp{row['tp']} seqs{row['max_num_seqs']}"


def _cell(value, fmt: str) -> str:
    return "" if value is None else html.escape(fmt.format(value))


def _plan_table(rows: list[dict]) -> str:
    """The ranked table; a max rate the search never saw broken is shown as a lower bound (>=)."""
    head = "".join(
        f"<th class='{'text' if key in ('config', 'calibration', 'verified_on', 'note') else ''}'>{title}</th>"
        for key, title, _ in _TABLE_COLUMNS
    )
    body = []
    for row in rows:
        row = {**row, "config": _config_label(row)}
        rate = row["max_rate_per_replica"]
        if rate is not None:
            row["max_rate_per_replica"] = f"{'>=' if row.get('max_rate_is_lower_bound') else ''}{rate:.2f}"
        cells = "".join(
            f"<td class='{'text' if key in ('config', 'calibration', 'verified_on', 'note') else ''}'>"
            f"{_cell(row[key], fmt)}</td>"
            for key, _, fmt in _TABLE_COLUMNS
        )
        body.append(f"<tr class='{'' if row['rank'] is not None else 'infeasible'}'>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def latency_figure(probes: list[dict], slos: list[dict]) -> go.Figure:
    """p99 TTFT and p99 TPOT against the request rate one replica was given, one line per configuration."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("p99 TTFT (ms)", "p99 TPOT (ms)"), horizontal_spacing=0.08)
    search = [p for p in probes if p["phase"] == "search"]
    configs = sorted({(p["gpu"], p["tp"], p["max_num_seqs"]) for p in search})
    palette = qualitative.Dark24
    for index, key in enumerate(configs):
        points = sorted((p for p in search if (p["gpu"], p["tp"], p["max_num_seqs"]) == key), key=lambda p: p["rate"])
        label = f"{key[0]} tp{key[1]} seqs{key[2]}"
        color = palette[index % len(palette)]
        for column, (metric, _) in enumerate((("ttft_p99_ms", "ttft"), ("tpot_p99_ms", "tpot")), start=1):
            figure.add_trace(
                go.Scatter(
                    x=[p["rate"] for p in points],
                    y=[p[metric] for p in points],
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=column == 1,
                    line={"color": color, "width": 1.5},
                    marker={"symbol": ["circle" if p["sustained"] else "x" for p in points], "size": 7},
                    text=[("sustained" if p["sustained"] else f"broken: {p['reason']}")
                          + (" (stopped early: a lower bound)" if p["stopped_early"] else "") for p in points],
                    hovertemplate="%{x:.2f} req/s: %{y:.1f} ms<br>%{text}<extra>" + label + "</extra>",
                ),
                row=1,
                col=column,
            )
    rates = [p["rate"] for p in search]
    for slo in slos:
        column = {"ttft": 1, "tpot": 2}.get(slo["metric"])
        if column is not None and rates:
            # A line trace, not add_hline: hline annotations land at 10**y on log axes.
            label = f"SLO {slo['name']} {slo['limit_ms']:g} ms"
            figure.add_trace(
                go.Scatter(x=[min(rates), max(rates)], y=[slo["limit_ms"]] * 2, mode="lines", name=label,
                           line={"color": "#d62728", "dash": "dash", "width": 2}, hovertemplate=label + "<extra></extra>"),
                row=1,
                col=column,
            )
    figure.update_xaxes(title_text="request rate per replica (req/s)", type="log")
    figure.update_yaxes(type="log")
    figure.update_layout(height=520, margin={"t": 60}, legend={"font": {"size": 11}},
                         title="Latency against request rate, one replica (x: SLO broken)")
    return figure


def pareto_figure(rows: list[dict]) -> go.Figure:
    """Each configuration's replica cost against the rate it sustains; the Pareto front joined."""
    figure = go.Figure()
    feasible = [row for row in rows if row["max_rate_per_replica"] is not None and row["replica_hourly_cost"] is not None]
    gpus = sorted({row["gpu"] for row in feasible})
    palette = qualitative.Plotly
    for index, gpu in enumerate(gpus):
        # One trace per GPU and kind of cost model, so the legend names each marker's kind.
        for kind in sorted({row["calibration"] for row in feasible if row["gpu"] == gpu}):
            points = [row for row in feasible if row["gpu"] == gpu and row["calibration"] == kind]
            poor = any(row.get("calibration_quality") for row in points)
            figure.add_trace(
                go.Scatter(
                    x=[row["replica_hourly_cost"] for row in points],
                    y=[row["max_rate_per_replica"] for row in points],
                    mode="markers",
                    name=f"{gpu}: {MARKER_GLYPHS[MARKERS.get(kind, 'circle-open')]} {kind}"
                         + (" (POORLY CALIBRATED)" if poor else ""),
                    legendgroup=gpu,
                    marker={"size": 10, "color": palette[index % len(palette)],
                            "symbol": MARKERS.get(kind, "circle-open")},
                    text=[f"{_config_label(row)}: {row['calibration']}"
                          + (f" ({row['calibration_quality']})" if row.get("calibration_quality") else "")
                          + f"; plan {row['gpus'] or '-'} GPUs, ${row['hourly_cost'] or 0:.2f}/h" for row in points],
                    hovertemplate="%{text}<br>replica $%{x:.2f}/h sustains %{y:.2f} req/s<extra></extra>",
                )
            )
    front = sorted((row for row in feasible if row["pareto"]), key=lambda row: row["replica_hourly_cost"])
    if front:
        figure.add_trace(
            go.Scatter(
                x=[row["replica_hourly_cost"] for row in front],
                y=[row["max_rate_per_replica"] for row in front],
                mode="lines",
                name="Pareto front",
                line={"color": "#222", "dash": "dot"},
                hoverinfo="skip",
            )
        )
    if not feasible:
        figure.add_annotation(text="no configuration sustained any rate", showarrow=False, x=0.5, y=0.5,
                              xref="paper", yref="paper")
    figure.update_layout(
        height=480,
        title="Cost against throughput: $ per replica-hour vs requests/s one replica sustains within the SLO",
        xaxis_title="$ per replica-hour (tp x price per GPU-hour)",
        yaxis_title="max request rate per replica (req/s)",
    )
    return figure


def build_plan_report(result, output: str | os.PathLike) -> Path:
    """Write one self-contained HTML file (plotly.js inlined) for a PlanResult; returns its path."""
    rows = result.table.to_pylist()
    probes = result.probes.to_pylist()
    info = result.info
    slos = info.get("slos", [])
    figures = {"latency": latency_figure(probes, slos), "pareto": pareto_figure(rows)}
    divs = {
        name: figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                             config={"responsive": True})
        for name, figure in figures.items()
    }
    slo_text = ", ".join(f"{slo['name']} &le; {slo['limit_ms']:g} ms" for slo in slos)
    kinds = {row["calibration"] for row in rows}
    notes = [
        f"Trace {html.escape(str(info.get('trace')))} ({info.get('trace_requests')} requests), model "
        f"{html.escape(str(info.get('model')))}, target {info.get('target_rate')} req/s, SLO {slo_text}, "
        f"router {html.escape(str(info.get('router')))}.",
        f"Each configuration's max rate was searched on the trace's busiest {info.get('search_requests')} "
        f"consecutive requests (scaled as the whole trace); the "
        f"{info.get('verify_top')} cheapest were verified on the whole trace. {info.get('num_simulations')} "
        f"simulations in {info.get('total_seconds', 0):.0f} s.",
        "Prices ($ per GPU-hour): " + ", ".join(f"{k} {v:g}" for k, v in info.get("prices_per_gpu_hour", {}).items()),
    ]
    notes.append("Markers: " + ", ".join(f"{MARKER_NAMES[marker]} {kind}" for kind, marker in MARKERS.items()) + ".")
    errors = {row["calibration"]: row.get("expected_error") for row in rows}
    notes += [f"{kind} rows: {html.escape(errors[kind])}" for kind in sorted(kinds) if errors.get(kind)]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>twinfer plan</title>"
        f"<style>{_STYLE}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        "</head><body><h1>twinfer capacity plan</h1>"
        + "".join(f"<p class='note'>{note}</p>" for note in notes)
        + "<h2>Ranked configurations</h2>" + _plan_table(rows)
        + "<h2>Latency against request rate</h2>" + divs["latency"]
        + "<h2>Cost and throughput</h2>" + divs["pareto"]
        + "</body></html>"
    )
    return write_page(page, output)
