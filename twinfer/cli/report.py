"""`twinfer report`: one self-contained HTML report of one or more runs."""

import argparse

from twinfer.cli.options import add_goodput_option


def register(commands) -> None:
    parser = commands.add_parser("report", help="one self-contained HTML report of one or more runs")
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write")
    add_goodput_option(parser)
    parser.add_argument("--itl-threshold", type=float, default=None, metavar="MS",
                        help="timeline bars of token gaps above this many ms are red (default: the tpot goodput "
                        "SLO, else each run's p90 ITL)")
    parser.add_argument("--metric-percentiles", default="50,90,99",
                        help="comma-separated percentiles in the summary table")
    parser.add_argument("--normalize-time", action="store_true",
                        help="draw each run over 0-100%% of its own span, to compare runs of very different "
                        "lengths (by default each run is drawn in seconds from its own start)")
    parser.add_argument("--timeline-requests", type=int, default=200,
                        help="consecutive requests drawn in each run's timeline")


def run(args: argparse.Namespace) -> int:
    from analysis.report import build_report
    from analysis.run_store import read_run
    from analysis.summary import parse_goodput
    from simulator.profile_library import step_predictor_of
    from twinfer.result_json import parse_metric_percentiles

    goodput = parse_goodput(args.goodput) if args.goodput else None
    percentiles = parse_metric_percentiles(args.metric_percentiles)
    if args.itl_threshold is not None and not args.itl_threshold > 0:
        raise ValueError(f"--itl-threshold must be a positive number of ms, got {args.itl_threshold:g}")
    if args.timeline_requests < 1:
        raise ValueError(f"--timeline-requests must be at least 1, got {args.timeline_requests}")
    runs = [read_run(run) for run in args.runs]
    path = build_report(runs, args.output, step_predictor_for=step_predictor_of, goodput=goodput,
                        itl_threshold_ms=args.itl_threshold, percentiles=percentiles,
                        normalize_time=args.normalize_time, timeline_requests=args.timeline_requests)
    print(f"report written to {path}")
    return 0
