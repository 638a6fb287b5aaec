"""The training loop: schedule, flags, bad input, and end-to-end runs (kill → resume → few-shot, real
CIFAR-10 images). Two processes under `accelerate launch`: test_distributed.py."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.runs import FAST, REPO, read_metrics, run_script
from PIL import Image

from eval import fewshot
from mpp.model.objective import MPPObjective
from mpp.model.vit import ViT, vit_config
from mpp.run.checkpoint import load_checkpoint
from mpp.run.optim import param_groups
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import TrainConfig, main, parse_args, train


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    f = [cfg.lr_schedule(100).factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    # monotone decay after warmup; strict=False: each factor beside the next, so f[9:] has one more
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert cfg.lr_schedule(100).factor(100) == pytest.approx(0.1)  # ends at min_lr / lr
    assert cfg.lr_schedule(100).factor(55) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    lin = TrainConfig(lr=1e-3, warmup_steps=0, schedule="linear")
    assert lin.lr_schedule(100).factor(25) == pytest.approx(0.75)


def test_no_weight_decay_on_norms_biases_embeddings():
    obj = MPPObjective(ViT(vit_config("Micro/4", depth=1, num_classes=0)))
    decay, no_decay = param_groups(obj, 0.1, obj.no_weight_decay())
    names = {id(p): n for n, p in obj.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"mask_token", "vit.cls_token", "vit.pos_embed", "vit.norm.weight",
            "vit.blocks.0.attn.qkv.bias"} <= undecayed
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in obj.named_parameters()
        if p.ndim >= 2 and n not in ("vit.cls_token", "vit.pos_embed", "mask_token")}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_flags_come_from_the_dataclasses():
    cfg, mpp = parse_args("mpp", ["--crop-scale", "0.3", "1.0", "--no-hflip", "--corrupt-rate", "0.15",
                                  "--target", "l2", "--batch-size", "64"])
    assert cfg.objective == "mpp" and cfg.crop_scale == (0.3, 1.0) and cfg.hflip is False and cfg.batch_size == 64
    assert mpp.corrupt_rate == 0.15 and mpp.target == "l2" and cfg.output_dir == "runs/mpp"
    sup, _ = parse_args("supervised", [])
    assert sup.objective == "supervised" and sup.output_dir == "runs/supervised"
    with pytest.raises(SystemExit):  # MPP flags are not offered to the supervised script
        parse_args("supervised", ["--corrupt-rate", "0.5"])


def one_line_error(capsys, objective, argv):
    with pytest.raises(SystemExit) as e:
        main(objective, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    # one error line, the last thing printed (after any progress bar), and no traceback
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [(["--dataset", "no/such/folder"], "does not exist"),
     (["--model", "Q/16"], "unknown model preset"),
     (["--image-size", "30"], "not divisible by the patch size"),
     (["--corrupt-rate", "1.5"], "--corrupt-rate 1.5 is out of range: pass a number in (0, 1]"),
     (["--mask-prob", "0.5"], "sum to 1"),
     (["--resume"], "no checkpoint"),
     (["--batch-size", "1000000"], "smaller than one batch"),
     (["--save-every", "0"], "--save-every 0 is out of range: pass a number >= 1"),
     (["--lr", "0"], "--lr 0 is out of range: pass a number > 0"),
     (["--lr", "nan"], "--lr nan is not finite"),
     (["--cells", "0", "--target", "downsample"], "--cells 0 is out of range"),
     (["--target", "downsample", "--cells", "8"], "--cells 8 is more than the patch size 4"),
     (["--model", "Ti/0"], "patch_size 0 must be a whole number of at least 1"),
     (["--batch-size", "30", "--grad-accum-steps", "4"], "not divisible by processes × accumulation steps = 4"),
     (["--dataset", "{empty}"], "no images found"),
     (["--dataset", "{torn}", "--strict-images", "--batch-size", "2"], "torn.png' cannot be read"),
     (["--dataset", "{file}"], "is not a folder")],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)  # class folders, no images
    for split in ("train", "test"):  # one good image and one torn one per split
        (tmp_path / "torn" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "torn" / split / "a" / "good.png")
        (tmp_path / "torn" / split / "a" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "file").write_text("not a dataset")
    argv = [a.format(**{k: tmp_path / k for k in ("empty", "torn", "file")}) for a in argv]
    msg = one_line_error(capsys, "mpp", ["--output-dir", str(tmp_path / "run"), *FAST, "--max-steps", "2", *argv])
    assert expected in msg


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "pass a writable --output-dir" in one_line_error(capsys, "mpp", ["--output-dir", str(blocker / "run")])


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    msg = one_line_error(capsys, "supervised", ["--output-dir", str(tmp_path / "run"), *FAST, "--max-steps", "20",
                                                "--lr", "1e30", "--grad-clip", "0", "--warmup-steps", "0"])
    assert "not finite at step 2" in msg  # step 1 makes the weights blow up
    # advice that works: --resume would keep the lr that diverged, so a new run with a lower one
    assert "start a new run (another --output-dir) with a lower --lr (e.g. 5e+29)" in msg and "--resume keeps" in msg


@pytest.mark.slow
def test_pretrain_kill_resume_then_fewshot(tmp_path, capsys):
    # 30 steps, a checkpoint every 5: killed at step 5, resumed for 25, and 6 checkpoints of which 3 are kept.
    run = tmp_path / "run"
    args = ["scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "30", "--save-every", "5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list_checkpoints(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: what is on disk must be enough
    proc.wait()
    saved = list_checkpoints(run)
    assert saved, "the run was killed before its first checkpoint"
    killed_at = load_checkpoint(saved[-1])["step"]
    assert killed_at < 30

    # Without --resume the run directory is protected.
    again = run_script(*args)
    assert again.returncode == 2 and "pass --resume" in again.stderr and "Traceback" not in again.stderr

    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {run} at step {killed_at}" in resumed.stdout + resumed.stderr
    final = load_checkpoint(list_checkpoints(run)[-1])
    assert final["step"] == 30 and len(list_checkpoints(run)) <= 3
    steps = [m["step"] for m in read_metrics(run) if "train/loss" in m]
    assert steps == list(range(5, 31, 5))  # steps logged after the checkpoint were dropped, then redone once
    assert json.loads((run / "config.json").read_text())["resumed"][0]["step"] == killed_at
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and 0 <= summary["eval"]["accuracy"] <= 1
    assert (run / "config.json").is_file() and list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # the schedule continued: the lr at the end is the cosine's end, not a restarted warmup
    assert read_metrics(run)[-2]["train/lr"] < 1e-4

    # Settings that would make it another run are refused; length flags may change. In this process,
    # to save two start-ups: the same main() and one error line with exit code 2 (a refused change of
    # settings through the real command line: test_distributed's "processes 2 → 1").
    argv = args[1:]
    assert "--batch-size 32 → 16" in one_line_error(capsys, "mpp", [*argv, "--resume", "--batch-size", "16"])
    # A checkpoint of another shape is refused with the parameters named.
    other = one_line_error(capsys, "mpp", [*argv, "--resume", "--model", "Ti/4", "--max-steps", "70"])
    assert "another shape" in other and "--model Micro/4" in other

    # The resumed run's final checkpoint, probed (in this process: the CLI runs in test_distributed).
    fewshot.main(["--run", str(run), "--shots", "1", "5", "--seeds", "2"])
    result = json.loads((run / "fewshot.json").read_text())
    assert set(result["results"]) == {"1", "5"} and result["step"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mpp", "supervised"])
def test_short_run_on_real_cifar10_images(tmp_path, cifar10_slice, objective):
    cfg, mpp = parse_args(objective, ["--dataset", str(cifar10_slice), "--model", "Micro/4", "--image-size", "32",
                                      "--output-dir", str(tmp_path / objective), *FAST, "--max-steps", "6"])
    run = train(cfg, mpp)
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 6 and math.isfinite(summary["eval"]["loss"])
    assert config["data"]["class_names"][:2] == ["airplane", "automobile"]
    assert torch.isfinite(torch.tensor(read_metrics(run)[0]["train/loss"]))


FREED_MEMORY = """
import sys, torch
from mpp.run.runtime import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
block = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
held = rss_mb()
del block
print(held - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
def test_cpu_training_keeps_freed_memory_for_the_next_step():
    # By default the 64 MB go back to the OS when freed (and the next step page-faults them in again).
    released = {mode: float(subprocess.run([sys.executable, "-c", FREED_MEMORY, mode], cwd=REPO, check=True,
                                           capture_output=True, text=True).stdout)
                for mode in ("default", "reuse")}
    assert released["default"] > 50 and released["reuse"] < 5, released
