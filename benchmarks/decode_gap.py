"""Where composed decode steps come out short (issue 15): a model's real decode step beside its composition, by
operator class.

The held-out replays put Qwen3-8B's decode steps 2% (R <= 8 sequences) to 4.7% (R 32-48) under the real ones.
For decode batches of R sequences at the replays' mean context, uniform and spread as a serving batch's are
(same mean), this times the engine's own step (model runner, CUDA graph, as a replay runs it), sums the step's
GPU kernel time by class under torch.profiler (GEMMs, attention, the rest) in graph and eager mode, and sets
each beside the composed cost model's terms for the same batch features.

    python3 benchmarks/decode_gap.py --model qwen3-8b --mode graph|eager [--max-model-len N] [--json OUT]

In graph mode it also splits the step's time into the graph's kernel span (first kernel's start to the last one's
end) and what lies outside it, the span into kernels and gaps between them, and times the step's attention and
GEMM shapes again in isolation the way the operator profile does (simulator/attention_profile.py,
gemm_profile.py: in a CUDA graph of many calls, inputs rotated past the L2), at the step's exact shapes and its
block tables' width: in-step against isolated tells an operator that runs slower inside a step from a profile
grid that interpolates badly (isolated against the composed table value). The SM clock is read beside each.

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


def sm_clock_mhz() -> int | None:
    """The SM clock now (NVML through torch), or None where it cannot be read."""
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # noqa: BLE001 - pynvml missing or not permitted: the figure is optional
        return None


def kernel_span(events, iters: int) -> dict[str, float]:
    """Per step (kernels in launch order, split into iters equal runs): the graph's kernel span and the gaps in it, ms."""
    kernels = sorted((event.time_range.start, event.time_range.end) for event in events)
    per_step = len(kernels) // iters
    if per_step == 0:
        return {}
    spans, gaps = [], []
    for index in range(iters):
        run = kernels[index * per_step:(index + 1) * per_step]
        span = max(end for _, end in run) - run[0][0]
        spans.append(span)
        gaps.append(span - sum(end - start for start, end in run))
    return {"kernels_per_step": per_step, "span": statistics.median(spans) / 1e3, "gaps": statistics.median(gaps) / 1e3}


def profile_classes(step, iters: int = 10) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step by class, the busiest kernels, and the kernel span."""
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
    classes.update(kernel_span([event for event in prof.events() if event.device_type.name == "CUDA"], iters))
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


def composed_classes(gpu: str, model: str, num_seqs: int, context_tokens: int, graph: int,
                     max_model_len: int) -> dict[str, float]:
    """The composed step's ms by operator class, for the engine's max_model_len (its decode graphs' table width)."""
    from engine.stats import BatchFeatures
    from simulator.gpu_specs import gpu_key
    from simulator.profile_library import composed_model

    cost = composed_model(gpu_key(gpu), model, max_model_len=max_model_len)
    parts = cost.step_breakdown(BatchFeatures(0, 0, num_seqs, num_seqs, context_tokens, 0, 0, num_seqs), graph)
    gemm = sum(parts[name] for name in ("qkv", "o", "gate_up", "down", "lm_head"))
    host = parts["host"]
    total = sum(parts.values())
    return {"gemm": 1e3 * gemm, "attention": 1e3 * parts["attention"],
            "other": 1e3 * (total - gemm - parts["attention"] - host), "host": 1e3 * host, "total": 1e3 * total}


def isolated(model: str, max_model_len: int, graph_sizes: tuple[int, ...], device=None) -> dict:
    """The step's decode attention (tables max_model_len wide, every sequence at MEAN_CONTEXT) and its model's GEMMs
    (m = each graph size) timed as the operator profile times them: {("attention", R) or (n, k, m): seconds}."""
    from simulator.attention_profile import decode_attention_table
    from simulator.gemm_profile import gemm_table
    from simulator.operator_profile import profile_context
    from simulator.operator_shapes import BLOCK_SIZE, OperatorGrid, dims_of
    from simulator.operator_timing import TableRun

    dims = dims_of(model)
    width = -(-max_model_len // BLOCK_SIZE) * BLOCK_SIZE
    grid = OperatorGrid(models=(dims,), tp_candidates=(1,), gemm_m=graph_sizes, decode_seqs=BATCH_SIZES,
                        decode_contexts=(MEAN_CONTEXT,), decode_table_tokens=width, extra_attention_layouts=())
    context = profile_context(device or torch.device("cuda"), torch.bfloat16, grid)
    run = TableRun("isolated", time.perf_counter() + 120, context, print)
    decode_attention_table(run, context)
    gemm_table(run, context)
    times = {}
    for row in run.rows:
        if row["op"] == "decode_attention" and row["variant"] == "":
            times[("attention", row["num_seqs"])] = row["seconds"]
        elif row["op"] == "gemm":
            times[(row["n"], row["k"], row["m"])] = row["seconds"]
    return times


def isolated_step(times: dict, model: str, num_seqs: int, graph: int) -> dict[str, float]:
    """ms per step of the isolated timings: attention x layers, and the GEMMs (LM head at the graph's rows)."""
    from simulator.model_shape import ModelShape
    from simulator.operator_shapes import dims_of

    dims, layers = dims_of(model), ModelShape.load(model).num_layers
    gemm = 0.0
    for name, (n, k) in dims.linear_shapes(1).items():  # inside a decode graph every GEMM runs on its G rows
        gemm += times.get((n, k, graph), float("nan")) * (1 if name == "lm_head" else layers)
    return {"attention": 1e3 * layers * times.get(("attention", num_seqs), float("nan")), "gemm": 1e3 * gemm}


def measure(model: str, eager: bool, max_model_len: int, rng_seed: int = 0) -> list[dict]:
    from engine import LLM, SamplingParams

    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=1024,
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
                   "step_ms": wall_ms(lambda: runner.execute(batch)), "sm_clock_mhz": sm_clock_mhz(),
                   "kernels": profile_classes(lambda: runner.execute(batch)),
                   "composed": composed_classes(torch.cuda.get_device_name(), model, num_seqs, int(sum(lens)),
                                                graph, max_model_len)}
            rows.append(row)
            print(f"R={num_seqs} spread={spread}: top kernels {row['kernels']['top'][:4]}", flush=True)
    if not eager:
        times = isolated(model, max_model_len, tuple(sorted({row["graph_size"] for row in rows})))
        clock = sm_clock_mhz()
        for row in rows:
            row["isolated"] = {**isolated_step(times, model, row["num_seqs"], row["graph_size"]),
                               "sm_clock_mhz": clock}
    llm.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--mode", choices=["graph", "eager"], default="graph")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's, at most 32768 (as the held-out replays ran)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from engine.model_config import load_model_config

    max_model_len = args.max_model_len or min(32768, load_model_config(args.model).max_position_embeddings)
    rows = measure(args.model, eager=args.mode == "eager", max_model_len=max_model_len)
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
