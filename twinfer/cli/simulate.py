"""`twinfer simulate`: a trace through the simulator (cost-model executor, virtual clock); no GPU needed."""

import argparse

from twinfer.cli.options import add_engine_options, add_output_options, add_trace_options


def register(commands) -> None:
    parser = commands.add_parser("simulate", help="replay a trace through the simulator (no GPU needed)")
    add_trace_options(parser)
    parser.add_argument("--model", required=True)
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--profile", default=None,
                        help="a calibrated profile (JSON) or an operator profile (Parquet, composed); default: the "
                        "bundled calibrated profile, else the GPU's bundled operator profile, else the roofline")
    parser.add_argument("--cost-model", default="auto", choices=["auto", "calibrated", "composed", "roofline"],
                        help="force one kind of cost model (default: auto, in the order of --profile's help)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--router", default="round-robin",
                        choices=["round-robin", "least-outstanding", "prefix-affinity"])
    add_engine_options(parser)
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from twinfer.cli.replay import replay_trace

    return replay_trace(args, "sim", replicas=args.replicas, router=args.router)
