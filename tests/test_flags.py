"""Every numeric flag of every entry point refuses NaN, infinities, wrong types and out-of-range
values with one line, `error: <problem>: <fix>`, exit code 2.

The entry points are found, not listed: every script under scripts/ and eval/ that runs as
`__main__`. Each exposes `build_parser()`; every numeric flag must be an `mpp.core.config.Number` (its
range declared once), so a flag added with a bare `type=float` fails here. The bad values are
generated from each flag's declared range."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.entry_points import load_entry_point
from helpers.runs import ENV, REPO

from mpp.core.config import Number, Parser, Range, numeric_fields
from mpp.core.errors import UsageError


def entry_points() -> list[Path]:
    found = [p for folder in ("scripts", "eval") for p in sorted((REPO / folder).glob("*.py"))
             if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)]
    assert len(found) >= 10, found  # the pretraining, evaluation and benchmark scripts
    return found


def load_parser(path: Path) -> Parser:
    module = load_entry_point(path, "entry")
    assert hasattr(module, "build_parser"), f"{path.relative_to(REPO)} has no build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, Parser), f"{path.relative_to(REPO)} does not parse with mpp.core.config.Parser"
    return parser


def bad_values(range_: Range, kind: type) -> list[str]:
    """Values of the wrong type, non-finite, and just outside each end of the range."""
    values = ["nan", "inf", "-inf", "abc", ""]
    step = 1 if kind is int else 1e-3
    if range_.low is not None:
        values.append(repr(kind(range_.low)) if range_.low_open else repr(kind(range_.low - step)))
    if range_.high is not None:
        values.append(repr(kind(range_.high)) if range_.high_open else repr(kind(range_.high + step)))
    if kind is int:
        values.append("1.5")
    return values


CASES = []
for _path in entry_points():
    CASES.append(pytest.param(_path, id=str(_path.relative_to(REPO))))


def numeric_actions(parser: Parser):
    for action in parser._actions:
        if action.option_strings and isinstance(action.type, Number):
            yield action


def positionals(parser: Parser) -> list[str]:
    """Placeholder values for required positional arguments (compare.py's run directories)."""
    return ["x" for action in parser._actions if not action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("path", CASES)
def test_every_numeric_flag_is_range_checked(path, capsys):
    parser = load_parser(path)
    unchecked = [a.option_strings[0] for a in parser._actions
                 if a.option_strings and a.type in (int, float) and not isinstance(a.type, Number)]
    assert not unchecked, f"{path.name}: numeric flags without a declared range: {unchecked}"
    for action in numeric_actions(parser):
        flag = action.option_strings[0]
        for value in bad_values(action.type.range, action.type.kind):
            if isinstance(action.nargs, int) and action.nargs > 1:  # e.g. --crop-scale MIN MAX: the bad one first
                if value.startswith("-") or not value:
                    continue  # argparse takes it for a flag (its own one-line error), tried with one value below
                argv = [*positionals(parser), flag, value, str(action.default[-1])]
            else:  # --flag=VALUE: "-inf" must not look like a flag to argparse
                argv = [*positionals(parser), f"{flag}={value}"]
            with pytest.raises(SystemExit) as e:
                parser.parse_args(argv)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flag, value, err)
            assert flag in lines[0] and ": pass " in lines[0], (flag, value, lines[0])
        # and the default itself is accepted (a range that refuses its own default is wrong)
        default = action.default
        if default is not None:
            for x in default if isinstance(default, (list, tuple)) else [default]:
                assert x in action.type.range, (flag, default)


@pytest.mark.parametrize("path", CASES)
def test_every_entry_point_takes_a_config_file_checked_like_its_flags(path, tmp_path, capsys):
    """`--config FILE` on every entry point (mpp.core.config.Parser): a file's NaN for its first numeric flag,
    and a key that is none of its flags, are each one line naming the file and the key, exit code 2."""
    parser = load_parser(path)
    assert parser._option_string_actions["--config"].dest == "config"
    action = next(numeric_actions(parser), None)
    if action is None:
        bad = {"no-such-flag": 1}
    else:
        many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        bad = {action.option_strings[0].lstrip("-"):
               [math.nan] * (action.nargs if isinstance(action.nargs, int) else 1) if many else math.nan}
    file = tmp_path / "flags.json"
    file.write_text(json.dumps(bad))  # NaN: Python's json writes and reads it
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*positionals(parser), "--config", str(file)])
    lines = capsys.readouterr().err.strip().splitlines()
    key = next(iter(bad))
    start = f"error: --config {file}, key '{key}'" if action else f"error: --config {file}: key '{key}'"
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(start), lines
    flag = action.option_strings[0] if action else None  # an int flag's NaN is "not a whole number", as typed
    assert (any(f"{flag} {nan} is not {what}: pass a number" in lines[0]
                for nan, what in (("nan", "finite"), ("'nan'", "a whole number"))) if action
            else "is not a flag of" in lines[0] and "--help" in lines[0]), lines[0]


def config_classes():
    from mpp.model.objective import MPPConfig
    from mpp.train.finetune import FinetuneConfig
    from mpp.train.pretrain import TrainConfig

    return [TrainConfig, MPPConfig, FinetuneConfig]


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_configs_built_in_code_are_checked_too(cls):
    """A config made in Python (not from flags) is checked by validate() with the same ranges."""
    assert set(numeric_fields(cls)) == set(cls.RANGES), "every numeric field declares its range, and only those"
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, range_ in cls.RANGES.items():
        default = hints[name].default
        bad = [math.nan, math.inf, -math.inf]
        if range_.low is not None:
            bad.append(range_.low if range_.low_open else range_.low - 1)
        if range_.high is not None:
            bad.append(range_.high if range_.high_open else range_.high + 1)
        for value in bad:
            kind = type(default[0]) if isinstance(default, tuple) else type(default)
            if kind is int and not math.isfinite(value):
                continue  # an int field cannot hold it; its flag refuses the text
            value = kind(value) if math.isfinite(value) else value
            config = dataclasses.replace(cls(), **{name: tuple([value] * len(default)) if isinstance(default, tuple)
                                                   else value})
            with pytest.raises(UsageError, match=f"--{name.replace('_', '-')}"):
                config.validate()


@pytest.mark.slow
def test_each_entry_point_refuses_a_nan_through_the_command_line():
    """Through the real command line: exit code 2, one line, no traceback, for each entry point that
    has a numeric flag (its first one, given NaN). The processes run side by side: each is mostly
    Python's start-up and imports."""
    runs = []
    for path in entry_points():
        parser = load_parser(path)
        action = next(numeric_actions(parser), None)
        if action is None:
            continue
        nargs = action.nargs if isinstance(action.nargs, int) else 1
        cmd = [sys.executable, str(path), *positionals(parser), action.option_strings[0], *["nan"] * nargs]
        runs.append((path, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env=ENV)))
    assert len(runs) >= 9  # bench_kernels and compare take no numbers
    for path, proc in runs:
        out, err = proc.communicate(timeout=180)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (path, err)
        assert "Traceback" not in err and out == "", path
