"""Where one engine step's time goes on a GPU: host phases, GPU kernel time and the busiest ops.

For three batch shapes of the Qwen3-0.6B shape (dummy weights) it times the model runner's phases
(input preparation, forward, sampling, the device sync) and, under torch.profiler, sums the GPU kernel
time of the step: wall minus kernel time is what the host adds.

    python benchmarks/step_breakdown.py --out breakdown.json
"""

import argparse
import json
import time

import torch


def _batch(contexts: list[int], prefill_lens: list[int], params):
    """A one-token row at each of these contexts, then the prompt chunks."""
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    blocks_per_seq = -(-max([c + 1 for c in contexts] + [n + 1 for n in prefill_lens]) // 16)
    seqs = []
    for index, ctx in enumerate(contexts):
        table = list(range(index * blocks_per_seq, (index + 1) * blocks_per_seq))
        seqs.append(ScheduledSequence(index, [5], ctx - 1, table, True, True, 10, params))
    for offset, length in enumerate(prefill_lens):
        index = len(contexts) + offset
        table = list(range(index * blocks_per_seq, (index + 1) * blocks_per_seq))
        seqs.append(ScheduledSequence(index, [7] * length, 0, table, False, True, 0, params))
    return SchedulerOutput(0, seqs)


def _time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _profile(fn, iters: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_us = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / iters
    top_gpu = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:8]
    top_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "gpu_kernel_ms": kernel_us / 1e3,
        "top_gpu": [(e.key[:60], round(e.device_time_total / iters / 1e3, 3), e.count // iters) for e in top_gpu],
        "top_cpu_self": [(e.key[:60], round(e.self_cpu_time_total / iters / 1e3, 3), e.count // iters)
                         for e in top_cpu],
    }


def run(out: str | None, python_profile: bool = False, mixed_cuda_graphs: bool | None = None,
        max_num_seqs: int = 256, max_model_len: int = 4096) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM("qwen3-0.6b", dtype="bfloat16", max_model_len=max_model_len, max_num_seqs=max_num_seqs,
              mixed_cuda_graphs=mixed_cuda_graphs)
    runner = llm.executor.runner
    params = SamplingParams(temperature=0.6, max_tokens=100, ignore_eos=True)
    shapes = {
        "decode 256 x ctx 1000 (graph)": _batch([1000] * 256, [], params),
        "decode 64 x ctx 1000 (graph)": _batch([1000] * 64, [], params),
        "mixed 150 decodes ctx 1000 + 256-token prefill": _batch([1000] * 150, [256], params),
        "mixed 16 decodes ctx 500 + 64-token prefill": _batch([500] * 16, [64], params),
        "mixed 55 decodes ctx 1300 + 1091-token prefill": _batch([1300] * 55, [1091], params),  # Azure conv's median
        "prefill 4 x 512": _batch([], [512] * 4, params),
        "prefill 4 x 2048": _batch([], [2048] * 4, params),
    }
    if max_model_len > 16384:
        # Mooncake-like: a few long conversations decoding beside a prompt chunk.
        shapes["mixed 14 decodes ctx 16000 + 512-token prefill"] = _batch([16000] * 14, [512], params)
        # Azure-like: one long conversation among short ones; a step's cost should follow the summed context.
        shapes["mixed 1 x ctx 12000 + 49 x ctx 800 + 512 prefill"] = _batch([12000] + [800] * 49, [512], params)
    results = {"gpu": torch.cuda.get_device_name(), "max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
               "mixed_cuda_graphs": llm.executor.mixed_cuda_graphs}
    for name, batch in shapes.items():
        entry = {"execute_ms": 1e3 * _time(lambda: runner.execute(batch))}
        entry["prepare_ms"] = 1e3 * _time(lambda: runner.prepare(batch))
        entry.update(_profile(lambda: runner.execute(batch)))
        results[name] = entry
    if python_profile:
        import cProfile
        import io
        import pstats

        batch = shapes["mixed 16 decodes ctx 500 + 64-token prefill"]
        runner.execute(batch)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            runner.execute(batch)
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        results["python_profile_mixed"] = text.getvalue()
    print(f"GPU: {results['gpu']}")
    print(f"{'batch':<50}{'step ms':>9}{'kernels ms':>12}{'prepare ms':>12}")
    for name in shapes:
        entry = results[name]
        print(f"{name:<50}{entry['execute_ms']:>9.2f}{entry['gpu_kernel_ms']:>12.2f}{entry['prepare_ms']:>12.3f}")
    if out:
        with open(out, "w") as handle:
            json.dump(results, handle, indent=1)
    llm.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--python-profile", action="store_true", help="also cProfile a mixed step (host code; a graph replay unless --no-mixed-cuda-graphs)")
    parser.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="steps with prompt chunks as CUDA graphs (default: the LLM class's, on at TP 1)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="256: the throughput workload's; 1024: replay's")
    parser.add_argument("--max-model-len", type=int, default=4096, help="4096: the throughput workload's; replay: 32768")
    args = parser.parse_args()
    run(args.out, args.python_profile, args.mixed_cuda_graphs, args.max_num_seqs, args.max_model_len)


if __name__ == "__main__":
    main()
