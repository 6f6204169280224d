"""`twinfer demo`: the whole loop on a CPU in a few minutes, with nothing to download."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser("demo", help="the whole loop on a CPU in a few minutes")
    parser.add_argument("--out", default="twinfer-demo", help="folder for the demo's runs and report")


def run(args: argparse.Namespace) -> int:
    from twinfer.demo import demo

    return demo(args.out)
