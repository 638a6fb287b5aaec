"""One-line errors for bad input, and the wrapper that prints them without a traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UsageError(Exception):
    """Bad input the user can fix. The message is one line: the problem, then what to do."""


class MissingSplit(UsageError):
    """A dataset without the split asked for (a test split): pretraining carves a held-out split from
    its training images instead (mpp.holdout), saying why (`problem`); everything else stops with
    this one line."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}: {fix}")
        self.problem = problem


def one_line(error: UsageError) -> str:
    """The error's own line. Raised in a DataLoader worker, it comes back re-raised by PyTorch with
    the worker's traceback in front ("Caught UsageError in DataLoader worker ... Traceback ...")."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{UsageError.__module__}.{UsageError.__name__}: ") if lines else str(error)


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing: the reason inside a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def cli_main(main: F) -> F:
    """Wrap an entry point so a `UsageError` ends the process with its one line and exit code 2.

    Ctrl-C ends it with one line and exit code 130. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop's handler, or a second one inside it
            if os.environ.get("RANK", "0") == "0":
                print("\ninterrupted (Ctrl-C): stopped without saving", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
