"""What the HTTP path costs: one trace slice replayed in-process (`twinfer replay --executor gpu`) and through
`twinfer bench serve` against `twinfer serve`, on one GPU, per model (dummy weights, the same engine options,
asynchronous scheduling in both). Prints throughput as a ratio to in-process and the TTFT/TPOT p50 overheads
(targets: throughput within 5%, TTFT overhead under 2 ms at p50); writes $OUT/serve_overhead.json and packs
the run folders (in-process, client, and the server's own request log) into $OUT/serve-runs.tgz.

On the GPU machine (no fastapi, uvicorn, starlette or pydantic there), from the repository root, with the
wheels of .whl/ carried along:

    python3 benchmarks/serve_overhead.py [--models qwen3-0.6b,qwen3-8b] [--duration 40]

(`--executor cpu --models FOLDER --trace T --time-scale S` checks the script itself on a CPU.)
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE = "gpu_data/azure_conv_rows3000_5500.csv"
TIME_SCALES = {"qwen3-0.6b": 0.2, "qwen3-8b": 0.5}
"""benchmarks/composed_validation.py LOADS' azure-conv loads."""
ENGINE_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--async-scheduling"]
SITE = Path("/tmp/site")


def install_wheels() -> dict:
    """Install .whl/*.whl into /tmp/site (when present) and return the environment the commands run in."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        env["PYTHONPATH"] = f"{SITE}:{REPO}"
        sys.path[:0] = [str(SITE), str(REPO)]
    else:
        env["PYTHONPATH"] = str(REPO)
        sys.path.insert(0, str(REPO))
    return env


def run(command: list[str], env: dict, timeout: float) -> None:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    keep = ("Successful", "Failed", "Benchmark duration", "Output token throughput", "Median TTFT", "Median TPOT",
            "run written", "Error", "error")
    print("\n".join(line for line in (result.stdout + result.stderr).splitlines() if line.startswith(keep) or
                    "Error" in line), flush=True)
    if result.returncode:
        print(result.stderr[-4000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}")


def trace_flags(args, model: str) -> list[str]:
    time_scale = args.time_scale if args.time_scale is not None else TIME_SCALES[model]
    return [args.trace, "--time-scale", str(time_scale), "--duration", str(args.duration)]


def serve_and_bench(args, model: str, name: str, runs: Path, env: dict) -> None:
    """Start `twinfer serve` on a free port, replay the slice through `bench serve`, stop the server (SIGINT:
    it writes its request log)."""
    device = ["--device", "cpu"] if args.executor == "cpu" else []
    server = subprocess.Popen(
        [sys.executable, "-m", "twinfer", "serve", model, *ENGINE_FLAGS, *device, "--port", "0",
         "--served-model-name", name, "--request-log", str(runs / f"server-{name}")],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base_url = None
        for line in server.stdout:
            print("  serve:", line.rstrip(), flush=True)
            if " on http://" in line:
                base_url = line.split(" on ", 1)[1].split("/v1", 1)[0]
                break
        if base_url is None:
            raise SystemExit(f"twinfer serve {model} exited ({server.wait()}) before listening")
        # Keep reading what the server prints, so a full pipe never blocks it.
        threading.Thread(target=lambda: [print("  serve:", line.rstrip(), flush=True) for line in server.stdout],
                         daemon=True).start()
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{base_url}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        run([sys.executable, "-m", "twinfer", "bench", "serve", *trace_flags(args, model), "--base-url", base_url,
             "--model", name, "--tokenizer", model, "--no-progress", "--out", str(runs / f"http-{name}")], env,
            timeout=args.duration + 240)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


def summary(runs: Path, model: str) -> dict:
    from analysis.metrics import compute_metrics
    from analysis.run_store import read_run

    measured = {}
    for kind in ("inproc", "http", "server"):
        metrics = compute_metrics(read_run(runs / f"{kind}-{model}"))
        measured[kind] = {"completed": metrics.completed, "failed": metrics.failed,
                          "output_throughput": metrics.output_throughput,
                          "ttft_p50_ms": metrics.ttft.median * 1000, "tpot_p50_ms": metrics.tpot.median * 1000,
                          "ttft_mean_ms": metrics.ttft.mean * 1000, "tpot_mean_ms": metrics.tpot.mean * 1000}
    inproc, http = measured["inproc"], measured["http"]
    measured["throughput_ratio"] = http["output_throughput"] / inproc["output_throughput"]
    measured["ttft_p50_overhead_ms"] = http["ttft_p50_ms"] - inproc["ttft_p50_ms"]
    measured["tpot_p50_overhead_ms"] = http["tpot_p50_ms"] - inproc["tpot_p50_ms"]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of the slice's arrivals")
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--time-scale", type=float, default=None, help="default: the model's in TIME_SCALES")
    parser.add_argument("--executor", choices=["gpu", "cpu"], default="gpu", help="cpu: a check of this script")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    env = install_wheels()
    runs = REPO / "runs" / "serve-overhead"
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        name = Path(model).name
        print(f"=== {name} ({time.strftime('%T')})", flush=True)
        run([sys.executable, "-m", "twinfer", "replay", *trace_flags(args, model), "--executor", args.executor,
             "--model", model, *ENGINE_FLAGS, "--no-progress", "--out", str(runs / f"inproc-{name}")], env,
            timeout=args.duration + 240)
        serve_and_bench(args, model, name, runs, env)
        results[name] = summary(runs, name)
    print(f"\n{'model':<12} {'req ok (in/http)':>17} {'tput ratio':>10} {'TTFT p50 in/http ms':>20} "
          f"{'+ms':>6} {'TPOT p50 in/http ms':>20} {'+ms':>6}")
    for model, result in results.items():
        inproc, http = result["inproc"], result["http"]
        print(f"{model:<12} {inproc['completed']:>8}/{http['completed']:<8} {result['throughput_ratio']:>10.3f} "
              f"{inproc['ttft_p50_ms']:>9.2f}/{http['ttft_p50_ms']:<10.2f} {result['ttft_p50_overhead_ms']:>6.2f} "
              f"{inproc['tpot_p50_ms']:>9.2f}/{http['tpot_p50_ms']:<10.2f} {result['tpot_p50_overhead_ms']:>6.2f}")
        print(f"{'':<12} server's own log: TTFT p50 {result['server']['ttft_p50_ms']:.2f} ms, TPOT p50 "
              f"{result['server']['tpot_p50_ms']:.2f} ms")
    (out / "serve_overhead.json").write_text(json.dumps(results, indent=2))
    with tarfile.open(out / "serve-runs.tgz", "w:gz") as archive:
        archive.add(runs, arcname="runs-serve")
    print(f"=== done ({time.strftime('%T')})")


if __name__ == "__main__":
    main()
