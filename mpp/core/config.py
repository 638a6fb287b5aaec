"""Command-line flags: one per dataclass field, every number checked for finiteness and range.

`--batch-size` sets `batch_size`; booleans take `--flag` / `--no-flag`; tuples take several values.
The dataclass stays the single source of names, defaults and documentation; its `RANGES` table
(field name → `Range`) says which values each numeric field accepts, and the same check serves the
flag (at parse time) and the dataclass's `validate()` (for configs built in code). Every entry point
parses with `Parser`, whose errors are one line: `error: <problem>: <fix>`, exit code 2.

Every `Parser` also takes `--config FILE`: the defaults from a file, overridden by the flags given.
FILE is a run's own config.json (mpp.run.rundir.run_config, mpp.train.finetune: the sections that record this
entry point's dataclass fields are read, the rest, derived, is ignored) or a JSON/YAML mapping of
this entry point's flags (`lr` or `max-steps`: a dest or a flag name). Its values pass the flags'
own type, choice and range checks, and a bad one is the same one line, naming the file and the key.
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
from pathlib import Path

from mpp.core import unique_keys
from mpp.core.errors import UsageError, first_line

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
    printed once (by the main process under `accelerate launch`); and `--config FILE`, whose values
    become the defaults of this parse (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The sections of a run's config.json that record this parser's flags (add_dataclass_flags adds them).
        self.run_sections: dict[str, set[str]] = {}  # section -> the fields its dataclass records
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

    def error(self, message: str) -> typing.NoReturn:
        # "argument --lr: --lr nan is not finite: ..." (a Number's message names its flag) → "--lr nan ..."
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)
        self.exit_with(message + ("" if ": pass " in message else f": see {self.prog} --help"))

    def exit_with(self, line: str) -> typing.NoReturn:
        """`error: <line>` on stderr (from the main process only), exit code 2."""
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


CONFIG_FLAG = "--config"
CONFIG_FORMATS = {".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}


class _NoConfig(Exception):
    """The pre-parse found no usable --config; the full parse reports why, if anything is wrong."""


class _ConfigOnly(argparse.ArgumentParser):
    def error(self, message):
        raise _NoConfig(message)


def config_file_in(argv: list[str]) -> str | None:
    """The --config FILE of a command line, found before the full parse (whose defaults it sets); None
    when there is none or it is malformed (the full parse then says so)."""
    pre = _ConfigOnly(add_help=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    try:
        return pre.parse_known_args(argv)[0].config
    except _NoConfig:
        return None


@dataclass(frozen=True)
class Invocation:
    """How an entry point was called, as a run's config.json records it beside its settings."""

    config_file: str | None  # the --config FILE, as an absolute path; None: none was given
    command_line: tuple[str, ...] | None  # the arguments as given (after the program); None: called from Python

    @classmethod
    def of(cls, argv: list[str] | None) -> Invocation:
        """The invocation of an entry point handed `argv` (None: this process's command line)."""
        argv = sys.argv[1:] if argv is None else list(argv)
        path = config_file_in(argv)
        return cls(str(Path(path).expanduser().absolute()) if path is not None else None, tuple(argv))

    def record(self) -> dict:
        return {"config_file": self.config_file,
                "command_line": list(self.command_line) if self.command_line is not None else None}


def read_config_file(path: str) -> dict:
    """The mapping a --config FILE holds; one-line UsageError for a missing, unreadable or malformed file."""
    fix = "pass a run's config.json or a JSON/YAML mapping of flags"
    file = Path(path).expanduser()
    kind = CONFIG_FORMATS.get(file.suffix.lower())
    if kind is None:
        raise UsageError(f"{CONFIG_FLAG} {path}: unknown format (not .json, .yaml or .yml): {fix}")
    if not file.is_file():
        raise UsageError(f"{CONFIG_FLAG} {path}: no such file: {fix}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{CONFIG_FLAG} {path} cannot be read ({type(e).__name__}: {e}): {fix}") from None
    try:  # NaN and Infinity parse as JSON: the range checks then name them
        data = unique_keys.load_json(text) if kind == "JSON" else unique_keys.load_yaml(text)
    except unique_keys.RepeatedKey as e:  # json and yaml would keep the last value without a word
        raise UsageError(f"{CONFIG_FLAG} {path} sets {e} more than once: keep one of them") from None
    except ValueError as e:  # json.JSONDecodeError; in YAML a value that cannot be built (the date 2020-13-45)
        raise UsageError(f"{CONFIG_FLAG} {path} is not valid {kind} ({first_line(e)}): fix the file or {fix}") from None
    except Exception as e:  # yaml.YAMLError; its message spans lines
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UsageError(f"{CONFIG_FLAG} {path} is not valid YAML{at} "
                         f"({getattr(e, 'problem', None) or type(e).__name__}): fix the file or {fix}") from None
    if data is None:  # an empty YAML file
        raise UsageError(f"{CONFIG_FLAG} {path} is empty: {fix}")
    if not isinstance(data, dict):
        raise UsageError(f"{CONFIG_FLAG} {path} holds a {type(data).__name__}, not a mapping of flags: {fix}")
    return data


