"""How far a simulated run is from a real run of the same trace: per-step durations and serving metrics.

Step durations are compared two ways. Matched: step by step where both runs scheduled the same batch at
the same step index (a simulated run given the real run's KV block count schedules identically as long as
its predicted times keep the same order of events; with real arrival times the schedules usually drift
apart). Predicted: when a step_predictor (the simulator's cost model) is given, it predicts every real
step from that step's own batch columns, which measures the cost model whatever the schedules did.
The aggregate (total busy time) is given either way.
Relative error is (simulated - real) / real; MAPE is the mean of its absolute value.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from analysis.metrics import Metrics, compute_metrics

BATCH_COLUMNS = (
    "num_prefill_seqs",
    "num_prefill_tokens",
    "num_decode_seqs",
    "decode_context_tokens",
    "prefill_context_tokens",
)
"""A step's batch, as far as its duration depends on it; equal columns mean the same work."""

LATENCY_STATISTICS = (("mean", "mean"), ("p50", "median"), ("p90", "p90"), ("p99", "p99"))
COMPARED_LATENCIES = ("ttft", "tpot", "itl", "e2el")
COMPARED_THROUGHPUTS = (
    ("request_throughput", "req/s"),
    ("output_throughput", "tok/s"),
    ("total_token_throughput", "tok/s"),
)
METRIC_ERRORS_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("statistic", pa.string()),
        ("unit", pa.string()),
        ("real", pa.float64()),
        ("simulated", pa.float64()),
        ("relative_error", pa.float64()),
    ]
)
STEP_ERRORS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("real_duration", pa.float64()),
        ("simulated_duration", pa.float64()),
        ("relative_error", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Comparison:
    """The real-versus-simulated errors of one pair of runs."""

    real_name: str
    simulated_name: str
    num_real_steps: int
    num_simulated_steps: int
    num_matched_steps: int
    """Steps with the same index and the same batch in both runs."""
    first_divergent_step: int | None
    """The first step index whose batches differ (None when the schedules are identical)."""
    step_mape: float | None
    """Mean absolute relative error of matched step durations (a fraction); None with no matched step."""
    step_errors: pa.Table
    real_busy_time: float
    simulated_busy_time: float
    metric_errors: pa.Table
    real_metrics: Metrics
    simulated_metrics: Metrics
    predicted_step_errors: pa.Table | None = None
    """Every real step against the step_predictor's prediction for its batch (None without a predictor)."""
    predicted_step_mape: float | None = None
    warnings: tuple[str, ...] = ()
    """What makes the comparison less than like for like (an incomplete run, requests only one run holds)."""

    @property
    def identical_schedules(self) -> bool:
        """Both runs scheduled exactly the same batches, step for step."""
        return self.first_divergent_step is None

    @property
    def busy_time_error(self) -> float:
        """Relative error of the total time spent in steps."""
        return _relative_error(self.real_busy_time, self.simulated_busy_time)

    def to_text(self) -> str:
        """A printable table of every error."""
        return format_comparison(self)

    def format(self) -> str:
        """Same as to_text()."""
        return format_comparison(self)

    def to_dict(self) -> dict:
        """Plain JSON-ready data: the step summary and every metric error (NaN as None)."""

        def plain(value):
            if isinstance(value, float) and not np.isfinite(value):
                return None
            return value

        return {
            "real_run": self.real_name,
            "simulated_run": self.simulated_name,
            "num_real_steps": self.num_real_steps,
            "num_simulated_steps": self.num_simulated_steps,
            "num_matched_steps": self.num_matched_steps,
            "identical_schedules": self.identical_schedules,
            "first_divergent_step": self.first_divergent_step,
            "step_mape": plain(self.step_mape),
            "real_busy_time": self.real_busy_time,
            "simulated_busy_time": self.simulated_busy_time,
            "busy_time_error": plain(self.busy_time_error),
            "predicted_step_mape": plain(self.predicted_step_mape),
            "warnings": list(self.warnings),
            "metric_errors": [
                {key: plain(value) for key, value in row.items()} for row in self.metric_errors.to_pylist()
            ],
        }


def _relative_error(real: float, simulated: float) -> float:
    if real == 0:
        return 0.0 if simulated == 0 else float("nan")
    return (simulated - real) / real


def _batch_matrix(steps: pa.Table, count: int) -> np.ndarray:
    return np.stack([steps.column(name).to_numpy()[:count].astype(np.int64) for name in BATCH_COLUMNS], axis=1)


def match_steps(real_steps: pa.Table, simulated_steps: pa.Table) -> tuple[pa.Table, int | None]:
    """Per-step durations where both runs ran the same batch at the same index, and the first divergence."""
    common = min(real_steps.num_rows, simulated_steps.num_rows)
    same = np.all(_batch_matrix(real_steps, common) == _batch_matrix(simulated_steps, common), axis=1)
    mismatches = np.flatnonzero(~same)
    if mismatches.size:
        first_divergent = int(real_steps.column("step")[int(mismatches[0])].as_py())
    elif real_steps.num_rows != simulated_steps.num_rows:
        first_divergent = int(common)
    else:
        first_divergent = None
    real = real_steps.column("duration").to_numpy()[:common][same]
    simulated = simulated_steps.column("duration").to_numpy()[:common][same]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(real > 0, (simulated - real) / real, np.nan)
    table = pa.table(
        {
            "step": real_steps.column("step").to_numpy()[:common][same],
            "real_duration": real,
            "simulated_duration": simulated,
            "relative_error": relative,
        },
        schema=STEP_ERRORS_SCHEMA,
    )
    return table, first_divergent


def metric_errors(real: Metrics, simulated: Metrics) -> pa.Table:
    """Relative error of each latency statistic (ms) and each throughput."""
    rows = []
    for metric in COMPARED_LATENCIES:
        # A latency with no sample in a run (no finished request, or none with two tokens) reads 0 there: an
        # error against it would claim a perfect match (0 vs 0) or a -100% miss, so it has none.
        measured = getattr(real, metric).count > 0 and getattr(simulated, metric).count > 0
        for statistic, attribute in LATENCY_STATISTICS:
            real_value = getattr(getattr(real, metric), attribute) * 1000
            simulated_value = getattr(getattr(simulated, metric), attribute) * 1000
            error = _relative_error(real_value, simulated_value) if measured else float("nan")
            rows.append((metric, statistic, "ms", real_value, simulated_value, error))
    for attribute, unit in COMPARED_THROUGHPUTS:
        real_value, simulated_value = getattr(real, attribute), getattr(simulated, attribute)
        rows.append((attribute, "", unit, real_value, simulated_value, _relative_error(real_value, simulated_value)))
    rows.append(("duration", "", "s", real.duration, simulated.duration,
                 _relative_error(real.duration, simulated.duration)))
    return pa.Table.from_pylist(
        [
            {"metric": m, "statistic": s, "unit": u, "real": r, "simulated": v, "relative_error": e}
            for m, s, u, r, v, e in rows
        ],
        schema=METRIC_ERRORS_SCHEMA,
    )


def predicted_step_errors(real_steps: pa.Table, step_predictor: Callable[[pa.Table], np.ndarray]) -> pa.Table:
    """Each real step's measured duration against step_predictor(real_steps), its predicted durations (s)."""
    predicted = np.asarray(step_predictor(real_steps), dtype=np.float64)
    if predicted.shape != (real_steps.num_rows,):
        raise ValueError(
            f"step_predictor returned {predicted.shape} predictions for {real_steps.num_rows} steps"
        )
    measured = real_steps.column("duration").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(measured > 0, (predicted - measured) / measured, np.nan)
    return pa.table(
        {"step": real_steps.column("step").to_numpy(), "real_duration": measured,
         "simulated_duration": predicted, "relative_error": relative},
        schema=STEP_ERRORS_SCHEMA,
    )


def _mape(step_errors: pa.Table) -> float | None:
    errors = step_errors.column("relative_error").to_numpy()
    errors = errors[np.isfinite(errors)]
    return float(np.abs(errors).mean()) if errors.size else None


def compare_runs(
    real,
    simulated,
    goodput: dict[str, float] | None = None,
    step_predictor: Callable[[pa.Table], np.ndarray] | None = None,
) -> Comparison:
    """Compare a real run with a simulated run of the same trace (Run objects); step_predictor maps a steps
    table to predicted durations in seconds (e.g. the cost model's predict_columns over its columns)."""
    fingerprints = (real.metadata.get("trace_fingerprint"), simulated.metadata.get("trace_fingerprint"))
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise ValueError(
            f"runs {real.path} and {simulated.path} replayed different traces "
            f"(trace_fingerprint {fingerprints[0][:12]}... vs {fingerprints[1][:12]}...)"
        )
    warnings = _warnings(real, simulated, None not in fingerprints)
    step_errors, first_divergent = match_steps(real.steps, simulated.steps)
    predicted = predicted_step_errors(real.steps, step_predictor) if step_predictor is not None else None
    real_metrics = compute_metrics(real, goodput)
    simulated_metrics = compute_metrics(simulated, goodput)
    return Comparison(
        real_name=real.name,
        simulated_name=simulated.name,
        num_real_steps=real.steps.num_rows,
        num_simulated_steps=simulated.steps.num_rows,
        num_matched_steps=step_errors.num_rows,
        first_divergent_step=first_divergent,
        step_mape=_mape(step_errors),
        step_errors=step_errors,
        real_busy_time=float(np.sum(real.steps.column("duration").to_numpy())),
        simulated_busy_time=float(np.sum(simulated.steps.column("duration").to_numpy())),
        metric_errors=metric_errors(real_metrics, simulated_metrics),
        real_metrics=real_metrics,
        simulated_metrics=simulated_metrics,
        predicted_step_errors=predicted,
        predicted_step_mape=_mape(predicted) if predicted is not None else None,
        warnings=warnings,
    )


def _warnings(real, simulated, same_trace: bool) -> tuple[str, ...]:
    """What makes the two runs less than like for like; requests that differ without a common trace
    fingerprint mean they replayed different traces, an error."""
    warnings = []
    for label, run in (("real", real), ("simulated", simulated)):
        if run.metadata.get("complete") is False:
            warnings.append(
                f"the {label} run {run.path} is incomplete (stopped early): its metrics cover only what it ran"
            )
    real_ids = set(real.requests.column("request_id").to_pylist())
    simulated_ids = set(simulated.requests.column("request_id").to_pylist())
    if real_ids != simulated_ids:
        common = len(real_ids & simulated_ids)
        counts = f"{len(real_ids)} real and {len(simulated_ids)} simulated requests, {common} in common"
        subset = real_ids <= simulated_ids or simulated_ids <= real_ids
        if not same_trace and not (subset and warnings):
            raise ValueError(
                f"runs {real.path} and {simulated.path} hold different requests ({counts}) and do not both "
                "record a trace fingerprint: they do not look like replays of the same trace"
            )
        warnings.append(f"the runs hold different requests ({counts}): their metrics are not like for like")
    return tuple(warnings)


def _percent(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value * 100:+.2f}%"


def format_comparison(comparison: Comparison) -> str:
    """The comparison as fixed-width text: step-duration errors, then one row per metric."""
    c = comparison
    lines = ["{s:{c}^{n}}".format(s=" Real vs Simulated ", n=72, c="=")]
    lines.append(f"{'Real run:':<40} {c.real_name}")
    lines.append(f"{'Simulated run:':<40} {c.simulated_name}")
    lines.append(f"{'Steps (real / simulated):':<40} {c.num_real_steps} / {c.num_simulated_steps}")
    schedule = "identical" if c.identical_schedules else f"diverge at step {c.first_divergent_step}"
    lines.append(f"{'Schedules:':<40} {schedule}")
    lines.append(f"{'Matched steps (same batch, same index):':<40} {c.num_matched_steps}")
    mape = "n/a" if c.step_mape is None else f"{c.step_mape * 100:.2f}%"
    lines.append(f"{'Step duration MAPE:':<40} {mape}")
    if c.predicted_step_errors is not None:
        predicted = "n/a" if c.predicted_step_mape is None else f"{c.predicted_step_mape * 100:.2f}%"
        lines.append(f"{'Step MAPE, cost model on real batches:':<40} {predicted} ({c.num_real_steps} steps)")
    lines.append(
        f"{'Busy time (real / simulated, s):':<40} {c.real_busy_time:.3f} / {c.simulated_busy_time:.3f}"
        f" ({_percent(c.busy_time_error)})"
    )
    for warning in c.warnings:
        lines.append(f"WARNING: {warning}")
    lines.append("{s:{c}^{n}}".format(s="", n=72, c="-"))
    lines.append(f"{'Metric':<30} {'Real':>12} {'Simulated':>12} {'Rel. error':>12}")
    for row in c.metric_errors.to_pylist():
        label = f"{row['statistic']} {row['metric']} ({row['unit']})".strip()
        lines.append(f"{label:<30} {row['real']:>12.2f} {row['simulated']:>12.2f} {_percent(row['relative_error']):>12}")
    lines.append("=" * 72)
    return "\n".join(lines)
