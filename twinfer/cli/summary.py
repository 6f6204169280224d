"""`twinfer summary`: a run's metrics in vLLM's layout."""

import argparse

from twinfer.cli.options import summarize


def register(commands) -> None:
    parser = commands.add_parser("summary", help="print a run's metrics in vLLM's layout")
    parser.add_argument("run")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="SLO")
    parser.add_argument("--save-result", default=None)
    parser.add_argument("--percentiles", default="99", help="comma-separated, e.g. 50,90,99")


def run(args: argparse.Namespace) -> int:
    summarize(args.run, args.goodput, args.save_result, [float(p) for p in args.percentiles.split(",") if p])
    return 0
