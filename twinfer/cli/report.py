"""`twinfer report`: one self-contained HTML report of one or more runs."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser("report", help="one self-contained HTML report of one or more runs")
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write")


def run(args: argparse.Namespace) -> int:
    from analysis.report import build_report
    from analysis.run_store import read_run
    from simulator.profile_library import step_predictor_of

    path = build_report([read_run(run) for run in args.runs], args.output, step_predictor_for=step_predictor_of)
    print(f"report written to {path}")
    return 0
