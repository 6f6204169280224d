"""What the HTTP path costs: one trace slice replayed in-process (`twinfer replay --executor gpu`) and through
`twinfer bench serve` against `twinfer serve`, on one GPU, per model (dummy weights, the same engine options,
asynchronous scheduling in both). Prints throughput as a ratio to in-process and the TTFT/TPOT p50 overheads
(targets: throughput within 5%, TTFT overhead under 2 ms at p50); writes $OUT/serve_overhead.json and packs
the run folders (in-process, client, and the server's own request log) into $OUT/serve-runs.tgz.

On the GPU machine (no fastapi, uvicorn, starlette or pydantic there), from the repository root, with the
wheels of .whl/ carried along:

    python3 benchmarks/serve_overhead.py [--models qwen3-0.6b,qwen3-8b] [--duration 40]
                                         [--variants uvloop-0.5,uvloop-0.5-w4,uvloop-0.5-thread]

Each variant runs server and client on an event loop (uvloop, or asyncio's own) with the interpreter's switch
interval in ms (how soon a thread waiting for the GIL gets it: the server's event loop shares the interpreter
with the engine's thread; twinfer serve lowers it to 0.5 ms), and the engine in a process of its own (twinfer
serve's default) or, with "-thread", on a thread of the server's process (--no-engine-process); "-wN" sends the
trace from N client processes (bench serve --num-workers N), e.g. uvloop-0.5-w4. Both sides state their clock's
origin, so each request's overhead splits into the way in (client sends -> engine has it) and the way out (the
engine's first token -> client reads it).

(`--executor cpu --models FOLDER --trace T --time-scale S` checks the script itself on a CPU.)
"""

import argparse
import json
import os
import shutil
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


def install_wheels(executor: str) -> dict:
    """Install .whl/*.whl (the GPU machine's Python's) into /tmp/site for a GPU run, and return the environment
    the commands run in."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    wheels = sorted((REPO / ".whl").glob("*.whl")) if executor == "gpu" else []
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


VARIANT_MAIN = """import sys
loop, interval_ms = sys.argv.pop(1), float(sys.argv.pop(1))
if loop == "asyncio":
    sys.modules["uvloop"] = None  # uvicorn and bench serve then take asyncio's loop
sys.setswitchinterval(interval_ms / 1000)
from twinfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def variant_parts(variant: str) -> tuple[str, str, bool, int]:
    """LOOP-MS[-thread][-wN]: (event loop, switch interval in ms, the engine on a thread, client workers)."""
    loop, interval_ms, *rest = variant.split("-")
    thread, num_workers = False, 1
    for part in rest:
        if part == "thread":
            thread = True
        elif part.startswith("w") and part[1:].isdigit() and int(part[1:]) >= 1:
            num_workers = int(part[1:])
        else:
            raise SystemExit(f"variant {variant!r}: {part!r} is neither 'thread' nor 'wN' (N client workers)")
    return loop, interval_ms, thread, num_workers


def twinfer_command(variant: str) -> list[str]:
    """`python -m twinfer` on a variant's event loop and switch interval ("uvloop-0.5": uvloop, 0.5 ms)."""
    loop, interval_ms, _, _ = variant_parts(variant)
    if loop not in ("uvloop", "asyncio"):
        raise SystemExit(f"variant {variant!r}: the loop must be uvloop or asyncio")
    return [sys.executable, "-c", VARIANT_MAIN, loop, interval_ms]


def serve_and_bench(args, model: str, name: str, variant: str, runs: Path, env: dict) -> None:
    """Start `twinfer serve` on a free port, replay the slice through `bench serve`, stop the server (SIGINT:
    it writes its request log)."""
    device = ["--device", "cpu"] if args.executor == "cpu" else []
    _, _, thread, num_workers = variant_parts(variant)
    server = subprocess.Popen(
        [*twinfer_command(variant), "serve", model, *ENGINE_FLAGS, *device, "--port", "0",
         *(["--no-engine-process"] if thread else []),
         "--served-model-name", name, "--request-log", str(runs / f"server-{name}-{variant}")],
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
        run([*twinfer_command(variant), "bench", "serve", *trace_flags(args, model), "--base-url", base_url,
             "--model", name, "--tokenizer", model, "--num-workers", str(num_workers), "--no-progress",
             "--out", str(runs / f"http-{name}-{variant}")], env,
            timeout=args.duration + 240)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


def _metrics(path: Path) -> dict:
    from analysis.metrics import compute_metrics
    from analysis.run_store import read_run

    metrics = compute_metrics(read_run(path))
    return {"completed": metrics.completed, "failed": metrics.failed, "output_throughput": metrics.output_throughput,
            "ttft_p50_ms": metrics.ttft.median * 1000, "tpot_p50_ms": metrics.tpot.median * 1000,
            "ttft_mean_ms": metrics.ttft.mean * 1000, "tpot_mean_ms": metrics.tpot.mean * 1000}


def split(http: Path, server: Path, inproc: Path | None = None) -> dict:
    """Per request, on the machine's one clock: the way in (client sends -> the engine has it) and the way out (the
    engine's first token -> the client reads it), p50 and p90 in ms; with the in-process run, also how late the
    client sent (its send time less the trace's arrival, which its TTFT counts) and the server's TTFT less the
    same request's in-process TTFT (the engine's share: the step it joined). Each client request is paired with the
    server's request of the same prompt and output length arriving nearest in time."""
    import numpy as np
    import pandas as pd

    from analysis.run_store import read_run

    client, served = read_run(http), read_run(server)
    origins = client.metadata.get("clock_origin"), served.metadata.get("clock_origin")
    if None in origins:
        return {}
    keys = ["prompt_len", "max_tokens"]
    sent = client.requests.to_pandas()[keys + ["request_id", "arrival_time", "first_scheduled_time",
                                               "first_token_time"]].rename(columns={"arrival_time": "trace_time"})
    got = served.requests.to_pandas()[keys + ["arrival_time", "first_token_time"]]
    got = got.assign(time=got["arrival_time"] + origins[1] - origins[0])  # on the client's clock
    sent = sent.assign(time=sent["first_scheduled_time"])
    paired = pd.merge_asof(sent.sort_values("time"), got.sort_values("time"), on="time", by=keys,
                           direction="nearest", suffixes=("_client", "_server"))
    if paired["arrival_time"].isna().any() or paired["arrival_time"].duplicated().any():
        return {"error": "the client's and the server's requests do not pair up"}
    way_in = (paired["arrival_time"] + origins[1] - origins[0] - paired["first_scheduled_time"]).to_numpy()
    way_out = (paired["first_token_time_client"] - (paired["first_token_time_server"] + origins[1] - origins[0]))

    def stats(values) -> dict:
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)] * 1000
        return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90))}

    parts = {"way_in": stats(way_in), "way_out": stats(way_out)}
    if inproc is not None:
        alone = read_run(inproc).requests.to_pandas().set_index("request_id")["ttft"]
        server_ttft = paired["first_token_time_server"] - paired["arrival_time"]
        parts["late"] = stats(paired["first_scheduled_time"] - paired["trace_time"])
        parts["server_less_inproc"] = stats(server_ttft.to_numpy() - alone.reindex(paired["request_id"]).to_numpy())
    return parts


