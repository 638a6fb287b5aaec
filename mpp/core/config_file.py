"""`--config FILE`: the defaults of one parse from a file, and how an entry point was called.

FILE is a run's own config.json (mpp.run.rundir.run_config, mpp.train.finetune: the sections that record this
entry point's dataclass fields are read, the rest, derived, is ignored) or a JSON/YAML mapping of
this entry point's flags (`lr` or `max-steps`: a dest or a flag name). Its values pass the flags'
own type, choice and range checks, and a bad one is the same one line, naming the file and the key.
`mpp.core.config.Parser` reads it before its own parse.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mpp.core import unique_keys
from mpp.core.errors import UsageError, first_line
from mpp.core.ranges import Number

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


def file_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """dest → value for the flags a --config FILE sets, each checked as the flag itself would be (`parser`:
    an mpp.core.config.Parser, whose `run_sections` say which sections of a run's config.json it reads)."""
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

