"""The evaluation CLIs' configs (mpp.eval.probe_config, VisualizeConfig, ExportConfig): frozen dataclasses
whose fields are the flags, as pretraining's are. Built in code, they are checked by validate() as
their flags are at parse time; the flags come with the help of every field (a base class's too), and
`--config FILE` sets them like any flag. Also the parts of mpp.core.dataclass_flags they rely on."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest

from eval import fewshot, knn, linear_probe
from mpp.core.config import AT_LEAST_1, Parser, add_dataclass_flags, dataclass_from_args, numeric_fields
from mpp.core.dataclass_flags import field_comments
from mpp.core.errors import UsageError
from mpp.eval.probe_config import FewshotConfig, KnnConfig, LinearProbeConfig, ProbeConfig
from mpp.eval.timm_io import ExportConfig
from mpp.eval.visualize import VisualizeConfig

CLASSES = [FewshotConfig, LinearProbeConfig, KnnConfig, VisualizeConfig]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_configs_built_in_code_are_checked_like_their_flags(cls):
    assert set(numeric_fields(cls)) == set(cls.RANGES), "every numeric field declares its range, and only those"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, range_ in cls.RANGES.items():
        default = fields[name].default
        kind = type(default[0]) if isinstance(default, tuple) else int if default is None else type(default)
        bad = [math.nan, math.inf] + ([range_.low if range_.low_open else range_.low - 1] if range_.low is not None
                                      else []) + ([range_.high + 1] if range_.high is not None else [])
        for value in bad:
            if kind is int and not math.isfinite(value):
                continue  # an int field cannot hold it; its flag refuses the text
            value = kind(value) if math.isfinite(value) else value
            config = dataclasses.replace(cls(), **{name: (value,) if isinstance(default, tuple) else value})
            with pytest.raises(UsageError, match=f"--{name.replace('_', '-')}"):
                config.validate()
    assert cls().validate() == cls()  # the defaults pass


def test_choices_and_spanning_checks_hold_for_configs_built_in_code(tmp_path):
    with pytest.raises(UsageError, match="--kernels 'fast' is not one of auto, triton, torch"):
        FewshotConfig(kernels="fast").validate()
    with pytest.raises(UsageError, match="--features 'max' is not one of token, avg"):
        KnnConfig(features="max").validate()
    with pytest.raises(UsageError, match="--what 'loss' is not one of predictions, attention"):
        VisualizeConfig(what=("attention", "loss")).validate()
    with pytest.raises(UsageError, match="--device 'gpu' is not a device: pass cpu or cuda"):
        LinearProbeConfig(device="gpu").validate()
    with pytest.raises(UsageError, match="--model has no run directory to write to"):  # what check_flags said
        FewshotConfig(model="Micro/4", random_init=True).validate()
    assert FewshotConfig(kernels="").validate().kernels == ""  # empty: $MPP_KERNELS or auto


def test_a_probe_cli_parses_into_its_config():
    config = fewshot.parse_args(["--shots", "1", "5", "--l2", "64", "--layers", "all", "--no-references",
                                 "--random-init", "--run", "runs/x"])
    assert isinstance(config, FewshotConfig)
    assert (config.shots, config.l2, config.layers, config.references, config.random_init) == (
        (1, 5), (64.0,), ("all",), False, True)
    assert isinstance(linear_probe.parse_args([]), LinearProbeConfig)
    assert knn.parse_args(["--k", "5"]).k == (5,)
    assert linear_probe.parse_args([]) == LinearProbeConfig()  # the flags' defaults are the fields'


def test_a_probe_config_file_sets_the_fields_of_every_level(tmp_path):
    path = tmp_path / "knn.yaml"
    path.write_text("k: [5, 7]\ntemperature: 0.1\nmax-train: 100\nbatch_size: 8\nreferences: false\n")
    config = knn.parse_args(["--config", str(path), "--temperature", "0.2"])
    assert (config.k, config.temperature, config.max_train, config.batch_size, config.references) == (
        (5, 7), 0.2, 100, 8, False)


@pytest.mark.parametrize("module, cls", [(fewshot, FewshotConfig), (linear_probe, LinearProbeConfig),
                                         (knn, KnnConfig)], ids=["fewshot", "linear_probe", "knn"])
def test_every_probe_flag_has_its_help(module, cls):
    helps = {a.dest: a.help for a in module.build_parser()._actions if a.option_strings}
    assert set(helps) == {f.name for f in dataclasses.fields(cls)} | {"help", "config"}
    assert all(helps.values()), [k for k, v in helps.items() if not v]
    assert helps["kernels"].endswith("| triton | torch (default: $MPP_KERNELS or auto)")  # a continued comment
    assert helps["output"] == f"results JSON (default: RUN_DIR/{cls.REPORT}[-random-init].json)"
    assert helps["batch_size"] == "images per forward pass (default: 256)"  # a base class's comment


def test_export_requires_its_run_and_output(capsys):
    from mpp.eval import timm_io

    parser = Parser(prog="export.py")
    add_dataclass_flags(parser, timm_io.ExportConfig)
    config = dataclass_from_args(ExportConfig, parser.parse_args(["--run", "runs/a", "--output", "out"]))
    assert config == ExportConfig("runs/a", "out") and config.validate() == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--run", "runs/a"])
    assert "error: the following arguments are required: --output" in capsys.readouterr().err


def test_dataclass_flags_read_comments_optional_numbers_and_flag_args():
    @dataclass(frozen=True)
    class Base:
        count: int | None = None  # how many (default: all)
        name: str = "a"  # a name that takes
            # two lines

    @dataclass(frozen=True)
    class Child(Base):
        size: int = 2  # its size

        RANGES: ClassVar = {"count": AT_LEAST_1, "size": AT_LEAST_1}
        FLAG_ARGS: ClassVar = {"name": {"choices": ("a", "b"), "metavar": "NAME"}}

    assert field_comments(Child) == {"count": "how many (default: all)", "name": "a name that takes two lines",
                                     "size": "its size"}
    assert numeric_fields(Child) == ["count", "size"]
    parser = Parser(prog="x")
    add_dataclass_flags(parser, Child)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["count"] == "how many (default: all)" and helps["size"] == "its size (default: 2)"
    assert dataclass_from_args(Child, parser.parse_args(["--count", "3"])) == Child(count=3)
    assert dataclass_from_args(Child, parser.parse_args([])) == Child()
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "0"])  # checked against its range when given
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "c"])  # a choice from FLAG_ARGS

    @dataclass(frozen=True)
    class Unranged:
        count: int | None = None  # an optional number still needs its range

    with pytest.raises(TypeError, match="RANGES lacks numeric field"):
        add_dataclass_flags(Parser(prog="y"), Unranged)


def test_probe_config_is_the_common_base():
    for cls in (FewshotConfig, LinearProbeConfig, KnnConfig):
        assert issubclass(cls, ProbeConfig) and set(ProbeConfig.RANGES) <= set(cls.RANGES)
        assert set(ProbeConfig.FLAG_ARGS) <= set(cls.FLAG_ARGS)
