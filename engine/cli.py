"""The `twinfer` command: replay, simulate, summary, compare, report, profile, plan, bench, demo."""

import argparse
import sys
from pathlib import Path


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "flash-attn", "torch"])
    group.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])


def _add_trace_options(parser: argparse.ArgumentParser) -> None:
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


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="SLO", help="e.g. ttft:500 tpot:50 e2el:5000")
    parser.add_argument("--save-result", default=None, help="write vLLM-style result JSON here")
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinfer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="replay a trace through an executor at its arrival times")
    _add_trace_options(replay)
    replay.add_argument("--executor", choices=["gpu", "cpu", "sim"], default="gpu")
    replay.add_argument("--model", required=True, help="HF model folder or preset name")
    replay.add_argument("--gpu", default="h100", help="for --executor sim: the GPU simulated")
    replay.add_argument("--profile", default=None, help="for --executor sim: a calibrated profile (JSON)")
    _add_engine_options(replay)
    _add_output_options(replay)

    simulate = commands.add_parser("simulate", help="replay a trace through the simulator (no GPU needed)")
    _add_trace_options(simulate)
    simulate.add_argument("--model", required=True)
    simulate.add_argument("--gpu", default="h100")
    simulate.add_argument("--profile", default=None, help="calibrated profile JSON (default: the bundled one)")
    simulate.add_argument("--replicas", type=int, default=1)
    simulate.add_argument("--router", default="round-robin",
                          choices=["round-robin", "least-outstanding", "prefix-affinity"])
    _add_engine_options(simulate)
    _add_output_options(simulate)

    summary = commands.add_parser("summary", help="print a run's metrics in vLLM's layout")
    summary.add_argument("run")
    summary.add_argument("--goodput", nargs="+", default=None, metavar="SLO")
    summary.add_argument("--save-result", default=None)
    summary.add_argument("--percentiles", default="99", help="comma-separated, e.g. 50,90,99")

    compare = commands.add_parser("compare", help="real versus simulated run: step and metric errors")
    compare.add_argument("real_run")
    compare.add_argument("sim_run")
    compare.add_argument("--json", default=None, help="write the comparison here")

    report = commands.add_parser("report", help="one self-contained HTML report of one or more runs")
    report.add_argument("runs", nargs="+")
    report.add_argument("-o", "--output", default="report.html")

    from simulator.profile import add_profile_arguments

    profile = commands.add_parser("profile", help="time the real executor over a grid of batch shapes (GPU)")
    add_profile_arguments(profile)

    calibrate = commands.add_parser("calibrate", help="fit a cost model from profiles and/or runs' steps")
    calibrate.add_argument("inputs", nargs="+", help="profile Parquet files or run folders")
    calibrate.add_argument("--out", required=True)
    calibrate.add_argument("--gpu", required=True)
    calibrate.add_argument("--model", required=True)
    calibrate.add_argument("--tp", type=int, default=1)
    calibrate.add_argument("--dtype", default="bfloat16")

    plan = commands.add_parser("plan", help="capacity planning: GPUs and configs to serve a trace within SLOs")
    plan.add_argument("trace")
    plan.add_argument("--format", default=None)
    plan.add_argument("--model", required=True)
    plan.add_argument("--gpu", default="h100")
    plan.add_argument("--tp", default="1")
    plan.add_argument("--max-num-seqs", default=None)
    plan.add_argument("--slo", required=True, help="e.g. ttft_p99=2000,tpot_p99=100 (ms)")
    plan.add_argument("--target-rate", type=float, required=True, help="requests per second to serve")
    plan.add_argument("--price", default=None, help="e.g. h100=2.5,h200=3.5 ($ per GPU-hour)")
    plan.add_argument("--router", default="least-outstanding")
    plan.add_argument("--max-requests", type=int, default=None, help="keep the first N requests of the trace")
    plan.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    plan.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    plan.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    plan.add_argument("--search-requests", type=int, default=None,
                      help="search each config's max rate on the trace's busiest N consecutive requests (default 1000)")
    plan.add_argument("--verify-top", type=int, default=3,
                      help="verify the K cheapest configs on the whole trace at the target rate (0: none)")
    plan.add_argument("--search-steps", type=int, default=6, help="bisection steps after bracketing the rate")
    plan.add_argument("--max-num-batched-tokens", type=int, default=None)
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--no-progress", action="store_true")
    plan.add_argument("--out", default="plan")
    plan.add_argument("--workers", type=int, default=None)
    plan.add_argument("--ray", default=None, metavar="ADDRESS", help="run the sweep on a Ray cluster")

    bench = commands.add_parser("bench", help="benchmarks")
    bench.add_argument("which", choices=["throughput"])
    bench.add_argument("--model", default="qwen3-0.6b")
    bench.add_argument("--json", default=None)
    bench.add_argument("--num-seqs", type=int, default=256)

    demo = commands.add_parser("demo", help="the whole loop on a CPU in a few minutes")
    demo.add_argument("--out", default="twinfer-demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `twinfer` console script."""
    args = build_parser().parse_args(argv)
    from engine import commands

    handler = getattr(commands, f"run_{args.command}")
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"twinfer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
