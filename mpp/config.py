"""Command-line flags from dataclass configs: one flag per field, its inline comment as the help.

`--batch-size` sets `batch_size`; booleans take `--flag` / `--no-flag`; tuples take several values.
The dataclass stays the single source of names, defaults and documentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from functools import cache


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
    """Add one flag per field of `cls` (defaults: overrides for this entry point)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
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
        elif origin is tuple:  # tuple[float, float]: exactly two values; tuple[float, ...]: one or more
            nargs = "+" if args[-1] is Ellipsis else len(args)
            group.add_argument(flag, dest=f.name, default=default, type=args[0], nargs=nargs, help=help_)
        else:
            if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":  # Optional[X] / X | None
                kind = next(a for a in args if a is not type(None))
            group.add_argument(flag, dest=f.name, default=default, type=kind, help=help_)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build `cls` from the parsed flags (fields absent from the namespace keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
