"""One-line errors for bad input, and the wrapper that prints them without a traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UsageError(Exception):
    """Bad input the user can fix. The message is one line: the problem, then what to do."""


def cli_main(main: F) -> F:
    """Wrap an entry point so a `UsageError` ends the process with its one line and exit code 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
