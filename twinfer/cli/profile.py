"""`twinfer profile`: time the real executor over a grid of batch shapes (on a GPU)."""

import argparse


def register(commands) -> None:
    from simulator.profile import add_profile_arguments

    parser = commands.add_parser("profile", help="time the real executor over a grid of batch shapes (GPU)")
    add_profile_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from simulator.profile import profile_from_args

    print(f"profile written to {profile_from_args(args)}")
    return 0
