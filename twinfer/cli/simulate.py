"""`twinfer simulate`: a trace through the simulator (cost-model executor, virtual clock); no GPU needed."""

import argparse

from simulator.router import DEFAULT_ROUTER, ROUTERS
from twinfer.cli.options import add_engine_options, add_output_options, add_trace_options


def register(commands) -> None:
    parser = commands.add_parser("simulate", help="replay a trace through the simulator (no GPU needed)")
    add_trace_options(parser)
    parser.add_argument("--model", required=True, help="preset name or model folder")
    parser.add_argument("--gpu", default="h100", help="the GPU simulated")
    parser.add_argument("--profile", default=None,
                        help="a calibrated profile (JSON) or an operator profile (Parquet, composed); default: the "
                        "bundled calibrated profile, else the GPU's bundled operator profile, else the roofline")
    parser.add_argument("--cost-model", default="auto", choices=["auto", "calibrated", "composed", "roofline"],
                        help="force one kind of cost model (default: auto, in the order of --profile's help)")
    parser.add_argument("--replicas", type=int, default=1, help="engines behind --router")
    parser.add_argument("--router", default=DEFAULT_ROUTER, choices=ROUTERS,
                        help="how --replicas share the requests (the same default as `twinfer plan`)")
    add_engine_options(parser)
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from twinfer.cli.replay import replay_trace

    return replay_trace(args, "sim", replicas=args.replicas, router=args.router)
