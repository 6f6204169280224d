"""`twinfer summary`: a run's metrics in vLLM's layout, and vLLM's result JSON."""

import argparse

from twinfer.cli.options import add_goodput_option, summarize
from twinfer.cli.result_flags import add_result_flags, check_result_flags


def register(commands) -> None:
    parser = commands.add_parser("summary", help="print a run's metrics in vLLM's layout")
    parser.add_argument("run", help="a run folder")
    add_goodput_option(parser)
    add_result_flags(parser)
    # Before vLLM's name, `summary` had its own; both set the same option.
    parser.add_argument("--percentiles", dest="metric_percentiles", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    check_result_flags(args)
    summarize(args.run, args)
    return 0
