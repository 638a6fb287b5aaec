"""Fine-tuning: the labelled subset and dev split, lr selection on dev only, new resolutions, resume, options."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import launch_2, run_script

from eval import finetune as finetune_entry
from mpp.core.files import write_json
from mpp.model.vit import ViT, ViTConfig, resample_pos_embed
from mpp.run.checkpoint import load_checkpoint, load_run, save_checkpoint
from mpp.train import finetune as ft
from mpp.train.finetune_start import check_same_start

TINY = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
# A few seconds per fine-tune: tiny model, small batches, no worker processes.
FAST = dict(steps=4, batch_size=32, warmup_steps=1, num_workers=0, log_every=2, lrs=(0.01, 0.1), seeds=2)


@pytest.fixture
def pretrained(tmp_path):
    """A pretrained MPP run in miniature (no head, like MPP's): config.json and a checkpoint at step 5."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY, num_classes=0))
    config = {"train": {"dataset": "digits", "image_size": 16, "model": "tiny", "seed": 0, "objective": "mpp"},
              "vit": dataclasses.asdict(vit.config)}
    run = tmp_path / "mpp"
    run.mkdir()
    write_json(run / "config.json", config)
    save_checkpoint(run, 5, {"config": config, "model": vit.state_dict(), "step": 5})
    return run


def spy_trainings(monkeypatch) -> list[dict]:
    """Record every training the Finetuner runs: what it trained on, where it scored, what it got."""
    calls = []
    original = ft.Finetuner.train

    def train(self, indices, lr, seed, tag, score_on):
        trained = original(self, indices, lr, seed, tag, score_on)
        calls.append({"tag": tag, "lr": lr, "seed": seed, "indices": np.asarray(indices), "score_on": score_on,
                      "score": trained.score, "scored_set": self.eval_sets[score_on], "start": self.start_state})
        return trained

    monkeypatch.setattr(ft.Finetuner, "train", train)
    return calls


def test_labelled_subset_and_dev_split_are_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(5), 40)  # 5 classes × 40
    config = ft.FinetuneConfig(train_fraction=0.25, dev_fraction=0.2)
    split = ft.split_labelled(labels, config)
    assert np.bincount(labels[split["train"]]).tolist() == [10] * 5  # 25% of each class
    assert np.bincount(labels[split["dev"]]).tolist() == [2] * 5  # 20% of that, per class
    assert not set(split["dev"]) & set(split["fit"])
    assert sorted([*split["dev"], *split["fit"]]) == sorted(split["train"])
    again = ft.split_labelled(labels, dataclasses.replace(config, seeds=1, lrs=(0.5,)))
    assert all(np.array_equal(split[k], again[k]) for k in split)  # the same labels for every model and seed
    per_class = ft.split_labelled(labels, ft.FinetuneConfig(train_per_class=4, dev_fraction=0.25))
    assert np.bincount(labels[per_class["train"]]).tolist() == [4] * 5
    with pytest.raises(ft.UsageError, match="fewer than 41"):
        ft.split_labelled(labels, ft.FinetuneConfig(train_per_class=41))


def test_select_lr_best_dev_accuracy_ties_to_smaller():
    assert ft.select_lr({"0.01": {"dev_accuracy": 0.5}, "0.03": {"dev_accuracy": 0.7}}) == 0.03
    assert ft.select_lr({"0.1": {"dev_accuracy": 0.7}, "0.03": {"dev_accuracy": 0.7}}) == 0.03


