"""Options several subcommands share, and what they do with them: make the EngineArgs, read the trace, print
the summary."""

import argparse
import logging
import warnings
from pathlib import Path

from engine.engine_args import ATTENTION_BACKENDS, LOAD_FORMATS, EngineArgs

log = logging.getLogger("twinfer")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (vLLM's names and defaults)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--max-model-len", type=int, default=None, help="default: the model's, capped at 32768")
    group.add_argument("--max-num-seqs", type=int, default=None, help="default: as vLLM picks for the GPU")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: as vLLM picks for the GPU")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of equal prompt prefixes")
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts over steps, batched with decodes")
    group.add_argument("--num-gpu-blocks-override", type=int, default=None, help="force the KV block count")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                       help="schedule the next step while one runs (give the same choice to replay and simulate)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of GPU memory for weights, activations and the KV cache")
    group.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, help="GPUs each model is sharded over")
    group.add_argument("--dtype", default="auto", help="weights' dtype (auto: bfloat16, float32 on a CPU)")
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    group.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="also run steps with prompt chunks as CUDA graphs (default: on at TP 1 with CUDA graphs "
                            "and the triton backend)")
    group.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                       help="paged-attention kernels")
    group.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                       help="dummy: random weights of the model's shape (no download)")


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
    parser.add_argument("--format", default=None, help="trace format: azure, mooncake, burstgpt, length_table, native, "
                        "sharegpt, vllm-custom (default: detected from the columns)")
    parser.add_argument("--time-scale", type=float, default=None, help="multiply inter-arrival times by this")
    parser.add_argument("--request-rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    parser.add_argument("--max-requests", type=int, default=None, help="keep the first N requests")
    parser.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt tokens, sampling and arrival draws")
    parser.add_argument("--arrivals", default=None,
                        help="arrival process, for traces without timestamps (length tables, ShareGPT, vLLM custom) "
                        "or replacing a trace's: poisson:RATE, gamma:RATE:CV, constant:RATE, all-at-once")
    parser.add_argument("--tokenizer", default=None,
                        help="for ShareGPT and vLLM custom traces: the tokenizer (folder or cached Hub id) counting "
                        "their prompts' tokens (default: characters / 4)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    from twinfer.cli.result_flags import add_result_flags

    parser.add_argument("--out", required=True, help="run folder to write (checked, and locked against other runs, "
                        "before any work)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    add_goodput_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_result_flags(parser)


def check_output_flags(args: argparse.Namespace) -> None:
    """The goodput SLOs and result-JSON flags parsed before a run starts: a typo fails at once."""
    from analysis.summary import parse_goodput
    from twinfer.cli.result_flags import check_result_flags

    if args.goodput:
        parse_goodput(args.goodput)
    check_result_flags(args)


def add_goodput_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                        help="goodput SLOs as vLLM's, in ms: e.g. ttft:500 tpot:50 e2el:5000")


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
        tokenizer=getattr(args, "tokenizer", None),
    )
    # A reader both warns of what it fixed and keeps it in the trace's notes: each is said once, here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = load_with_options(args.trace, options)
    warned = [str(warning.message) for warning in caught]
    for note in trace.notes:
        said = [text for text in warned if text.endswith(note)]
        (log.warning if said else log.info)(f"trace {trace.name}: {note}")
        warned = [text for text in warned if text not in said]
    for text in warned:
        log.warning(text)
    return trace


def print_run_summary(result, args: argparse.Namespace) -> None:
    """Print a replay's metrics (computed from what it wrote, not read back) in vLLM's layout (the selected metrics
    and percentiles), and save vLLM's result JSON when asked."""
    from analysis.summary import parse_goodput
    from twinfer.result_json import parse_metric_percentiles, parse_percentile_metrics

    _print_summary(result.metrics, result.metadata, result.path, args, parse_metric_percentiles(args.metric_percentiles),
                   parse_percentile_metrics(args.percentile_metrics),
                   parse_goodput(args.goodput) if args.goodput else None)


def summarize(run_path, args: argparse.Namespace) -> None:
    """Print a run's metrics in vLLM's layout (the selected metrics and percentiles), and save vLLM's result JSON
    when asked. The token times are read a batch at a time: a simulated week's run is summarized in flat memory."""
    from analysis.metrics import compute_metrics_of_file
    from analysis.run_store import REQUESTS_FILE, read_run_metadata
    from analysis.summary import parse_goodput
    from twinfer.result_json import parse_metric_percentiles, parse_percentile_metrics

    percentiles = parse_metric_percentiles(args.metric_percentiles)
    shown = parse_percentile_metrics(args.percentile_metrics)
    goodput = parse_goodput(args.goodput) if args.goodput else None
    metadata = read_run_metadata(run_path)
    metrics = compute_metrics_of_file(Path(run_path) / REQUESTS_FILE, goodput, percentiles)
    _print_summary(metrics, metadata, run_path, args, percentiles, shown, goodput)


def _print_summary(metrics, meta: dict, run_path, args, percentiles, shown, goodput) -> None:
    from analysis.run_store import read_run
    from analysis.summary import print_summary
    from twinfer.cli.result_flags import save_result, wants_result

    if not meta.get("complete", True):
        stopped = f" (stopped by {meta['stopped_by']})" if meta.get("stopped_by") else ""
        log.warning(f"{run_path} is an interrupted run: {metrics.completed} of {metrics.num_requests} requests "
                    f"finished; the rest are counted as failed{stopped}")
    if meta.get("replicas", 1) > 1:
        print(f"{meta['replicas']} replicas behind {meta['router']}: requests per replica "
              f"{meta['requests_per_replica']}, prefix-cache hit rate {meta['prefix_cache_hit_rate']:.1%}")
        if meta.get("prefix_affinity"):
            print(f"prefix affinity: {meta['prefix_affinity']['home']} requests sent home, "
                  f"{meta['prefix_affinity']['fallback']} to the least-loaded replica because home was overloaded")
    print_summary(metrics, percentiles, shown)
    if wants_result(args):  # the result JSON's per-request fields need the run's tables
        print(f"result JSON: {save_result(args, read_run(run_path), goodput)}")
