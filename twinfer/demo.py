"""`twinfer demo`: the whole loop on a CPU in a few minutes, with nothing to download.

1. Simulate the bundled Azure conversation slice on an H100 with the bundled Qwen3-0.6B profile.
2. Calibrate a CPU cost model for a tiny Qwen3 (dummy weights) from a CPU replay of a synthetic workload.
3. Replay the bundled shared-prefix demo trace on the CPU executor, and simulate the same trace with the
   CPU cost model and the same KV block count.
4. Compare real and simulated, and write one HTML report of all three runs.
"""

import time
from pathlib import Path

from twinfer.cli import main as twinfer

TINY_MODEL = "tiny-qwen3"
CPU_KV_BLOCKS = "512"


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def demo(out_dir: str | Path) -> int:
    """Run the demo into out_dir and print where everything is."""
    from analysis.run_store import read_run
    from traces.arrivals import parse_arrival_process
    from traces.native import write_trace
    from traces.synthetic import random_workload

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpu_engine = ["--model", TINY_MODEL, "--load-format", "dummy", "--num-gpu-blocks-override", CPU_KV_BLOCKS,
                  "--max-num-batched-tokens", "256", "--no-progress"]

    _step("1/4 simulate the bundled Azure conversation slice on an H100 (bundled Qwen3-0.6B profile)")
    h100_run = out / "sim-h100-azure-conv"
    status = twinfer(["simulate", "azure-conv", "--model", "qwen3-0.6b", "--gpu", "h100", "--out", str(h100_run),
                      "--no-progress"])
    if status:
        return status

    _step("2/4 calibrate a CPU cost model for the tiny model from a CPU replay of a synthetic workload")
    calibration_trace = out / "calibration-workload.parquet"
    write_trace(
        random_workload(num_prompts=40, input_len=96, output_len=12, range_ratio=0.9,
                        arrivals=parse_arrival_process("poisson:6"), seed=1),
        calibration_trace,
    )
    calibration_run = out / "cpu-calibration"
    status = twinfer(["replay", str(calibration_trace), "--executor", "cpu", *cpu_engine, "--out", str(calibration_run)])
    if status:
        return status
    profile = out / "cpu_tiny-qwen3_profile.json"
    status = twinfer(["calibrate", str(calibration_run), "--out", str(profile), "--gpu", "cpu", "--model", TINY_MODEL,
                      "--dtype", "float32"])
    if status:
        return status

    _step("3/4 replay the shared-prefix demo trace on the CPU, then simulate it with the CPU cost model")
    real_run = out / "cpu-demo"
    status = twinfer(["replay", "demo", "--executor", "cpu", *cpu_engine, "--out", str(real_run)])
    if status:
        return status
    sim_run = out / "sim-cpu-demo"
    status = twinfer(["simulate", "demo", "--model", TINY_MODEL, "--gpu", "cpu", "--profile", str(profile),
                      "--dtype", "float32", "--num-gpu-blocks-override", CPU_KV_BLOCKS,
                      "--max-num-batched-tokens", "256", "--out", str(sim_run), "--no-progress"])
    if status:
        return status

    _step("4/4 compare real and simulated, and write the report")
    status = twinfer(["compare", str(real_run), str(sim_run), "--json", str(out / "comparison.json")])
    if status:
        return status
    report = out / "report.html"
    status = twinfer(["report", str(real_run), str(sim_run), str(h100_run), "-o", str(report)])
    if status:
        return status

    hit_rate = read_run(real_run).metadata.get("prefix_cache_hit_rate", 0.0)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s (CPU prefix-cache hit rate {hit_rate:.0%})")
    print(f"  simulated H100 run:      {h100_run}")
    print(f"  CPU run and its twin:    {real_run}  {sim_run}")
    print(f"  CPU cost model:          {profile}")
    print(f"  comparison:              {out / 'comparison.json'}")
    print(f"  report (open in a browser): {report}")
    print("  (the CPU twin's errors show the loop, not the simulator's accuracy: millisecond steps on a shared CPU\n"
          "   vary by tens of percent from one run to the next; BENCHMARKS.md gives real-vs-simulated on GPUs)")
    return 0