def test_layer_decay_scales_lr_by_depth():
    vit = ViT(ViTConfig(**TINY, num_classes=10))
    opt = ft.optimizer_for(vit, ft.FinetuneConfig(layer_decay=0.5), lr=1.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    # depth 2: stem (layer 0) gets 0.5^3, block 1 (layer 2) 0.5^1, the head (layer 3) the full rate
    assert lr_of[id(vit.pos_embed)] == pytest.approx(0.125)
    assert lr_of[id(vit.blocks[1].mlp.fc1.weight)] == pytest.approx(0.5)
    assert lr_of[id(vit.head.weight)] == pytest.approx(1.0)
    assert all(g["weight_decay"] == 0 and g["momentum"] == 0.9 for g in opt.param_groups)
    plain = ft.optimizer_for(vit, ft.FinetuneConfig(), lr=0.3)
    assert [g["lr"] for g in plain.param_groups] == [0.3] and isinstance(plain, torch.optim.SGD)


def test_lr_grid_sees_only_the_dev_split_then_scores_test_once(pretrained, tmp_path, monkeypatch):
    calls = spy_trainings(monkeypatch)
    out = tmp_path / "ft"
    results = ft.finetune(ft.FinetuneConfig(run=str(pretrained), output_dir=str(out), dev_fraction=0.2, **FAST))

    grid, final = calls[:2], calls[2:]
    assert [c["tag"] for c in calls] == ["grid-lr0.01", "grid-lr0.1", "seed0", "seed1"]
    test_set = final[0]["scored_set"]
    dev_set = grid[0]["scored_set"]
    for c in grid:  # the grid never touches the test split: it trains on "fit" and scores on "dev"
        assert c["score_on"] == "dev" and c["scored_set"] is not test_set
        assert not set(c["indices"]) & set(dev_set.indices)  # and never trains on what it scores
    assert all(c["score_on"] == "test" for c in final)
    best = max(grid, key=lambda c: (c["score"], -c["lr"]))["lr"]
    assert results["lr"] == best and all(c["lr"] == best for c in final)  # chosen by dev accuracy alone
    assert len(final[0]["indices"]) == results["dataset"]["train_size"] == 1437  # then all the labelled data
    assert results["dataset"]["dev_size"] == len(dev_set.indices)
    assert results["test_accuracy"]["per_seed"] == [c["score"] for c in final]

    saved = json.loads((out / "finetune.json").read_text())
    assert saved["grid"] == {"0.01": {"dev_accuracy": grid[0]["score"]}, "0.1": {"dev_accuracy": grid[1]["score"]}}
    assert saved["init"] == "pretrained" and saved["pretrained"] == str(pretrained)
    # the zero-initialised head of the paper, and the pretrained body
    start = calls[0]["start"]
    assert torch.count_nonzero(start["head.weight"]) == 0 and start["head.weight"].shape == (10, 32)
    body = load_checkpoint(next((pretrained / "checkpoints").iterdir()))["model"]
    assert torch.equal(start["blocks.0.attn.qkv.weight"], body["blocks.0.attn.qkv.weight"])
    # seed 0's model is a run checkpoint the probes read; TensorBoard has one folder per training
    config, vit, _ = load_run(out)
    assert config["train"]["objective"] == "finetune" and vit.config.num_classes == 10
    assert {p.name for p in (out / "tensorboard").iterdir()} >= {"grid-lr0.01", "grid-lr0.1", "seed0", "seed1"}


def test_new_resolution_resamples_position_embeddings(pretrained, tmp_path, monkeypatch):
    calls = spy_trainings(monkeypatch)
    out = tmp_path / "ft32"
    results = ft.finetune(ft.FinetuneConfig(run=str(pretrained), output_dir=str(out), image_size=32,
                                            **{**FAST, "lrs": (0.01,), "seeds": 1, "steps": 2}))
    assert [c["tag"] for c in calls] == ["seed0"]  # one lr: no grid
    assert results["dataset"]["image_size"] == 32 and results["vit"]["image_size"] == 32
    pretrained_pos = load_checkpoint(next((pretrained / "checkpoints").iterdir()))["model"]["pos_embed"]  # [1, 17, D]
    start_pos = calls[0]["start"]["pos_embed"]  # [1, 65, D]: 8×8 patches of 4 px + the class token
    assert start_pos.shape == (1, 65, 32)
    torch.testing.assert_close(start_pos, resample_pos_embed(pretrained_pos, 8))
    assert torch.equal(start_pos[:, 0], pretrained_pos[:, 0])  # the class token's embedding is kept


def test_from_scratch_with_augmentations_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "scratch"
    config = ft.FinetuneConfig(model="Micro/4", output_dir=str(out), train_per_class=20, dev_fraction=0.25,
                               mixup=0.8, cutmix=1.0, label_smoothing=0.1, randaugment="rand-m9-mstd0.5-inc1",
                               layer_decay=0.75, **FAST)
    first = ft.finetune(config)
    assert first["init"] == "scratch" and first["dataset"]["train_size"] == 200 and first["dataset"]["dev_size"] == 50
    assert first["start"] == {"init": "scratch", "checkpoint": None, "step": None, "sha256": None}
    assert 0 <= first["test_accuracy"]["mean"] <= 1

    # An interruption after the grid and seed 0: --resume trains only what is missing, with the same result file.
    results = json.loads((out / "finetune.json").read_text())
    del results["trainings"]["seed1"], results["test_accuracy"]
    write_json(out / "finetune.json", results)
    started = json.loads((out / "config.json").read_text())
    calls = spy_trainings(monkeypatch)
    again = ft.finetune(dataclasses.replace(config, resume=True))
    assert [c["tag"] for c in calls] == ["seed1"]
    recorded = json.loads((out / "config.json").read_text())  # the start's record kept, the resume's added
    assert {k: v for k, v in recorded.items() if k != "resumed"} == started
    [resume] = recorded["resumed"]
    assert resume["trainings_done"] == len(results["trainings"]) and resume["commit"] == started["commit"]
    assert {"config_file", "command_line", "versions", "command"} <= set(resume)
    assert again["trainings"]["seed0"] == first["trainings"]["seed0"]
    assert again["test_accuracy"]["per_seed"][1] == pytest.approx(first["test_accuracy"]["per_seed"][1])


def finetune_cli(run, out, *flags) -> subprocess.CompletedProcess:
    """eval/finetune.py through its real command line: 2 steps, one lr (no grid)."""
    return run_script("eval/finetune.py", "--run", str(run), "--output-dir", str(out), "--steps", "2",
                      "--batch-size", "32", "--warmup-steps", "1", "--num-workers", "0", "--lrs", "0.01",
                      "--log-every", "1", *flags)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_the_pretraining_saved_a_newer_checkpoint_is_refused(pretrained, tmp_path, capsys, monkeypatch):
    out, ckpt5 = tmp_path / "ft", pretrained / "checkpoints" / "ckpt-00000005.pt"
    # The first fine-tune in this process (a start-up saved); the refusal below goes through the CLI.
    flags = ["--output-dir", str(out), "--steps", "2", "--batch-size", "32", "--warmup-steps", "1",
             "--num-workers", "0", "--lrs", "0.01", "--log-every", "1"]
    ft.finetune(ft.parse_args(["--run", str(pretrained), *flags, "--seeds", "1"]))
    results = json.loads((out / "finetune.json").read_text())
    assert results["start"] == {"init": "pretrained", "checkpoint": str(ckpt5), "step": 5, "sha256": sha256(ckpt5)}

    # The pretraining moves on: a newer checkpoint with other weights is now the run's newest.
    state = load_checkpoint(ckpt5)
    save_checkpoint(pretrained, 10, {**state, "model": {k: v + 1 for k, v in state["model"].items()}, "step": 10})
    before, config_before = (out / "finetune.json").read_bytes(), (out / "config.json").read_bytes()
    refused = finetune_cli(pretrained, out, "--seeds", "2", "--resume")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"from {ckpt5} (step 5) but --run is now {pretrained}/checkpoints/ckpt-00000010.pt (step 10)" in errors[0]
    assert f"pass --run {ckpt5} to finish it, or pass a new --output-dir" in errors[0]
    assert (out / "finetune.json").read_bytes() == before  # nothing recorded, nothing trained
    assert (out / "config.json").read_bytes() == config_before  # no resume recorded either

    # The fix it names works (in this process, to save a start-up): the recorded checkpoint named by its
    # file trains the missing seed from it.
    flags = [*flags, "--resume", "--seeds", "2"]
    calls = spy_trainings(monkeypatch)
    resumed = ft.finetune(ft.parse_args(["--run", str(ckpt5), *flags]))
    assert [c["tag"] for c in calls] == ["seed1"]
    assert torch.equal(calls[0]["start"]["pos_embed"], state["model"]["pos_embed"])  # step 5's weights
    assert resumed["trainings"]["seed0"] == results["trainings"]["seed0"] and resumed["start"] == results["start"]

    # The identity is the content: a moved copy still resumes (its step read from inside it), and the
    # run without it is refused with the fix that is left.
    copy = tmp_path / "start.pt"
    ckpt5.rename(copy)
    gone = one_line_error(capsys, ["--run", str(pretrained), *flags])
    assert f"{ckpt5} is gone or changed, so pass --run a copy of it (sha256 {results['start']['sha256'][:12]}" in gone
    again = ft.finetune(ft.parse_args(["--run", str(copy), *flags]))
    assert len(calls) == 1 and again["start"] == {**results["start"], "checkpoint": str(copy)}


def test_starting_points_that_differ_are_refused():
    scratch = {"init": "scratch", "checkpoint": None, "step": None, "sha256": None}
    ckpt = {"init": "pretrained", "checkpoint": "runs/mpp/checkpoints/ckpt-00000005.pt", "step": 5, "sha256": "ab" * 32}
    check_same_start(Path("ft"), scratch, scratch)
    check_same_start(Path("ft"), ckpt, {**ckpt, "checkpoint": "elsewhere.pt"})  # the same bytes
    check_same_start(Path("ft"), None, scratch)  # an older finetune.json from scratch: nothing to mix
    with pytest.raises(ft.UsageError, match="does not record which checkpoint .*: pass a new --output-dir"):
        check_same_start(Path("ft"), None, ckpt)
    with pytest.raises(ft.UsageError, match=r"from scratch \(random weights\) but --run is now .*: drop --run"):
        check_same_start(Path("ft"), scratch, ckpt)
    with pytest.raises(ft.UsageError, match=r"but there is no --run now: .*fine-tune from scratch"):
        check_same_start(Path("ft"), ckpt, scratch)


def test_short_finetune_on_real_cifar10_images(tmp_path, cifar10_slice):
    results = ft.finetune(ft.FinetuneConfig(model="Micro/8", image_size=32, dataset=str(cifar10_slice),
                                            output_dir=str(tmp_path / "ft"), train_fraction=0.5, **FAST))
    assert results["dataset"]["num_classes"] == 10 and results["dataset"]["train_size"] == 100
    assert results["dataset"]["test_size"] == 100 and len(results["test_accuracy"]["per_seed"]) == 2


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        finetune_entry.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--dev-fraction", "1.5"], "--dev-fraction 1.5 is out of range: pass a number in (0, 1)"),
    (["--momentum", "nan"], "--momentum nan is not finite"),
    (["--train-per-class", "10000"], "pass a smaller --train-per-class"),
    (["--lrs", "0.1", "-1"], "--lrs -1 is out of range: pass a number > 0"),
    (["--mixup", "0.8", "--batch-size", "33"], "even --batch-size"),
    (["--randaugment", "foo-m9"], "not a timm RandAugment spec"),
    (["--resume"], "drop --resume"),
    (["--run", "no/such/run"], "does not exist"),
    (["--model", "Q/16"], "unknown model preset"),
    (["--image-size", "30"], "not divisible by the patch size"),
    (["--dataset", "no/such/folder"], "does not exist"),
    (["--lrs", "1e30", "--grad-clip", "0", "--warmup-steps", "0"], "not finite"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    fast = ["--steps", "3", "--batch-size", "32", "--num-workers", "0", "--seeds", "1", "--lrs", "0.01"]
    msg = one_line_error(capsys, ["--output-dir", str(tmp_path / "ft"), *fast, *argv])
    assert expected in msg


def test_existing_results_need_resume(tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    write_json(out / "finetune.json", {"config": {}})
    assert "pass --resume" in one_line_error(capsys, ["--output-dir", str(out), "--steps", "1", "--num-workers", "0"])


@pytest.mark.slow
def test_two_processes_score_every_test_image_once(tmp_path):
    # `--multi_gpu` on a machine without CUDA: two gloo CPU processes (see test_train.py).
    out = tmp_path / "ft"
    proc = launch_2("eval/finetune.py", "--model", "Micro/4", "--steps", "3", "--batch-size", "32", "--num-workers",
                    "0", "--lrs", "0.01", "0.1", "--seeds", "1", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "finetune.json").read_text())
    # 360 test and 142 dev images split over 2 processes: gathered without the even-batch padding
    assert results["trainings"]["seed0"]["scored"] == results["dataset"]["test_size"] == 360
    assert results["trainings"]["grid-lr0.01"]["scored"] == results["dataset"]["dev_size"] == 142