def _recorded_sections(data: dict) -> tuple[str, ...] | None:
    """The sections of a run's config.json that may hold flags; None for a flat mapping of flags. Every
    run's config.json has a "train" section; a fine-tune's records its flags under "finetune" (its
    "train" only summarises the run for the readers of pretraining runs)."""
    if not isinstance(data.get("train"), dict):
        return None
    return ("finetune",) if isinstance(data.get("finetune"), dict) else ("train", "mpp")


def file_defaults(parser: Parser, path: str) -> dict:
    """dest → value for the flags a --config FILE sets, each checked as the flag itself would be."""
    data = read_config_file(path)
    actions = {}  # every name an optional flag goes by: its dest, its flag names with and without dashes
    for action in parser._actions:
        if action.option_strings and action.dest not in (argparse.SUPPRESS, "help"):
            longs = [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse.BooleanOptionalAction):
                longs = longs[:1]  # not --no-X: a key's value is the setting's, `hflip: false`
            for name in (action.dest, *longs):
                actions.setdefault(name, action)
                actions.setdefault(name.replace("-", "_"), action)
    sections = _recorded_sections(data)
    if sections is None:
        items = [(str(key), str(key), value) for key, value in data.items()]
    else:
        wanted = [s for s in parser.run_sections if s in sections and isinstance(data.get(s), dict)]
        if not wanted:
            kind = "a fine-tune's" if sections == ("finetune",) else "a pretraining run's"
            raise UsageError(f"{CONFIG_FLAG} {path} is {kind} config.json, which records no flags of {parser.prog}: "
                             f"pass a JSON/YAML mapping of its flags (see {parser.prog} --help)")
        for section in wanted:  # a misspelt key in an edited copy must not fall back to the default unsaid
            if unknown := sorted(set(data[section]) - parser.run_sections[section]):
                raise UsageError(f"{CONFIG_FLAG} {path}: key '{section}.{unknown[0]}' is no setting a run records: "
                                 f"fix its name or drop it (see {parser.prog} --help)")
        # the fields a run records that are not flags here (objective, ...) are its own business
        items = [(f"{s}.{key}", key, value) for s in wanted for key, value in data[s].items() if key in actions]
    values: dict = {}
    for where, key, value in items:
        action = actions.get(key)
        if action is None and (positive := re.sub(r"^no[-_]", "", key)) != key and isinstance(
                actions.get(positive), argparse.BooleanOptionalAction):  # --no-hflip's setting is hflip: false
            raise UsageError(f"{CONFIG_FLAG} {path}: key '{key}' is --{key.replace('_', '-')}'s flag, not a "
                             f"setting: write '{positive}: false' instead")
        if action is None or action.dest == "config":
            what = "another --config" if action is not None else f"not a flag of {parser.prog}"
            raise UsageError(f"{CONFIG_FLAG} {path}: key '{key}' is {what}: drop it (see {parser.prog} --help)")
        if action.dest in values:
            raise UsageError(f"{CONFIG_FLAG} {path}: key '{key}' sets {action.option_strings[0]} a second time: "
                             "keep one of the two")
        try:
            values[action.dest] = _file_value(action, value)
        except (argparse.ArgumentTypeError, UsageError) as e:
            raise UsageError(f"{CONFIG_FLAG} {path}, key '{where}': {e}") from None
    return values


def _file_value(action: argparse.Action, value):
    """A file's value for one flag, through the flag's own type, nargs and choices."""
    flag = action.option_strings[0]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{flag} takes true or false, not {value!r}: pass true or false")
        return value
    if type(action) is not argparse._StoreAction:
        raise UsageError(f"{flag} cannot be set from a file: pass it on the command line")
    if value is None:
        if action.default is None:
            return None
        raise UsageError(f"{flag} is null: pass a value or drop the key")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if not many:
        return _one_value(action, flag, value)
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f"{flag} takes {action.nargs} values, not {len(items)}: pass a list of {action.nargs}")
    if action.nargs == "+" and not items:
        raise UsageError(f"{flag} takes at least one value: pass a non-empty list")
    return [_one_value(action, flag, item) for item in items]


def _one_value(action: argparse.Action, flag: str, value):
    if isinstance(value, bool) and not isinstance(action.type, Number):
        # YAML reads off / no / yes unquoted as booleans: a text flag must not become False
        raise UsageError(f"{flag} {value!r} is a boolean, not text: quote the value in the file")
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise UsageError(f"{flag} takes one value, not {value!r}: pass a single value")
    text = repr(value) if isinstance(value, float) else str(value)  # repr: a float's every digit, nan, inf
    try:
        converted = action.type(text) if action.type is not None else text
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag} {text!r} is not valid ({e}): see the flag in --help") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{flag} {converted!r} is not one of {', '.join(map(str, action.choices))}: pass one of them")
    return converted


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
                        skip: tuple[str, ...] = (), run_section: str = "") -> None:
    """Add one flag per field of `cls` (defaults: overrides for this entry point). A numeric field
    must have its range in `cls.RANGES`: an unchecked number is a bug caught when the flags are built.
    A field's help is its comment, or `cls.FLAG_HELP[name]()` where the class computes it (from a
    table that can grow, such as mpp.model.objective.TARGETS). `run_section`: the section of a run's
    config.json that records these fields, which `--config RUN/config.json` then reads."""
    if run_section and isinstance(parser, Parser):
        parser.run_sections[run_section] = {f.name for f in dataclasses.fields(cls)}
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
