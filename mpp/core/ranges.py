"""Which values a numeric setting accepts: a `Range` per field or flag, checked the same way at parse
time (`Number`, an argparse `type`) and for a config built in code (`check_ranges`, from the dataclass's
`RANGES` table: field name → `Range`). A value outside is one line, `<flag> <value> is out of range:
pass a number <range>`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass

from mpp.core.errors import UsageError

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



def check_ranges(config) -> None:
    """Raise the one-line UsageError for the first numeric field of a dataclass instance outside its
    declared range (the same check its flags make at parse time). None, an optional number left unset
    (`int | None`), has no range to check."""
    for name, range_ in type(config).RANGES.items():
        value = getattr(config, name)
        if value is not None and (problem := range_.problem("--" + name.replace("_", "-"), value)) is not None:
            raise UsageError(problem)


def optional_of(kind):
    """X for `X | None` (or Optional[X]); `kind` itself otherwise."""
    if typing.get_origin(kind) is typing.Union or str(typing.get_origin(kind)) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def numeric_fields(cls: type) -> list[str]:
    """Fields of a dataclass holding numbers (int, float, tuples of them, or either left optional with
    `| None`; not bool)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = optional_of(hints[f.name])
        args = typing.get_args(kind)
        base = args[0] if typing.get_origin(kind) is tuple else kind
        if base in (int, float):
            out.append(f.name)
    return out
