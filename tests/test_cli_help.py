"""The command line as a user meets it: --version, --quiet/--verbose, help with defaults on every option."""

import argparse
import logging
import warnings

import pytest

from twinfer import __version__
from twinfer.cli import build_parser, main


def subcommand_parsers():
    parser = build_parser()
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"twinfer {__version__}"


def nested(parser, name):
    """The parser and those of its sub-subcommands (twinfer trace export), by their command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from nested(sub_parser, f"{name} {sub_name}")


@pytest.mark.parametrize("name, parser", [pair for name, parser in sorted(subcommand_parsers().items())
                                          for pair in nested(parser, name)])
def test_every_option_has_help_and_its_default_is_shown(name, parser):
    missing = [action.dest for action in parser._actions if action.help is None]
    assert not missing, f"twinfer {name}: options without help: {missing}"
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and action.help is not argparse.SUPPRESS:
            # Shown either by the formatter or in the help's own words.
            assert "default" in action.help or f"(default: {action.default})" in " ".join(text.split()), \
                f"twinfer {name} {action.option_strings[0]}: default {action.default!r} not shown"


def test_warnings_print_once_as_one_line_without_source(tmp_path, capsys, monkeypatch):
    # A local folder named like a bundled sample: the sample is read, and a warning names both, once.
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "demo", "--model", "qwen3-8b", "--gpu", "a100-80g", "--out", str(tmp_path / "run"),
                 "--no-progress", "--max-output-len", "8"]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    shadow = [line for line in lines if "bundled sample" in line]
    assert len(shadow) == 1 and shadow[0].startswith("warning: 'demo' is read as the bundled sample")
    assert "./demo" in shadow[0]
    assert sum("no calibrated profile" in line for line in lines) == 1
    assert "clipped the output of 24 of 24 requests to 8 tokens" in err
    assert sum("clipped the output" in line for line in lines) == 1
    assert not any(".py:" in line for line in lines), err  # no source locations


def test_quiet_keeps_warnings_drops_notes(tmp_path, capsys):
    assert main(["--quiet", "simulate", "demo", "--model", "qwen3-8b", "--gpu", "a100-80g",
                 "--out", str(tmp_path / "run"), "--max-output-len", "8"]) == 0
    err = capsys.readouterr().err
    assert "no calibrated profile" in err and "clipped the output" not in err
    # The logging set-up is undone after the command.
    assert logging.getLogger().level == logging.WARNING and warnings.showwarning is not None


def test_a_command_run_inside_another_says_each_thing_once(tmp_path, capsys):
    from twinfer.cli.console_log import console_logging

    with console_logging(logging.INFO):
        assert main(["simulate", "demo", "--model", "qwen3-8b", "--gpu", "a100-80g", "--out", str(tmp_path / "run"),
                     "--no-progress", "--max-output-len", "8"]) == 0
    err = capsys.readouterr().err
    assert sum("no calibrated profile" in line for line in err.splitlines()) == 1
    assert sum("clipped the output" in line for line in err.splitlines()) == 1
