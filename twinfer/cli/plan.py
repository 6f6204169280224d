"""`twinfer plan`: capacity planning, which GPUs and configurations serve a trace within its SLOs."""

import argparse
import logging
from pathlib import Path

from simulator.router import DEFAULT_ROUTER, ROUTERS
from simulator.slo import DEFAULT_SLO_PERCENTILE


def register(commands) -> None:
    parser = commands.add_parser("plan", help="capacity planning: GPUs and configs to serve a trace within SLOs")
    parser.add_argument("trace", help="a trace file, a bundled sample (azure-conv, mooncake-conv, demo) or a "
                        "synthetic workload spec")
    parser.add_argument("--format", default=None, help="trace format (default: detected from the columns)")
    parser.add_argument("--model", required=True, help="preset name or model folder")
    parser.add_argument("--gpu", default="h100", help="GPUs to consider, comma-separated, e.g. h100,h200")
    parser.add_argument("--tp", default="1", help="tensor-parallel sizes to consider, comma-separated, e.g. 1,2,4")
    parser.add_argument("--max-num-seqs", default=None, help="max_num_seqs values to consider, comma-separated "
                        "(default: as vLLM picks for each GPU)")
    parser.add_argument("--slo", required=True, nargs="+", metavar="METRIC:MS",
                        help="latency objectives in vLLM's --goodput form, in ms, e.g. --slo ttft:2000 tpot:100 "
                        "(metrics ttft, tpot, itl, e2el), each at --slo-percentile")
    parser.add_argument("--slo-percentile", type=float, default=DEFAULT_SLO_PERCENTILE,
                        help="the percentile of each --slo metric that must stay within its limit")
    parser.add_argument("--target-rate", type=float, required=True, help="requests per second to serve")
    parser.add_argument("--price", default=None, help="e.g. h100=2.5,h200=3.5 ($ per GPU-hour)")
    parser.add_argument("--router", default=DEFAULT_ROUTER, choices=ROUTERS,
                        help="how each configuration's replicas share the requests")
    parser.add_argument("--max-requests", type=int, default=None, help="keep the first N requests of the trace")
    parser.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    parser.add_argument("--search-requests", type=int, default=None,
                      help="search each config's max rate on the trace's busiest N consecutive requests (default 1000)")
    parser.add_argument("--mix-roofline", action="store_true",
                        help="rank rows predicted by the uncalibrated roofline among the others (default: after them)")
    parser.add_argument("--verify-top", type=int, default=3,
                      help="verify the K cheapest configs on the whole trace at the target rate (0: none)")
    parser.add_argument("--search-steps", type=int, default=6, help="bisection steps after bracketing the rate")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the engine's token budget per step (default: as vLLM picks for each GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt tokens and arrival draws")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="plan", help="folder for plan.csv, plan.parquet and plan.html")
    parser.add_argument("--workers", type=int, default=None, help="parallel simulations (default: the CPU count)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="run the sweep on a Ray cluster")


def run(args: argparse.Namespace) -> int:
    """The sweep, the ranked table (CSV, Parquet) and the HTML report."""
    from analysis.plan_report import build_plan_report
    from engine.config import vllm_default_limits
    from simulator.gpu_prices import parse_prices
    from simulator.gpu_specs import gpu_key, gpu_spec
    from simulator.plan_table import EXPECTED_ERROR, format_plan, write_plan
    from simulator.planner import (DEFAULT_SEARCH_REQUESTS, PlanConfig, PlanSettings, engine_args_of, plan)
    from simulator.slo import parse_slos
    from twinfer.cli.options import load_trace

    gpus = tuple(dict.fromkeys(gpu_key(g) for g in args.gpu.split(",") if g.strip()))
    if not gpus:
        raise ValueError("--gpu is empty; e.g. --gpu h100,h200")
    for gpu in gpus:
        try:
            gpu_spec(gpu)
        except KeyError as error:
            raise ValueError(str(error.args[0])) from None
    tps = parse_int_list(args.tp, "--tp")
    if args.max_num_seqs is None:
        seqs_for = {gpu: (vllm_default_limits(gpu_spec(gpu).memory_gib)[0],) for gpu in gpus}
    else:
        seqs = parse_int_list(args.max_num_seqs, "--max-num-seqs")
        seqs_for = {gpu: seqs for gpu in gpus}
    configs = [PlanConfig(gpu, tp, seqs) for gpu in gpus for tp in tps for seqs in seqs_for[gpu]]
    settings = PlanSettings(
        model=args.model,
        slos=parse_slos(args.slo, args.slo_percentile),
        target_rate=args.target_rate,
        router=args.router,
        max_num_batched_tokens=args.max_num_batched_tokens,
        search_steps=args.search_steps,
        seed=args.seed,
    )
    engine_args_of(configs[0], settings)  # a bad engine setting is an error now, not a table of error rows
    trace = load_trace(args)
    slos = ", ".join(f"{slo.name}<={slo.limit_ms:g}ms" for slo in settings.slos)
    print(f"planning {len(configs)} configurations of {settings.model} on {trace.name} ({len(trace)} requests), "
          f"target {settings.target_rate:g} req/s, SLO {slos}")
    result = plan(
        trace, configs, settings,
        prices=parse_prices(args.price),
        search_requests=args.search_requests or DEFAULT_SEARCH_REQUESTS,
        verify_top=args.verify_top,
        workers=args.workers,
        ray_address=args.ray,
        show_progress=not args.no_progress,
        mix_roofline=args.mix_roofline,
    )
    paths = write_plan(result, args.out)
    report = build_plan_report(result, Path(args.out) / "plan.html")
    print(format_plan(result.table))
    kinds = {row["calibration"] for row in result.table.to_pylist()}
    for kind, error in EXPECTED_ERROR.items():
        if kind in kinds:
            print(f"note: '{kind}' rows: {error}")
    poor = sorted({row["calibration_quality"] for row in result.table.to_pylist() if row["calibration_quality"]})
    for verdict in poor:
        logging.getLogger("twinfer").warning(f"rows marked POORLY CALIBRATED come from a profile that is {verdict}")
    if "roofline" in kinds and not args.mix_roofline:
        print("note: 'roofline' rows (no calibrated profile or operator profile for that GPU/model/TP) are ranked "
              "after the others; --mix-roofline ranks them together")
    print(f"{result.info['num_simulations']} simulations in {result.info['total_seconds']:.1f} s")
    print(f"plan written to {paths['plan.csv']}, {paths['plan.parquet']}; report {report}")
    return 0


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); each a positive integer."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{option}: {item!r} is not a positive integer (give e.g. {option} 1,2,4)")
        values.append(int(item))
    if not values:
        raise ValueError(f"{option} is empty")
    return tuple(dict.fromkeys(values))
