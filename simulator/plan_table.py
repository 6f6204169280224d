"""The plan as tables: schemas, ranking and the Pareto front, reading and writing CSV/Parquet/JSON, text."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from simulator.gpu_prices import price_of

if TYPE_CHECKING:
    from simulator.planner import ConfigPlan, PlanSettings


PLAN_SCHEMA = pa.schema(
    [
        ("rank", pa.int64()),
        ("gpu", pa.string()),
        ("tp", pa.int64()),
        ("max_num_seqs", pa.int64()),
        ("status", pa.string()),
        ("replicas", pa.int64()),
        ("gpus", pa.int64()),
        ("max_rate_per_replica", pa.float64()),
        ("max_rate_is_lower_bound", pa.bool_()),
        ("target_rate", pa.float64()),
        ("price_per_gpu_hour", pa.float64()),
        ("hourly_cost", pa.float64()),
        ("replica_hourly_cost", pa.float64()),
        ("pareto", pa.bool_()),
        ("cost_per_million_requests", pa.float64()),
        ("calibration", pa.string()),
        ("calibration_quality", pa.string()),
        ("expected_error", pa.string()),
        ("cost_model", pa.string()),
        ("num_kv_blocks", pa.int64()),
        ("verified_on", pa.string()),
        ("num_probes", pa.int64()),
        ("note", pa.string()),
    ]
)
"""One row per configuration, ranked by hourly cost then GPUs (rank null for infeasible ones);
calibration is the kind of cost model that predicted the row (calibrated, composed or roofline),
calibration_quality says "poorly calibrated: why" for a calibrated profile that failed its quality gates, and
expected_error what the validation in BENCHMARKS.md measured for that kind; roofline rows are ranked after
every calibrated or composed one (their latencies were 20-40% short in that validation) unless the caller
mixes them; pareto marks the configurations no other beats on both a replica's hourly cost and the rate one
replica sustains."""

EXPECTED_ERROR = {
    "calibrated": "mean latencies within 5% on the engine and machine profiled (Qwen3-8B, H200); the bundled "
                  "profiles predate the engine's fused norms: Qwen3-8B's TPOT +9% on it (session 11)",
    "composed": "step MAPE 1.4-5.9%, mean latencies -7% to +3% for Qwen3-8B/32B and Llama-3-8B, +4% to +15% for "
                "Qwen3-0.6B (long; to +21% profiled on another machine start); throughput within 1% (8 held-out "
                "H200 replays, session 12)",
    "roofline": "latencies 20-40% short (Llama-3-8B, Qwen3-32B on an H200, session 8)",
}
"""The error band of each kind of cost model, as BENCHMARKS.md measured it on real replays."""

PROBES_SCHEMA = pa.schema(
    [
        ("gpu", pa.string()),
        ("tp", pa.int64()),
        ("max_num_seqs", pa.int64()),
        ("phase", pa.string()),
        ("rate", pa.float64()),
        ("replicas", pa.int64()),
        ("num_requests", pa.int64()),
        ("sustained", pa.bool_()),
        ("stopped_early", pa.bool_()),
        ("reason", pa.string()),
        ("ttft_p99_ms", pa.float64()),
        ("tpot_p99_ms", pa.float64()),
        ("e2el_p99_ms", pa.float64()),
        ("slo_values_ms", pa.list_(pa.float64())),
        ("seconds", pa.float64()),
    ]
)
"""Every simulation the planner ran; slo_values_ms follows the order of the plan's SLOs (plan.json)."""


@dataclass(frozen=True)
class PlanResult:
    """The ranked table, every probe, and what the plan was asked."""

    table: pa.Table
    probes: pa.Table
    info: dict = field(default_factory=dict)

    def best(self) -> dict | None:
        """The top-ranked row, or None when no configuration meets the SLOs."""
        rows = [row for row in self.table.to_pylist() if row["rank"] is not None]
        return rows[0] if rows else None



