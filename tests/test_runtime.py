"""How runs run (mpp/run/runtime.py): the precision a GPU defaults to, and `--compile` against eager.

`--compile` compiles the ViT's blocks with fullgraph=True, so a graph break is an error here rather
than a silent slowdown; on CPU these tests run PyTorch's ops through Inductor (a C++ compiler).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mpp.train.finetune as ft
from eval import fewshot
from mpp.eval import probe_setup
from mpp.model.objective import MPPObjective
from mpp.model.vit import ViT, vit_config
from mpp.run.checkpoint import load_run
from mpp.run.runtime import compile_blocks, default_precision
from mpp.train.pretrain import TrainConfig, train


def test_bf16_is_the_gpu_default_and_the_user_or_accelerate_wins(monkeypatch):
    config_written = [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr("mpp.run.runtime._accelerate_config_exists", lambda: config_written[0])
    assert default_precision("", {}) == "bf16"  # python scripts/pretrain_mpp.py on a GPU
    assert default_precision("no", {}) == "no"  # --mixed-precision no wins
    assert default_precision("", {"ACCELERATE_MIXED_PRECISION": "no"}) == "bf16"  # launch's own default, not a choice
    assert default_precision("", {"ACCELERATE_MIXED_PRECISION": "fp16"}) is None  # accelerate launch --mixed_precision
    config_written[0] = True
    assert default_precision("", {"ACCELERATE_MIXED_PRECISION": "no"}) is None  # `accelerate config` said no
    config_written[0] = False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert default_precision("", {}) == "no"  # a V100: bf16 would be emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("", {}) == "no"  # CPU: fp32


def test_help_says_the_precision_default(capsys):
    from mpp.train.pretrain import build_parser

    help_text = build_parser("mpp").format_help()
    assert "bf16 on a CUDA GPU with bf16" in " ".join(help_text.split())
    assert "--compile" in help_text and "--kernel-cache" in help_text


@pytest.mark.slow
def test_compiled_pretraining_equals_eager(tmp_path):
    """The same run eager and with --compile: the same losses, step by step, and the same held-out metrics.
    (Batch 24 divides the 360 held-out digits: no tail batch, no recompile for a second size.)"""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        config = TrainConfig(output_dir=str(out), max_steps=4, batch_size=24, num_workers=0, log_every=1,
                             warmup_steps=1, compile=compiled, kernels="torch")
        train(config)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = ([m["train/loss"] for m in metrics if "train/loss" in m],
                          json.loads((out / "summary.json").read_text())["eval"])
    (eager, eager_eval), (compiled, compiled_eval) = runs[False], runs[True]
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-4)
    assert compiled_eval["loss"] == pytest.approx(eager_eval["loss"], rel=1e-4)


@pytest.mark.slow
def test_compiled_probe_features_and_finetune_equal_eager(tmp_path, monkeypatch):
    """The probes' features and a fine-tune's scores: --compile changes no number beyond rounding."""
    args = fewshot.parse_args(["--model", "Micro/4", "--random-init", "--output", str(tmp_path / "f.json"),
                               "--kernels", "torch", "--compile"])
    _, vit, _, _ = probe_setup.build_model(args)
    eager = ViT(vit.config)
    eager.load_state_dict(vit.state_dict())
    compile_blocks(vit)
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(images)["pre_logits"],
                                   eager.eval().forward_features(images)["pre_logits"], rtol=1e-4, atol=1e-5)

    results = {}
    for compiled in (False, True):
        config = ft.FinetuneConfig(model="Micro/4", steps=3, batch_size=32, warmup_steps=1, num_workers=0, lrs=(0.01,),
                                   seeds=1, kernels="torch", compile=compiled,
                                   output_dir=str(tmp_path / f"ft-{compiled}"))
        results[compiled] = ft.finetune(config)
    assert results[True]["test_accuracy"] == results[False]["test_accuracy"]
    weights = [load_run(tmp_path / f"ft-{compiled}")[1].state_dict() for compiled in (False, True)]
    for name, eager_weight in weights[0].items():  # the fine-tuned weights of seed 0
        torch.testing.assert_close(weights[1][name], eager_weight, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_blocks_keeps_parameter_names():
    vit = ViT(vit_config("Micro/4", depth=1))
    names = list(vit.state_dict())
    compile_blocks(vit)
    assert list(vit.state_dict()) == names  # checkpoints and timm exports are unchanged
    obj = MPPObjective(vit)
    assert all(not k.startswith("_orig_mod") for k in dataclasses.asdict(vit.config)) and obj.vit is vit
