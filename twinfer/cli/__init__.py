"""The `twinfer` command: one module per subcommand, each with register(commands) and run(args)."""

import time

STARTED = time.perf_counter()
"""When the command started (this module is imported first): simulate's speed counts its start-up too."""

import argparse  # noqa: E402 - after the clock starts
import signal  # noqa: E402
import sys  # noqa: E402

from twinfer import __version__  # noqa: E402
from twinfer.cli.console_log import console_logging, level_of
from twinfer.cli.help_format import HelpFormatter
from twinfer.cli import (bench, calibrate, compare, demo, plan, profile, replay, report, serve, simulate, summary,
                         trace)

SUBCOMMANDS = {
    module.__name__.rsplit(".", 1)[1]: module
    for module in (replay, simulate, summary, compare, report, profile, calibrate, plan, bench, serve, demo, trace)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinfer",
        description="An LLM inference engine and its simulated twin: replay, simulate, summary, compare, report, "
                    "profile, calibrate, plan, bench, serve, demo, trace.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"twinfer {__version__}")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true", help="print warnings and results only: no notes, no "
                         "progress bars")
    chatter.add_argument("-v", "--verbose", action="store_true", help="also print debug messages")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    for module in SUBCOMMANDS.values():
        module.register(commands)
    return parser


class SubcommandParser(argparse.ArgumentParser):
    """Every subcommand's parser shows each option's default in its help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `twinfer` console script."""
    args = build_parser().parse_args(argv)
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    with console_logging(level_of(args.quiet, args.verbose)):
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
