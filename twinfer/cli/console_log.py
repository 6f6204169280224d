"""The CLI's messages through `logging`: notes at INFO, warnings once each as one line, --quiet and --verbose."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings


class _ConsoleFormat(logging.Formatter):
    """'warning: ...' for warnings and errors, the bare text for notes: no logger names, no source lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def level_of(quiet: bool, verbose: bool) -> int:
    """--quiet: warnings and errors only; --verbose: debug messages too; else notes as well."""
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


class _ConsoleHandler(logging.StreamHandler):
    """The handler console_logging installs, told apart from any other."""


@contextlib.contextmanager
def console_logging(level: int):
    """Log to stderr at `level` while the command runs, Python warnings included (one line each, text only);
    the logging and warnings set-up is restored afterwards. A command run inside another (`twinfer demo` runs
    several) keeps the outer set-up, so nothing is said twice."""
    root = logging.getLogger()
    if any(isinstance(existing, _ConsoleHandler) for existing in root.handlers):
        yield
        return
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormat())
    warning_logger = logging.getLogger("py.warnings")
    previous_level, previous_show = root.level, warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        warning_logger.warning(str(message))

    root.addHandler(handler)
    root.setLevel(level)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous_show
        root.removeHandler(handler)
        root.setLevel(previous_level)