def summary(runs: Path, model: str, variants: list[str]) -> dict:
    measured = {"inproc": _metrics(runs / f"inproc-{model}")}
    inproc = measured["inproc"]
    for variant in variants:
        http, server = runs / f"http-{model}-{variant}", runs / f"server-{model}-{variant}"
        result = {"http": _metrics(http), "server": _metrics(server), "split": split(http, server, runs / f"inproc-{model}")}
        result["throughput_ratio"] = result["http"]["output_throughput"] / inproc["output_throughput"]
        result["ttft_p50_overhead_ms"] = result["http"]["ttft_p50_ms"] - inproc["ttft_p50_ms"]
        result["tpot_p50_overhead_ms"] = result["http"]["tpot_p50_ms"] - inproc["tpot_p50_ms"]
        measured[variant] = result
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of the slice's arrivals")
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--time-scale", type=float, default=None, help="default: the model's in TIME_SCALES")
    parser.add_argument("--executor", choices=["gpu", "cpu"], default="gpu", help="cpu: a check of this script")
    parser.add_argument("--variants", default="uvloop-0.5,uvloop-0.5-thread",
                        help="comma-separated LOOP-MS[-thread][-wN]: event loop (uvloop or asyncio), switch "
                             "interval in ms, the engine on a thread of the server (else its own process), N client "
                             "processes (bench serve --num-workers; default 1); each a server and client of its own")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    env = install_wheels(args.executor)
    runs = REPO / "runs" / "serve-overhead"
    shutil.rmtree(runs, ignore_errors=True)  # this script's own scratch: the last call's runs are in its $OUT
    runs.mkdir(parents=True)
    results = {}
    for model in args.models.split(","):
        name = Path(model).name
        print(f"=== {name} ({time.strftime('%T')})", flush=True)
        run([sys.executable, "-m", "twinfer", "replay", *trace_flags(args, model), "--executor", args.executor,
             "--model", model, *ENGINE_FLAGS, "--no-progress", "--out", str(runs / f"inproc-{name}")], env,
            timeout=args.duration + 240)
        variants = args.variants.split(",")
        for variant in variants:
            serve_and_bench(args, model, name, variant, runs, env)
        results[name] = summary(runs, name, variants)
    print(f"\n{'model':<12} {'variant':<15} {'req ok (in/http)':>17} {'tput ratio':>10} {'TTFT p50 in/http ms':>20} "
          f"{'+ms':>6} {'TPOT p50 in/http':>17} {'+ms':>6} {'in p50/p90':>11} {'out p50/p90':>11}")
    for model, result in results.items():
        inproc = result["inproc"]
        for variant, measured in result.items():
            if variant == "inproc":
                continue
            http, parts = measured["http"], measured["split"]
            way = {key: f"{parts[key]['p50_ms']:.2f}/{parts[key]['p90_ms']:.2f}" if key in parts else "-"
                   for key in ("way_in", "way_out")}
            print(f"{model:<12} {variant:<15} {inproc['completed']:>8}/{http['completed']:<8} "
                  f"{measured['throughput_ratio']:>10.3f} {inproc['ttft_p50_ms']:>9.2f}/{http['ttft_p50_ms']:<10.2f} "
                  f"{measured['ttft_p50_overhead_ms']:>6.2f} {inproc['tpot_p50_ms']:>8.2f}/{http['tpot_p50_ms']:<8.2f} "
                  f"{measured['tpot_p50_overhead_ms']:>6.2f} {way['way_in']:>11} {way['way_out']:>11}")
    (out / "serve_overhead.json").write_text(json.dumps(results, indent=2))
    with tarfile.open(out / "serve-runs.tgz", "w:gz") as archive:
        archive.add(runs, arcname="runs-serve")
    print(f"=== done ({time.strftime('%T')})")


if __name__ == "__main__":
    main()
