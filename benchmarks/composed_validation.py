"""Issue 15's held-out validation: real replays (benchmarks/gpu_replays.sh) against the composed twin.

Each case is a model and a trace at a load chosen for that model (LOADS). The real run was replayed on a
GPU with dummy weights; here the same trace options go through `twinfer simulate` with the cost model asked
for (--kind composed: built from the operator profile, no step of the model in any fit; calibrated: the
bundled profile), the real run's KV block count and engine options, and `twinfer compare` scores it.

    python benchmarks/composed_validation.py --runs DIR [--kind composed|calibrated] [--json OUT]
    python benchmarks/composed_validation.py --print-load MODEL CASE      (gpu_replays.sh's trace options)

The reference runs of today's engine are session 12's, 20 s of arrivals each, replayed on the machine start that
timed the bundled profile's power_ramp, host_step and graph_gap tables: unpack
benchmarks/data/h200/session12/runs-call4.tgz (runs-s12/real-MODEL-CASE) and pass --runs runs-s12 --duration 20.
Session 11's (benchmarks/data/h200/session11/runs/*.tgz, another machine start) give the cross-machine figures. Session 8's runs (benchmarks/data/h200/composed/runs, 40 s) ran an engine
without its fused norms, rotary and SwiGLU gate (BENCHMARKS.md, issue 15, session 11): a record, not a reference.
"""

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

CASE_TRACES = {
    "azure-conv": "gpu_data/azure_conv_rows3000_5500.csv",
    "sharegpt": "gpu_data/sharegpt_8k.csv",
}
# Trace options per (model, case): a load that keeps the GPU busy without swamping it.
LOADS = {
    ("qwen3-0.6b", "azure-conv"): "--time-scale 0.2",
    ("qwen3-8b", "azure-conv"): "--time-scale 0.5",
    ("llama-3-8b", "azure-conv"): "--time-scale 0.5",
    ("qwen3-32b", "azure-conv"): "--time-scale 2",
    ("qwen3-0.6b", "sharegpt"): "--arrivals poisson:16",
    ("qwen3-8b", "sharegpt"): "--arrivals poisson:5",
    ("llama-3-8b", "sharegpt"): "--arrivals poisson:5",
    ("qwen3-32b", "sharegpt"): "--arrivals poisson:1.5",
}


def load_options(model: str, case: str) -> list[str]:
    """The trace file and options of a case, as gpu_replays.sh passes them to `twinfer replay`."""
    return [CASE_TRACES[case], *LOADS[(model, case)].split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print-load", nargs=2, metavar=("MODEL", "CASE"))
    parser.add_argument("--runs", help="folder of real runs named real-MODEL-CASE (from gpu_replays.sh)")
    parser.add_argument("--kind", default="composed", choices=["composed", "calibrated"])
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--profile", default=None, help="a cost model JSON instead of --kind's")
    parser.add_argument("--duration", default="40", help="seconds of arrivals, as replayed")
    parser.add_argument("--work", default="/tmp/twinfer-composed-validation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.print_load:
        print(" ".join(load_options(*args.print_load)))
        return

    from analysis.compare import compare_runs
    from analysis.run_store import read_run
    from fidelity import missed_targets
    from simulator.profile_library import step_predictor_of
    from twinfer.cli import main as twinfer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for real_path in sorted(Path(args.runs).glob("real-*")):
        # real-MODEL-CASE, or real-MODEL-CASE-VARIANT for the same load under other engine options
        model, case = next((m, c) for (m, c) in LOADS if real_path.name.startswith(f"real-{m}-{c}"))
        label = real_path.name.removeprefix("real-")
        real = read_run(real_path)
        sim_path = work / f"sim-{args.kind}-{label}"
        engine = real.metadata["engine_config"]
        command = ["simulate", *load_options(model, case), "--duration", args.duration, "--model", model,
                   "--gpu", args.gpu, "--num-gpu-blocks-override", str(real.metadata["num_kv_blocks"]),
                   "--max-num-seqs", str(engine["max_num_seqs"]), "--max-model-len", str(engine["max_model_len"]),
                   "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]),
                   "--out", str(sim_path), "--overwrite", "--no-progress"]
        if args.profile:
            command += ["--profile", args.profile]
        elif args.kind == "composed":
            command += ["--cost-model", "composed"]
        command.append("--mixed-cuda-graphs" if real.metadata.get("mixed_cuda_graphs") else "--no-mixed-cuda-graphs")
        command.append("--async-scheduling" if engine.get("async_scheduling") else "--no-async-scheduling")
        with contextlib.redirect_stdout(io.StringIO()):
            status = twinfer(command)
        if status:
            raise SystemExit(f"simulate failed for {real_path.name}: {' '.join(command)}")
        simulated = read_run(sim_path)
        comparison = compare_runs(real, simulated, step_predictor=step_predictor_of(simulated))
        print(f"\n##### {label} ({args.kind})")
        print(comparison.format())
        results[label] = comparison.to_dict()
        misses = missed_targets(results[label])
        print("targets: " + ("all met" if not misses else "missed " + "; ".join(misses)))
    print()
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def markdown_table(results: dict) -> str:
    """BENCHMARKS.md's table: per case the cost model's step MAPE on the real run's batches, latency errors (%),
    throughput error."""
    lines = ["| case | step MAPE | TTFT mean/p50/p99 % | TPOT mean/p50/p99 % | E2EL mean/p50/p99 % | throughput |",
             "|---|---|---|---|---|---|"]
    for label, comparison in results.items():
        errors = {(row["metric"], row["statistic"]): row["relative_error"] for row in comparison["metric_errors"]}

        def cells(metric: str) -> str:
            return "/".join(f"{100 * errors[(metric, stat)]:+.1f}" for stat in ("mean", "p50", "p99"))

        step = comparison["predicted_step_mape"]
        lines.append(f"| {label} | {'-' if step is None else f'{100 * step:.1f}%'} | {cells('ttft')} | "
                     f"{cells('tpot')} | {cells('e2el')} | {100 * errors[('output_throughput', '')]:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
