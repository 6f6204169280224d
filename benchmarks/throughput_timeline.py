"""Where the H200's time goes in nano-vLLM's workload (issue 19): the device's busy time beside the wall clock.

Runs the throughput workload (twinfer/throughput_benchmark.py) on the real engine, asynchronous scheduling as
LLM's default, and records every CUDA kernel under torch.profiler over windows of decode steps at several batch
sizes (the run's steps from the first decode-only one on). Per window: wall time per step, the union of kernel
intervals (busy), the idle time between them split into gaps inside a step's graph and the pauses between
steps, and the kernel time by class (GEMMs, decode attention, the rest). Idle time between steps is the host's
share; kernel time over the roofline's bytes is the kernels' share.

    python3 benchmarks/throughput_timeline.py [--model qwen3-0.6b] [--json OUT]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_gap import kernel_class  # noqa: E402
from twinfer.throughput_benchmark import make_workload  # noqa: E402

WINDOW_STEPS = 24
WINDOW_STARTS = (150, 450, 800)
"""Decode-step indexes (counted from the run's first step) where a profiled window opens."""


def summarize(kernels: list[tuple[float, float, str]], wall: float, steps: int) -> dict:
    """A window's figures from its kernels (start us, end us, name), its wall seconds and its step count."""
    kernels.sort()
    busy, idle_gaps, last_end = 0.0, [], None
    start_of_union = None
    for start, end, _ in kernels:
        if last_end is None or start > last_end:
            if last_end is not None:
                idle_gaps.append(start - last_end)
            if start_of_union is not None:
                busy += last_end - start_of_union
            start_of_union, last_end = start, end
        else:
            last_end = max(last_end, end)
    if start_of_union is not None:
        busy += last_end - start_of_union
    classes = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for start, end, name in kernels:
        classes[kernel_class(name)] += end - start
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    long_gaps = [gap for gap in idle_gaps if gap > 20.0]
    return {
        "steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "kernels_per_step": len(kernels) / steps,
        "span_ms_per_step": span / 1e3 / steps, "busy_ms_per_step": busy / 1e3 / steps,
        "idle_ms_per_step": (span - busy) / 1e3 / steps,
        "idle_in_gaps_over_20us_ms_per_step": sum(long_gaps) / 1e3 / steps,
        "gaps_over_20us_per_step": len(long_gaps) / steps,
        "median_small_gap_us": statistics.median([g for g in idle_gaps if g <= 20.0] or [0.0]),
        **{f"{name}_ms_per_step": value / 1e3 / steps for name, value in classes.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    prompts, output_lens = make_workload(args.num_seqs)
    llm = LLM(args.model, dtype="bfloat16", max_model_len=4096, load_format="dummy",
              async_scheduling=args.async_scheduling)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    engine = llm.engine
    for prompt, output_len in zip(prompts, output_lens):
        engine.add_request(prompt_token_ids=prompt, sampling_params=SamplingParams(
            temperature=0.6, ignore_eos=True, max_tokens=output_len))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = len(engine.step_records)
    windows, state = [], {"profiler": None}
    started = time.perf_counter()

    def on_step(engine) -> None:
        index = len(engine.step_records) - first
        open_window = state["profiler"]
        if open_window is None and index in WINDOW_STARTS:
            prof = profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU])
            prof.start()
            state.update(profiler=prof, index=index, wall=time.perf_counter(),
                         running=len(engine.scheduler.running))
        elif open_window is not None and index - state["index"] >= WINDOW_STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - state["wall"]
            open_window.stop()
            kernels = [(e.time_range.start, e.time_range.end, e.name) for e in open_window.events()
                       if e.device_type.name == "CUDA"]
            records = engine.step_records[first + state["index"]:first + index]
            windows.append({"first_step": state["index"], "running": state["running"],
                            "decode_seqs": statistics.mean(r.num_decode_seqs for r in records),
                            "prefill_tokens": sum(r.num_prefill_tokens for r in records),
                            **summarize(kernels, wall, index - state["index"])})
            state["profiler"] = None

    engine.run(on_step=on_step)
    seconds = time.perf_counter() - started
    records = engine.step_records[first:]
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": args.model, "async_scheduling": args.async_scheduling,
              "steps": len(records), "seconds_with_profiled_windows": seconds, "windows": windows}
    llm.shutdown()
    print(f"{args.model} on {result['gpu']}, async {args.async_scheduling}: {len(records)} steps in {seconds:.2f} s "
          f"(windows profiled)")
    print(f"{'step':>5}{'seqs':>6}{'wall':>8}{'busy':>8}{'idle':>8}{'>20us':>8}{'gemm':>8}{'attn':>8}{'other':>8}"
          f"{'kern/st':>9}{'gap us':>8}  (ms per step)")
    for w in windows:
        print(f"{w['first_step']:>5}{w['decode_seqs']:>6.0f}{w['wall_ms_per_step']:>8.3f}{w['busy_ms_per_step']:>8.3f}"
              f"{w['idle_ms_per_step']:>8.3f}{w['idle_in_gaps_over_20us_ms_per_step']:>8.3f}"
              f"{w['gemm_ms_per_step']:>8.3f}{w['attention_ms_per_step']:>8.3f}{w['other_ms_per_step']:>8.3f}"
              f"{w['kernels_per_step']:>9.0f}{w['median_small_gap_us']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
