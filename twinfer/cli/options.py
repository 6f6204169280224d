"""Options several subcommands share, and what they do with them: make the EngineArgs, read the trace, print
the summary."""

import argparse
from pathlib import Path

from engine.engine_args import ATTENTION_BACKENDS, LOAD_FORMATS, EngineArgs


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (vLLM's names and defaults)")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-model-len", type=int, default=None, help="default: the model's, capped at 32768")
    group.add_argument("--max-num-seqs", type=int, default=None, help="default: as vLLM picks for the GPU")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: as vLLM picks for the GPU")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--num-gpu-blocks-override", type=int, default=None, help="force the KV block count")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                       help="schedule the next step while one runs (give the same choice to replay and simulate)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    group.add_argument("--dtype", default="auto")
    group.add_argument("--enforce-eager", action="store_true")
    group.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="also run steps with prompt chunks as CUDA graphs (default: on at TP 1 with CUDA graphs "
                            "and the triton backend)")
    group.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    group.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)


def engine_args_from(args: argparse.Namespace, *, device: str | None = None) -> EngineArgs:
    """The EngineArgs of --model, --seed and the engine options: the one place flags become engine settings.

    Where the CLI's default differs from EngineArgs' it is the flag's: --no-async-scheduling (LLM's is on at
    TP 1), so that replay and simulate make the same choice unless told.
    """
    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        seed=args.seed,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        load_format=args.load_format,
        attention_backend=args.attention_backend,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
        device=device,
    )


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a trace file, or a bundled sample: azure-conv, mooncake-conv, demo")
    parser.add_argument("--format", default=None, help="trace format (default: detected from the columns)")
    parser.add_argument("--time-scale", type=float, default=None, help="multiply inter-arrival times by this")
    parser.add_argument("--request-rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    parser.add_argument("--max-requests", type=int, default=None, help="keep the first N requests")
    parser.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arrivals", default=None, help="arrival process for length tables, e.g. poisson:2.0")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder to write (checked, and locked against other runs, "
                        "before any work)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="SLO", help="e.g. ttft:500 tpot:50 e2el:5000")
    parser.add_argument("--save-result", default=None, help="write vLLM-style result JSON here")
    parser.add_argument("--no-progress", action="store_true")


def load_trace(args: argparse.Namespace):
    """Read the trace named on the command line with its trace flags applied, printing what they did."""
    from traces.trace_options import TraceOptions, load_trace as load_with_options

    options = TraceOptions(
        format=args.format,
        max_requests=getattr(args, "max_requests", None),
        arrivals=getattr(args, "arrivals", None),
        time_scale=getattr(args, "time_scale", None),
        request_rate=getattr(args, "request_rate", None),
        duration=getattr(args, "duration", None),
        max_prompt_len=getattr(args, "max_prompt_len", None),
        max_output_len=getattr(args, "max_output_len", None),
        seed=getattr(args, "seed", 0),
    )
    trace = load_with_options(args.trace, options)
    for note in trace.notes:
        print(f"trace {trace.name}: {note}")
    return trace


def summarize(run_path, goodput, save_result, percentiles=None) -> None:
    """Print a run's metrics in vLLM's layout, and save them as vLLM-style JSON when asked."""
    from analysis.metrics import compute_metrics_of_file
    from analysis.run_store import REQUESTS_FILE, read_run_metadata
    from analysis.summary import DEFAULT_PERCENTILES, parse_goodput

    percentiles = percentiles or DEFAULT_PERCENTILES
    metadata = read_run_metadata(run_path)
    metrics = compute_metrics_of_file(Path(run_path) / REQUESTS_FILE, parse_goodput(goodput) if goodput else None,
                                      percentiles)
    print_metrics(metrics, metadata, run_path, save_result, percentiles)


def print_metrics(metrics, metadata: dict, run_path, save_result, percentiles=None) -> None:
    """Print metrics in vLLM's layout (with what the run's metadata adds), and save them as JSON when asked."""
    from analysis.summary import DEFAULT_PERCENTILES, print_summary, save_result_json

    percentiles = percentiles or DEFAULT_PERCENTILES
    if not metadata.get("complete", True):
        stopped = f" (stopped by {metadata['stopped_by']})" if metadata.get("stopped_by") else ""
        print(f"NOTE: {run_path} is an interrupted run: {metrics.completed} of {metrics.num_requests} requests "
              f"finished; the rest are counted as failed{stopped}")
    meta = metadata
    if meta.get("replicas", 1) > 1:
        print(f"{meta['replicas']} replicas behind {meta['router']}: requests per replica "
              f"{meta['requests_per_replica']}, prefix-cache hit rate {meta['prefix_cache_hit_rate']:.1%}")
        if meta.get("prefix_affinity"):
            print(f"prefix affinity: {meta['prefix_affinity']['home']} requests sent home, "
                  f"{meta['prefix_affinity']['fallback']} to the least-loaded replica because home was overloaded")
    print_summary(metrics, percentiles)
    if save_result:
        save_result_json(metrics, save_result, percentiles)
        print(f"result JSON: {save_result}")
