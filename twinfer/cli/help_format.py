"""Help text that shows each option's default, as vLLM's CLI does, except where there is none to show."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without '(default: None)' or '(default: False)' noise, and without repeating a
    default the help text already states."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or "%(default)" in text:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return super()._get_help_string(action)
