"""The errors the entry points turn into exit codes, and the one place that prints them.

Every module that rejects input imports these from here (not from the config schema), so raising a
named error costs no pydantic or accelerate import and creates no import circle.
"""
from __future__ import annotations

import argparse
import os
import sys

USER_ERROR_EXIT = 2
RUN_FAILED_EXIT = 1


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, a missing file): the entry points print the
    message without a traceback and exit 2. Tasks raise it for bad input, naming the file or key."""


class ConfigError(UserError):
    """A mistake in a config file or override; the message says which key and why."""


class RunFailed(Exception):
    """The run stopped for a reason the user must act on (e.g. a NaN loss); exit 1."""


def is_main_process() -> bool:
    """Rank 0 of a launch (or a plain single process). Read from the launcher's environment, so it
    answers before Accelerate is set up, in any entry point."""
    return os.environ.get("RANK", "0") == "0"


def is_local_main_process() -> bool:
    """The first process on this machine: for messages worth printing once per machine."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def user_message(err: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker raised it (the main process then
    sees the worker's whole traceback as the message: keep its last line's message only)."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("Error: ", 1)[-1]
    return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad flag reported like every other user mistake: `error: ...` on one line
    (not argparse's usage dump) and exit 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


def number(kind: type, low: float, strict: bool = False):
    """An argparse type: a `kind` (int or float) >= low (> low when strict)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < low or (strict and value == low) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"expected a value {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


def print_user_error(err: BaseException) -> int:
    """`error: <message>` on stderr (from the main process only) and the exit code for it."""
    if is_main_process():
        print(f"error: {user_message(err)}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
