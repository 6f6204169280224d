"""`twinfer compare`: a real run against a simulated one, step by step and metric by metric."""

import argparse
import json


def register(commands) -> None:
    parser = commands.add_parser("compare", help="real versus simulated run: step and metric errors")
    parser.add_argument("real_run", help="the run folder of a real replay")
    parser.add_argument("sim_run", help="the run folder of a simulation of the same trace")
    parser.add_argument("--json", default=None, help="write the comparison here")


def run(args: argparse.Namespace) -> int:
    from analysis.atomic_file import write_text_atomically
    from analysis.compare import compare_runs
    from analysis.run_store import read_run
    from simulator.profile_library import step_predictor_of

    real, simulated = read_run(args.real_run), read_run(args.sim_run)
    comparison = compare_runs(real, simulated, step_predictor=step_predictor_of(simulated))
    print(comparison.format())
    if args.json:
        write_text_atomically(args.json, json.dumps(comparison.to_dict(), indent=2))
    return 0
