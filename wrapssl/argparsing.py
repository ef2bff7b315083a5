"""The command line's shared parts: one-line argparse errors, help with defaults, --version, KEY=VALUE flags,
the few-label report's flags, and the OpenMP setting the programs make before torch loads.

Both programs (`wrapssl`, in cli.py, and `wrapssl train`, in app.py) import it; neither imports the other at
module level, so no import circle remains. No torch here: `--help` and `--version` answer fast.
"""
from __future__ import annotations

import argparse
import ast
import os
from typing import Any, Sequence

from .version import __version__

VERSION = f"wrapssl {__version__}"  # what --version prints
DEFAULT_BUDGETS = ("10/class", "100/class")  # the few-label report's label budgets
DEFAULT_DRAWS = 3  # class-balanced draws of labelled images per budget
DEFAULT_FINETUNE_STEPS = 300  # steps of each fine-tuning in the few-label report


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: ...`` and a pointer to --help, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it in words ("default: ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def quiet_openmp() -> None:
    """Let idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the environment says otherwise.

    By default they spin, and on a shared CPU they starve the threads doing the work (a step can take 10-50x
    longer); sleeping costs next to nothing on an idle machine. OpenMP reads the variable once, when torch
    loads it, so the programs (``wrapssl``, ``python -m wrapssl``, train.py) call this before importing
    torch; ``import wrapssl`` leaves the environment alone.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE strings (a repeatable ``flag``) as keyword arguments, values parsed as Python literals when they
    are; ValueError naming the flag otherwise."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_budget_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The few-label report's flags (`wrapssl train` and `wrapssl evaluate`: one protocol, one set of flags)."""
    from .checks import positive_int_arg

    p.add_argument("--labels", nargs="+", default=list(DEFAULT_BUDGETS), metavar="COUNT",
                   help="label budgets of the few-label report: totals (100) or per class (10/class); for each, "
                        "--draws class-balanced draws of labelled training images score raw pixels (linear), the "
                        "net from scratch (fine-tuned), the pretrained net (linear and fine-tuned) and images "
                        "picked by `wrapssl select` against random picks; 'none' skips it. It costs about a minute "
                        "per budget for the small ResNet on 2 CPU cores")
    p.add_argument("--draws", type=positive_int_arg, default=DEFAULT_DRAWS,
                   help="draws of labelled images per budget (their mean and spread are reported)")
    p.add_argument("--finetune-steps", type=positive_int_arg, default=DEFAULT_FINETUNE_STEPS,
                   help="steps of each fine-tuning in the few-label report (batch 64; `wrapssl finetune` has the "
                        "other settings)")
