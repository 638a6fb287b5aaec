"""Command-line flags: one per dataclass field, every number checked for finiteness and range.

`--batch-size` sets `batch_size`; booleans take `--flag` / `--no-flag`; tuples take several values.
The dataclass stays the single source of names, defaults and documentation; its `RANGES` table
(field name → `Range`) says which values each numeric field accepts, and the same check serves the
flag (at parse time) and the dataclass's `validate()` (for configs built in code). Every entry point
parses with `Parser`, whose errors are one line: `error: <problem>: <fix>`, exit code 2.

Every `Parser` also takes `--config FILE`: the defaults from a file, overridden by the flags given
(mpp.core.config_file says which files and how their values are checked).

The work is split by job; this module is the one entry points import, and it re-exports the rest:
- mpp.core.ranges: `Range`, the common ranges, `Number` (a numeric flag's argparse type), `check_ranges`;
- mpp.core.config_file: reading `--config FILE`, and `Invocation` (how an entry point was called);
- mpp.core.dataclass_flags: `add_dataclass_flags` and `dataclass_from_args`;
- here: `Parser`, `number_flag` (a numeric flag outside a dataclass), `device_flag` and `check_device`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import typing

from mpp.core.config_file import (
    CONFIG_FLAG,
    CONFIG_FORMATS,
    Invocation,
    config_file_in,
    file_defaults,
    read_config_file,
)
from mpp.core.dataclass_flags import add_dataclass_flags, dataclass_from_args, field_comments
from mpp.core.errors import UsageError
from mpp.core.ranges import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    SEED_MAX,
    Number,
    Range,
    check_ranges,
    numeric_fields,
)

__all__ = [  # what entry points and libraries import from here, wherever it is defined
    "AT_LEAST_1", "CONFIG_FLAG", "CONFIG_FORMATS", "FRACTION", "NON_NEGATIVE", "OPEN_FRACTION", "POSITIVE", "SEED",
    "SEED_MAX", "Invocation", "Number", "Parser", "Range", "add_dataclass_flags", "check_device", "check_ranges",
    "config_file_in", "dataclass_from_args", "device_flag", "field_comments", "file_defaults", "number_flag",
    "numeric_fields", "read_config_file",
]


class Parser(argparse.ArgumentParser):
    """argparse with the repository's error form: one line, `error: <problem>: <fix>`, exit code 2,
    printed once (by the main process under `accelerate launch`); and `--config FILE`, whose values
    become the defaults of this parse (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The sections of a run's config.json that record this parser's flags (add_dataclass_flags adds them).
        self.run_sections: dict[str, set[str]] = {}  # section -> the fields its dataclass records
        # Settings that say one thing two ways (a length as --max-steps or as --epochs): when the command
        # line gives one of a group, a --config file's values for the others are dropped, so the flag
        # given is the one obeyed (a run's config.json records every member of the group).
        self.alternatives: list[tuple[str, ...]] = []  # groups of dests
        self.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                          help="defaults from a file, overridden by the flags given: a run's config.json "
                          "(its settings) or a JSON/YAML mapping of flags, e.g. {\"lr\": 0.001, \"max-steps\": 40}")

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        path = config_file_in(argv)
        namespace = argparse.Namespace() if namespace is None else namespace
        if path is not None:
            try:
                values = file_defaults(self, path)
            except UsageError as e:  # its own fix, whatever its words
                self.exit_with(str(e))
            typed = self.dests_given(argv)
            for group in self.alternatives:
                if typed & set(group):
                    values = {dest: v for dest, v in values.items() if dest not in set(group) - typed}
            for dest, value in values.items():  # argparse fills in only what the namespace lacks
                if not hasattr(namespace, dest):
                    setattr(namespace, dest, value)
        # A required flag the file sets is given: argparse checks only the command line, so it is not
        # required for this parse (restored after it).
        given = [a for a in self._actions if a.required and a.option_strings and hasattr(namespace, a.dest)]
        for action in given:
            action.required = False
        try:
            namespace, extras = super().parse_known_args(argv, namespace)
        finally:
            for action in given:
                action.required = True
        if namespace.config != path:  # argparse resolved --config otherwise than config_file_in (an abbreviation)
            self.error(f"{CONFIG_FLAG} was not understood as given: pass {CONFIG_FLAG} FILE in full")
        return namespace, extras

    def dests_given(self, argv: list[str]) -> set[str]:
        """The dests of the optional flags named in `argv` (as --flag or --flag=value)."""
        flags = {option: a.dest for a in self._actions for option in a.option_strings}
        named = set()
        for token in argv:
            if token == "--":
                break
            if (dest := flags.get(token.split("=", 1)[0])) is not None:
                named.add(dest)
        return named

    def error(self, message: str) -> typing.NoReturn:
        # "argument --lr: --lr nan is not finite: ..." (a Number's message names its flag) → "--lr nan ..."
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)
        self.exit_with(message + ("" if ": pass " in message else f": see {self.prog} --help"))

    def exit_with(self, line: str) -> typing.NoReturn:
        """`error: <line>` on stderr (from the main process only), exit code 2."""
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


def number_flag(parser, flag: str, kind: type, range_: Range, **kwargs) -> None:
    """Add a numeric flag whose values are checked against `range_` as they are parsed."""
    parser.add_argument(flag, type=Number(kind, range_, flag), **kwargs)


def device_flag(text: str) -> str:
    """argparse `type` of --device: a device this machine has (`cuda` without a GPU is refused here,
    not as a traceback at the first tensor moved)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device: pass cpu or cuda") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"--device {text} is not available (no CUDA GPU is visible here): "
                                             "pass --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"--device {text} is not available ({count} CUDA GPU(s) here): "
                                             f"pass --device cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"--device {text} is not supported: pass cpu or cuda")
    return text


def check_device(text: str) -> None:
    """`device_flag`'s check for a config built in code: the same one line, as a UsageError."""
    try:
        device_flag(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None
