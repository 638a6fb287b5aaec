"""Command-line flags from a frozen dataclass: one flag per field (`batch_size` → `--batch-size`),
its help the field's comment, its default the field's, its numbers checked against the class's
`RANGES`; and the dataclass back from the parsed flags.

A field's type says its flag's form: bool → `--flag` / `--no-flag`; tuple[X, ...] → one or more
values, tuple[X, X] → exactly two; `X | None` → an optional value (None: unset); a field without a
default → a required flag. What the type cannot say (a metavar, choices, an argparse `type` such as
a device check) the class gives in `FLAG_ARGS` (field name → add_argument keywords), and a help
computed from a table that can grow in `FLAG_HELP` (field name → a function returning the text).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from functools import cache

from mpp.core.ranges import Number, numeric_fields, optional_of


@cache
def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` of each field of a dataclass, its base classes' fields included: the comment that
    ends the field's line, continued by comment-only lines right below it indented deeper than the field."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not cls and dataclasses.is_dataclass(klass):
            comments.update(field_comments(klass))
    try:
        source = textwrap.dedent(inspect.getsource(cls))  # a class defined in a function is indented
    except (OSError, TypeError):  # no source (frozen app): flags still work, without help
        return comments
    last_name = continued = None  # the field of the line being read; the field whose comment may continue
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE:
            last_name = None
        elif tok.type == tokenize.NAME and last_name is None and tok.start[1] == 4:
            last_name, continued = tok.string, None
        elif tok.type == tokenize.COMMENT and last_name:
            comments[last_name] = tok.string.lstrip("# ").strip()
            continued = last_name
        elif tok.type == tokenize.COMMENT and continued and tok.start[1] > 4 and not tok.line[:tok.start[1]].strip():
            comments[continued] += " " + tok.string.lstrip("# ").strip()
        elif tok.type == tokenize.COMMENT:
            continued = None
    return comments


def flag_help(comment: str, default) -> str:
    """A flag's help: its field's comment, then its default unless the comment states it (`(default: ...)`)."""
    text = comment if "(default:" in comment or default is dataclasses.MISSING else f"{comment} (default: {default})"
    return text.replace("%", "%%")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict | None = None,
                        skip: tuple[str, ...] = (), run_section: str = "") -> None:
    """Add one flag per field of `cls` (defaults: overrides for this entry point). A numeric field
    must have its range in `cls.RANGES`: an unchecked number is a bug caught when the flags are built.
    A field's help is its comment, or `cls.FLAG_HELP[name]()` where the class computes it (from a
    table that can grow, such as mpp.model.objective.TARGETS); `cls.FLAG_ARGS[name]` adds argparse
    keywords (metavar, choices, a `type` for a text field). `run_section`: the section of a run's
    config.json that records these fields, which `--config RUN/config.json` then reads."""
    if run_section and hasattr(parser, "run_sections"):  # mpp.core.config.Parser
        parser.run_sections[run_section] = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    comments = {**field_comments(cls), **{k: make() for k, make in getattr(cls, "FLAG_HELP", {}).items()}}
    ranges, extras = getattr(cls, "RANGES", {}), getattr(cls, "FLAG_ARGS", {})
    numeric = numeric_fields(cls)
    if missing := [name for name in numeric if name not in ranges]:
        raise TypeError(f"{cls.__name__}.RANGES lacks numeric field(s) {missing}: declare what each accepts")
    if typed := [name for name in numeric if "type" in extras.get(name, {})]:
        raise TypeError(f"{cls.__name__}.FLAG_ARGS gives numeric field(s) {typed} a type: their range checks them")
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (defaults or {}).get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        kind = optional_of(hints[f.name])
        help_ = flag_help(comments.get(f.name, ""), default)
        given = {"required": True} if default is dataclasses.MISSING else {"default": default}
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_,
                               **given, **extras.get(f.name, {}))
            continue
        nargs = None
        if typing.get_origin(kind) is tuple:  # tuple[float, float]: exactly two values; tuple[float, ...]: one or more
            args = typing.get_args(kind)
            nargs, kind = ("+" if args[-1] is Ellipsis else len(args)), args[0]
        if kind in (int, float):
            kind = Number(kind, ranges[f.name], flag)
        group.add_argument(flag, dest=f.name, **{"type": kind, "nargs": nargs, "help": help_, **given,
                                                 **extras.get(f.name, {})})


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from the parsed flags (fields absent from the namespace keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
