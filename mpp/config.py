"""Command-line flags: one per dataclass field, every number checked for finiteness and range.

`--batch-size` sets `batch_size`; booleans take `--flag` / `--no-flag`; tuples take several values.
The dataclass stays the single source of names, defaults and documentation; its `RANGES` table
(field name → `Range`) says which values each numeric field accepts, and the same check serves the
flag (at parse time) and the dataclass's `validate()` (for configs built in code). Every entry point
parses with `Parser`, whose errors are one line: `error: <problem>: <fix>`, exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import os
import re
import sys
import tokenize
import typing
from dataclasses import dataclass
from functools import cache

from mpp.errors import UsageError

SEED_MAX = 2**32 - 1  # numpy's seeding (used by accelerate's set_seed and the probes) takes 32 bits


@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: finite, between `low` and `high` (None: unbounded), each end
    included unless `*_open`."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def describe(self) -> str:
        """'> 0', '>= 1', 'in (0, 1]', ...: what the fix tells the user to pass."""
        low, high = _fmt(self.low), _fmt(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "finite"

    def problem(self, flag: str, value) -> str | None:
        """None when `value` (a number or a tuple of them) is accepted, else the one-line message."""
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return f"{flag} {x!r} is not a number: pass a number {self.describe()}"
            if x not in self:
                what = "is not finite" if not math.isfinite(x) else "is out of range"
                return f"{flag} {x:g} {what}: pass a number {self.describe()}"
        return None


def _fmt(x: float | None) -> str:  # 4294967295, not 4.29497e+09; 0.5, not 0.500000
    return "" if x is None else str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else f"{x:g}"


POSITIVE = Range(0, low_open=True)  # > 0
NON_NEGATIVE = Range(0)  # >= 0
AT_LEAST_1 = Range(1)  # counts of steps, images, seeds...
FRACTION = Range(0, 1)  # [0, 1]
OPEN_FRACTION = Range(0, 1, high_open=True)  # [0, 1): dropout, label smoothing, Adam betas
SEED = Range(0, SEED_MAX)


class Number:
    """An argparse `type` for one numeric flag: parses `kind` (int or float), refuses NaN, infinities
    and values outside `range`. Its attributes let tests walk every numeric flag of every entry point."""

    def __init__(self, kind: type, range_: Range, flag: str = ""):
        self.kind, self.range, self.flag = kind, range_, flag
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{self.flag or 'value'} {text!r} is not {'a whole number' if self.kind is int else 'a number'}: "
                f"pass a number {self.range.describe()}") from None
        if (problem := self.range.problem(self.flag or "value", value)) is not None:
            raise argparse.ArgumentTypeError(problem)  # names the flag: Parser.error drops argparse's own prefix
        return value


class Parser(argparse.ArgumentParser):
    """argparse with the repository's error form: one line, `error: <problem>: <fix>`, exit code 2,
    printed once (by the main process under `accelerate launch`)."""

    def error(self, message: str) -> typing.NoReturn:
        # "argument --lr: --lr nan is not finite: ..." (a Number's message names its flag) → "--lr nan ..."
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)
        if os.environ.get("RANK", "0") == "0":
            fix = "" if ": pass " in message else f": see {self.prog} --help"
            print(f"error: {message}{fix}", file=sys.stderr, flush=True)
        sys.exit(2)


def number_flag(parser, flag: str, kind: type, range_: Range, **kwargs) -> None:
    """Add a numeric flag whose values are checked against `range_` as they are parsed."""
    parser.add_argument(flag, type=Number(kind, range_, flag), **kwargs)


def check_ranges(config) -> None:
    """Raise the one-line UsageError for the first numeric field of a dataclass instance outside its
    declared range (the same check its flags make at parse time)."""
    for name, range_ in type(config).RANGES.items():
        if (problem := range_.problem("--" + name.replace("_", "-"), getattr(config, name))) is not None:
            raise UsageError(problem)


def numeric_fields(cls: type) -> list[str]:
    """Fields of a dataclass holding numbers (int, float, or tuples of them; not bool)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = args[0] if typing.get_origin(kind) is tuple else kind
        if base in (int, float):
            out.append(f.name)
    return out


@cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field line in a dataclass's source."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): flags still work, without help
        return comments
    last_name = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE:
            last_name = None
        elif tok.type == tokenize.NAME and last_name is None and tok.start[1] == 4:
            last_name = tok.string
        elif tok.type == tokenize.COMMENT and last_name:
            comments[last_name] = tok.string.lstrip("# ").strip()
    return comments


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (defaults: overrides for this entry point). A numeric field
    must have its range in `cls.RANGES`: an unchecked number is a bug caught when the flags are built.
    A field's help is its comment, or `cls.FLAG_HELP[name]()` where the class computes it (from a
    table that can grow, such as mpp.objective.TARGETS)."""
    hints = typing.get_type_hints(cls)
    comments = {**field_comments(cls), **{k: make() for k, make in getattr(cls, "FLAG_HELP", {}).items()}}
    ranges = getattr(cls, "RANGES", {})
    missing = [name for name in numeric_fields(cls) if name not in ranges]
    if missing:
        raise TypeError(f"{cls.__name__}.RANGES lacks numeric field(s) {missing}: declare what each accepts")
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_)
            continue
        nargs = None
        if origin is tuple:  # tuple[float, float]: exactly two values; tuple[float, ...]: one or more
            nargs, kind = ("+" if args[-1] is Ellipsis else len(args)), args[0]
        elif origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # Optional[X] / X | None
            kind = next(a for a in args if a is not type(None))
        if kind in (int, float):
            kind = Number(kind, ranges[f.name], flag)
        group.add_argument(flag, dest=f.name, default=default, type=kind, nargs=nargs, help=help_)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from the parsed flags (fields absent from the namespace keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
