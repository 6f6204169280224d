"""Where composed decode steps come out short (issue 15): a model's real decode step beside its composition, by
operator class.

The held-out replays put Qwen3-8B's decode steps 2% (R <= 8 sequences) to 4.7% (R 32-48) under the real ones.
For decode batches of R sequences at the replays' mean context, uniform and spread as a serving batch's are
(same mean), this times the engine's own step (model runner, CUDA graph, as a replay runs it), sums the step's
GPU kernel time by class under torch.profiler (GEMMs, attention, the rest) in graph and eager mode, and sets
each beside the composed cost model's terms for the same batch features.

    python3 benchmarks/decode_gap.py --model qwen3-8b --mode graph|eager [--json OUT]

(one mode per process: a second LLM in the same process would find the first one's memory still held)
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_breakdown import _batch  # noqa: E402

BATCH_SIZES = (4, 16, 40, 64)
MEAN_CONTEXT = 1300
"""The Azure conversation replays' mean decode context (benchmarks/data/h200/composed/runs)."""


def contexts(num_seqs: int, spread: bool, rng: np.random.Generator) -> list[int]:
    """num_seqs contexts of mean MEAN_CONTEXT: all equal, or log-normal (sigma 0.8) as prompts plus outputs are."""
    if not spread:
        return [MEAN_CONTEXT] * num_seqs
    values = rng.lognormal(0.0, 0.8, num_seqs)
    values = np.clip(np.round(values / values.mean() * MEAN_CONTEXT), 16, 4000).astype(int)
    return values.tolist()


def kernel_class(name: str) -> str:
    lowered = name.lower()
    if "decode_partition" in lowered or "decode_reduce" in lowered or "attention" in lowered:
        return "attention"
    if any(key in lowered for key in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")):
        return "gemm"
    return "other"


def profile_classes(step, iters: int = 10) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step by class, and the busiest kernels."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    classes = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for event in prof.key_averages():
        if event.device_type.name != "CUDA" or not event.device_time_total:
            continue
        ms = event.device_time_total / iters / 1e3
        classes[kernel_class(event.key)] += ms
        kernels.append((event.key[:70], round(ms, 4), event.count // iters))
    classes["total"] = sum(classes.values())
    classes["top"] = sorted(kernels, key=lambda k: -k[1])[:6]
    return classes


def wall_ms(step, iters: int = 30) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def composed_classes(model: str, num_seqs: int, context_tokens: int, graph: int) -> dict[str, float]:
    from engine.stats import BatchFeatures
    from simulator.gpu_specs import gpu_key
    from simulator.profile_library import composed_model

    cost = composed_model(gpu_key(torch.cuda.get_device_name()), model)
    parts = cost.step_breakdown(BatchFeatures(0, 0, num_seqs, num_seqs, context_tokens, 0, 0, num_seqs), graph)
    gemm = sum(parts[name] for name in ("qkv", "o", "gate_up", "down", "lm_head"))
    host = parts["host"]
    total = sum(parts.values())
    return {"gemm": 1e3 * gemm, "attention": 1e3 * parts["attention"],
            "other": 1e3 * (total - gemm - parts["attention"] - host), "host": 1e3 * host, "total": 1e3 * total}


def measure(model: str, eager: bool, rng_seed: int = 0) -> list[dict]:
    from engine import LLM, SamplingParams

    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=32768, max_num_seqs=1024,
              max_num_batched_tokens=8192, enforce_eager=eager, gpu_memory_utilization=0.85)
    runner = llm.executor.runner
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    rng = np.random.default_rng(rng_seed)
    rows = []
    for num_seqs in BATCH_SIZES:
        for spread in (False, True):
            lens = contexts(num_seqs, spread, rng)
            batch = _batch(lens, [], params)
            _, graph = runner.execute(batch)
            row = {"mode": "eager" if eager else "graph", "num_seqs": num_seqs, "spread": spread,
                   "context_tokens": int(sum(lens)), "max_context": int(max(lens)), "graph_size": graph,
                   "step_ms": wall_ms(lambda: runner.execute(batch)),
                   "kernels": profile_classes(lambda: runner.execute(batch)),
                   "composed": composed_classes(model, num_seqs, int(sum(lens)), graph)}
            rows.append(row)
            print(f"R={num_seqs} spread={spread}: top kernels {row['kernels']['top'][:4]}", flush=True)
    llm.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--mode", choices=["graph", "eager"], default="graph")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args.model, eager=args.mode == "eager")
    print(f"\nGPU: {torch.cuda.get_device_name()}, {args.model}; ms per step; composed gpu = its total less host")
    print(f"{'mode':<6}{'R':>4}{'spread':>7}{'step':>8}{'kern':>8}{'comp gpu':>9}{'gemm r/c':>14}{'attn r/c':>14}"
          f"{'other r/c':>14}")
    for row in rows:
        kern, comp = row["kernels"], row["composed"]
        print(f"{row['mode']:<6}{row['num_seqs']:>4}{'yes' if row['spread'] else 'no':>7}{row['step_ms']:>8.3f}"
              f"{kern['total']:>8.3f}{comp['total'] - comp['host']:>9.3f}"
              f"{kern['gemm']:>7.3f}/{comp['gemm']:<6.3f}{kern['attention']:>7.3f}/{comp['attention']:<6.3f}"
              f"{kern['other']:>7.3f}/{comp['other']:<6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "model": args.model,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
