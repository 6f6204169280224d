"""The `twinfer` command: one module per subcommand, each with register(commands) and run(args)."""

import argparse
import signal
import sys

from twinfer.cli import bench, calibrate, compare, demo, plan, profile, replay, report, simulate, summary

SUBCOMMANDS = {
    module.__name__.rsplit(".", 1)[1]: module
    for module in (replay, simulate, summary, compare, report, profile, calibrate, plan, bench, demo)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinfer",
        description="An LLM inference engine and its simulated twin: replay, simulate, summary, compare, report, "
                    "profile, calibrate, plan, bench, demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `twinfer` console script."""
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, OSError) as error:  # bad input or a file that cannot be read or written: one line
        print(f"twinfer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # before or after a run (a run itself writes its finished part)
        from twinfer.interrupts import signal_of

        signum = signal_of(interrupt)
        print(f"twinfer {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
