"""`twinfer calibrate`: fit a cost model from profiles and runs' steps."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser("calibrate", help="fit a cost model from profiles and/or runs' steps")
    parser.add_argument("inputs", nargs="+", help="profile Parquet files or run folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")


def run(args: argparse.Namespace) -> int:
    from simulator.calibrate import calibrate_cli

    return calibrate_cli(args)
