"""How much faster than real time the simulator replays a trace (issue 5 item 7: >= 1000x on 2 cores).

Default: the whole Azure LLM inference 2023 conversation trace (19,366 requests over ~58 minutes) on the
bundled Qwen3-0.6B H100 profile (the roofline if that profile is missing, said in the output), vLLM's
H100 limits. Also times predict() alone and checks fast-forwarded runs against stepping on a slice.

    python benchmarks/simulate_speed.py [--trace PATH] [--max-requests N] [--json OUT]
"""

import argparse
import json
import time
import warnings
from pathlib import Path

from engine.config import EngineConfig, vllm_default_limits
from engine.engine import Engine
from engine.graph_dispatch import GraphDispatch
from engine.stats import BatchFeatures
from simulator.executor import CostModelExecutor
from simulator.gpu_specs import gpu_spec
from simulator.kv_capacity import estimate_num_kv_blocks
from simulator.model_shape import ModelShape
from simulator.profile_library import cost_model_for
from traces.formats import read_trace
from simulator.trace_requests import add_trace_requests
from traces.transforms import slice_count

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def build_engine(gpu: str, model: str, *, profile: str | None = None, fast_forward: bool = True,
                 mixed_cuda_graphs: bool = True) -> Engine:
    """A simulated engine as `twinfer simulate` builds it: vLLM's limits for the GPU, KV sized from memory."""
    spec, shape = gpu_spec(gpu), ModelShape.load(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost_model = cost_model_for(gpu, model, profile_path=profile)
    max_num_seqs, max_num_batched_tokens = vllm_default_limits(spec.memory_gib)
    config = EngineConfig(
        max_model_len=32768,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        vocab_size=shape.vocab_size,
    )
    num_blocks = estimate_num_kv_blocks(
        spec, shape, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs
    )
    # As `twinfer simulate` at TP 1: steps with prompt chunks as (padded) CUDA graphs unless told otherwise.
    graphs = GraphDispatch.for_engine(max_num_seqs, max_num_batched_tokens, cuda_graphs=True, mixed=mixed_cuda_graphs)
    executor = CostModelExecutor(cost_model, num_blocks, graphs=graphs)
    return Engine(config, executor, fast_forward=fast_forward)


def time_predict(engine: Engine, repeats: int = 200_000) -> float:
    """Microseconds per predict() call on a typical mixed batch."""
    cost_model = engine.executor.cost_model
    features = BatchFeatures(1, 700, 120, 120, 120 * 900, 300, 700 * (300 + 350.5), 820)
    started = time.perf_counter()
    for _ in range(repeats):
        cost_model.predict(features, 0)
    return (time.perf_counter() - started) / repeats * 1e6


def simulate(trace, gpu: str, model: str, *, profile: str | None = None, fast_forward: bool = True,
             mixed_cuda_graphs: bool = True) -> dict:
    """Run the trace through a simulated engine; wall time and simulated time."""
    engine = build_engine(gpu, model, profile=profile, fast_forward=fast_forward, mixed_cuda_graphs=mixed_cuda_graphs)
    started = time.perf_counter()
    add_trace_requests(engine, trace, vocab_size=engine.config.vocab_size)
    added = time.perf_counter()
    engine.run()
    finished = time.perf_counter()
    records = engine.request_records.values()
    return {
        "engine": engine,
        "label": engine.executor.label,
        "requests": len(trace),
        "finished": sum(r.status == "finished" for r in records),
        "steps": len(engine.step_records),
        "simulated_seconds": engine.clock.now(),
        "add_seconds": added - started,
        "run_seconds": finished - added,
        "wall_seconds": finished - started,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--profile", default=None, help="cost model JSON (default: the bundled one for --gpu/--model)")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--check-requests", type=int, default=1000, help="slice checked against stepping one by one")
    parser.add_argument("--json", default=None)
    parser.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="steps with prompt chunks as CUDA graphs (simulate's default at TP 1)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    trace = read_trace(args.trace)
    read_seconds = time.perf_counter() - started
    if args.max_requests:
        trace = slice_count(trace, args.max_requests)
    trace_span = float(max(trace.table.column("arrival_time").to_pylist()))

    mixed = args.mixed_cuda_graphs
    result = simulate(trace, args.gpu, args.model, profile=args.profile, mixed_cuda_graphs=mixed)
    engine = result.pop("engine")
    predict_us = time_predict(engine)
    ratio = trace_span / result["wall_seconds"]
    simulated_ratio = result["simulated_seconds"] / result["wall_seconds"]

    check = slice_count(trace, min(args.check_requests, len(trace)))
    stepped = simulate(check, args.gpu, args.model, profile=args.profile, fast_forward=False,
                       mixed_cuda_graphs=mixed).pop("engine")
    skipped = simulate(check, args.gpu, args.model, profile=args.profile, fast_forward=True,
                       mixed_cuda_graphs=mixed).pop("engine")
    identical = list(stepped.step_records) == list(skipped.step_records) and all(
        stepped.request_records[key] == record for key, record in skipped.request_records.items()
    )

    report = {
        "mixed_cuda_graphs": mixed,
        **result,
        "trace": Path(args.trace).name,
        "trace_read_seconds": round(read_seconds, 3),
        "trace_span_seconds": round(trace_span, 1),
        "speedup_vs_trace_span": round(ratio, 1),
        "speedup_vs_simulated_time": round(simulated_ratio, 1),
        "steps_per_second": round(result["steps"] / result["run_seconds"]),
        "predict_us": round(predict_us, 3),
        "fast_forward_identical_on_first_requests": {"requests": len(check), "identical": identical},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