def rank_plans(plans: Sequence[ConfigPlan], settings: PlanSettings, prices: dict[str, float],
               mix_roofline: bool = False) -> pa.Table:
    """The plan table: feasible configurations by hourly cost, then GPUs, then headroom; the rest after."""
    rows = []
    for plan in plans:
        price = price_of(prices, plan.config.gpu)
        ok = plan.status == "ok"
        cost = plan.gpus * price if ok and price is not None else None
        rows.append(
            {
                "rank": None,
                "gpu": plan.config.gpu,
                "tp": plan.config.tp,
                "max_num_seqs": plan.config.max_num_seqs,
                "status": plan.status,
                "replicas": plan.replicas if ok else None,
                "gpus": plan.gpus if ok else None,
                "max_rate_per_replica": plan.max_rate if plan.max_rate > 0 else None,
                "max_rate_is_lower_bound": plan.max_rate_is_lower_bound,
                "target_rate": settings.target_rate,
                "price_per_gpu_hour": price,
                "hourly_cost": cost,
                "replica_hourly_cost": plan.config.tp * price if price is not None else None,
                "pareto": False,
                "cost_per_million_requests": cost / (settings.target_rate * 3600) * 1e6 if cost is not None else None,
                "calibration": plan.provenance,
                "calibration_quality": plan.calibration_quality,
                "expected_error": EXPECTED_ERROR.get(plan.provenance, ""),
                "cost_model": plan.cost_model,
                "num_kv_blocks": plan.num_kv_blocks or None,
                "verified_on": plan.verified_on,
                "num_probes": len(plan.probes),
                "note": plan.note,
            }
        )

    def order(row):
        feasible = row["status"] == "ok"
        cost = row["hourly_cost"]
        apart = row["calibration"] == "roofline" and not mix_roofline
        return (not feasible, apart, cost is None, cost or 0.0, row["gpus"] or 0,
                -(row["max_rate_per_replica"] or 0.0))

    rows.sort(key=order)
    for row, on_front in zip(rows, pareto_front(rows)):
        row["pareto"] = on_front
    rank = 0
    for row in rows:
        if row["status"] == "ok":
            rank += 1
            row["rank"] = rank
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def pareto_front(rows: Sequence[dict]) -> list[bool]:
    """Rows with a sustained rate that no other row beats: cheaper-or-equal replica and higher-or-equal
    rate, strictly better in one."""
    points = [(row["replica_hourly_cost"], row["max_rate_per_replica"]) for row in rows]
    front = []
    for cost, rate in points:
        if cost is None or rate is None:
            front.append(False)
            continue
        dominated = any(
            other_cost is not None and other_rate is not None and other_cost <= cost and other_rate >= rate
            and (other_cost < cost or other_rate > rate)
            for other_cost, other_rate in points
        )
        front.append(not dominated)
    return front


def read_plan(out_dir: str | os.PathLike) -> PlanResult:
    """A plan written by write_plan."""
    out = Path(out_dir)
    missing = [name for name in ("plan.parquet", "probes.parquet", "plan.json") if not (out / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{out} is not a plan folder: missing {', '.join(missing)}")
    return PlanResult(
        pq.read_table(out / "plan.parquet").cast(PLAN_SCHEMA),
        pq.read_table(out / "probes.parquet").cast(PROBES_SCHEMA),
        json.loads((out / "plan.json").read_text()),
    )


def probes_table(plans: Sequence[ConfigPlan], settings: PlanSettings) -> pa.Table:
    """Every probe of every configuration (for the latency-versus-rate curves)."""
    rows = []
    for plan in plans:
        for probe in plan.probes:
            rows.append(
                {
                    "gpu": plan.config.gpu,
                    "tp": plan.config.tp,
                    "max_num_seqs": plan.config.max_num_seqs,
                    "phase": probe.phase,
                    "rate": probe.rate,
                    "replicas": probe.replicas,
                    "num_requests": probe.num_requests,
                    "sustained": probe.sustained,
                    "stopped_early": probe.stopped_early,
                    "reason": probe.reason,
                    "ttft_p99_ms": probe.values_ms.get("ttft_p99"),
                    "tpot_p99_ms": probe.values_ms.get("tpot_p99"),
                    "e2el_p99_ms": probe.values_ms.get("e2el_p99"),
                    "slo_values_ms": [probe.values_ms.get(slo.name) for slo in settings.slos],
                    "seconds": probe.seconds,
                }
            )
    return pa.Table.from_pylist(rows, schema=PROBES_SCHEMA)



def write_plan(result: PlanResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """plan.csv, plan.parquet, probes.parquet and plan.json in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("plan.csv", "plan.parquet", "probes.parquet", "plan.json")}
    pa_csv.write_csv(result.table, paths["plan.csv"])
    pq.write_table(result.table, paths["plan.parquet"])
    pq.write_table(result.probes, paths["probes.parquet"])
    paths["plan.json"].write_text(json.dumps(result.info, indent=2, sort_keys=True))
    return paths


def format_plan(table: pa.Table, limit: int = 10) -> str:
    """The top rows of the ranked table as aligned text."""
    header = f"{'rank':>4} {'config':<22} {'replicas':>8} {'GPUs':>5} {'max req/s':>9} {'$/hour':>8}  calibration"
    lines = [header, "-" * len(header)]
    for row in table.to_pylist()[:limit]:
        config = f"{row['gpu']} tp{row['tp']} seqs{row['max_num_seqs']}"
        if row["rank"] is None:
            lines.append(f"{'-':>4} {config:<22} {row['status']}: {row['note'][:70]}")
            continue
        # ">=": every rate the search tried was sustained, so the replica's limit lies above.
        rate = f"{'>=' if row['max_rate_is_lower_bound'] else ''}{row['max_rate_per_replica']:.2f}"
        lines.append(
            f"{row['rank']:>4} {config:<22} {row['replicas']:>8} {row['gpus']:>5} "
            f"{rate:>9} {row['hourly_cost']:>8.2f}  {row['calibration']}"
            + (" (POORLY CALIBRATED)" if row.get("calibration_quality") else "")
        )
    return "\n".join(lines)
