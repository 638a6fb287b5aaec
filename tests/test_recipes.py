"""The recipes in configs/: each file's header names the command that runs it (`# Run: ...`), an entry
point of this repository with `--config configs/<the file>`, and what to expect (`# Expect: ...`); the
file parses through that entry point's own parser into its config dataclasses, which validate. So a
misspelt key, an out-of-range value or a recipe for an entry point that is gone fails here. Parsing
touches no data: a recipe's dataset (ImageNet on the Hub, a folder that is not there) and its --run
need not exist."""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers.entry_points import load_entry_point
from helpers.runs import REPO

from mpp.core.config import CONFIG_FORMATS, Number

RECIPES = sorted(p for p in (REPO / "configs").rglob("*") if p.is_file())
ENTRY = re.compile(r"^(scripts|eval)/\w+\.py$")


def header(path: Path) -> list[str]:
    """The comment lines that open the file, without their `# `."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def command(path: Path) -> list[str]:
    """The words of the header's one `Run:` line."""
    runs = [line.removeprefix("Run:").strip() for line in header(path) if line.startswith("Run:")]
    assert len(runs) == 1, f"{path.name}: the header needs exactly one '# Run: <command>' line, found {len(runs)}"
    return shlex.split(runs[0])


def entry_point(path: Path) -> Path:
    """The entry point the header's command runs, checked to exist and to run as a program."""
    words = command(path)
    scripts = [w for w in words if ENTRY.match(w)]
    assert len(scripts) == 1, f"{path.name}: its command names no single scripts/*.py or eval/*.py: {words}"
    script = REPO / scripts[0]
    assert script.is_file(), f"{path.name}: its command runs {scripts[0]}, which does not exist"
    assert re.search(r"^if __name__ == .__main__.:", script.read_text(), re.M), f"{scripts[0]} is no entry point"
    config = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"]
    own = str(path.relative_to(REPO))
    assert config == [own], f"{path.name}: its command must pass --config {own}"
    return script


def load(script: Path):
    """The entry point as a module (its `main` not run), as tests/test_flags.py loads them."""
    module = load_entry_point(script, "recipe")
    assert hasattr(module, "build_parser") and hasattr(module, "parse_args"), f"{script.name}: no parse_args()"
    return module


def parsed(module, argv: list[str]) -> list:
    """What the entry point's parse_args makes of `argv`: its config dataclasses (each validated), or the
    Namespace of an entry point that has none (scripts/compare_pretraining.py)."""
    result = module.parse_args(argv)
    configs = list(result) if isinstance(result, tuple) else [result]
    for config in configs:
        if dataclasses.is_dataclass(config):
            config.validate()
        else:
            assert isinstance(config, argparse.Namespace), type(config)
    return configs


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """An empty working directory (so data/... and runs/... are not there), and the Hub closed."""
    import datasets

    def touched(*args, **kwargs):
        raise AssertionError(f"parsing a recipe loaded a dataset: {args}")

    monkeypatch.setattr(datasets, "load_dataset", touched)
    monkeypatch.setattr(datasets, "load_from_disk", touched)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_there_are_recipes_and_every_file_is_one():
    names = {p.name for p in RECIPES}
    assert {"imagenet1k-b16-mpp.yaml", "imagenet1k-b16-finetune-384.yaml", "cifar10-ti4-mpp.yaml",
            "compare-cifar10-cpu.yaml", "compare-cifar10-gpu.yaml", "compare-imagenette-cpu.yaml"} <= names, names
    for path in RECIPES:
        assert path.suffix in CONFIG_FORMATS, f"{path.name}: --config reads {', '.join(CONFIG_FORMATS)} files"
        assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path.name} is no mapping of flags"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_recipe_says_how_to_run_it_and_what_to_expect(path):
    entry_point(path)
    text = "\n".join(header(path))
    assert re.search(r"^Expect\b", text, re.M), f"{path.name}: the header needs an '# Expect ...' paragraph"
    assert re.search(r"^Data:", text, re.M), f"{path.name}: the header needs a '# Data: ...' paragraph"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_recipe_parses_through_its_entry_point_without_touching_data(path, no_data):
    module = load(entry_point(path))
    configs = parsed(module, ["--config", str(path)])
    assert configs, path.name
    # Pointed at data that is not there (the headers' way to use a local copy), it still parses.
    missing = str(no_data / "nowhere" / "imagenet")
    configs = parsed(module, ["--config", str(path), "--dataset", missing])
    assert configs[0].dataset == missing
    if "run" in {a.dest for a in module.build_parser()._actions}:  # a fine-tune's pretrained run
        gone = str(no_data / "no-run")
        assert parsed(module, ["--config", str(path), "--run", gone])[0].run == gone


def out_of_range(action: argparse.Action):
    """A value the flag's range refuses, or None if it has no finite bound."""
    range_ = action.type.range
    if range_.low is not None:
        return range_.low if range_.low_open else range_.low - 1
    if range_.high is not None:
        return range_.high if range_.high_open else range_.high + 1
    return None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_misspelt_key_or_a_value_out_of_range_fails(path, no_data, capsys):
    """What the test above would catch in a recipe, shown on an edited copy of each."""
    module = load(entry_point(path))
    data = yaml.safe_load(path.read_text())
    actions = {name.lstrip("-"): a for a in module.build_parser()._actions for name in a.option_strings}
    first = next(iter(data))
    misspelt = no_data / path.name
    misspelt.write_text(yaml.safe_dump({**{k: v for k, v in data.items() if k != first}, first + "x": data[first]}))
    with pytest.raises(SystemExit) as e:
        parsed(module, ["--config", str(misspelt)])
    assert e.value.code == 2 and f"key '{first}x' is not a flag of" in capsys.readouterr().err
    numeric = [(k, a) for k, a in ((k, actions[k]) for k in data) if isinstance(a.type, Number)
               and out_of_range(a) is not None]
    assert numeric, f"{path.name} sets no number with a bounded range: nothing to check here"
    key, action = numeric[0]
    bad = out_of_range(action)
    value = [bad] * len(data[key]) if isinstance(data[key], list) else bad
    misspelt.write_text(yaml.safe_dump({**data, key: value}))
    with pytest.raises(SystemExit) as e:
        parsed(module, ["--config", str(misspelt)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"key '{key}'" in err and "out of range" in err, err
