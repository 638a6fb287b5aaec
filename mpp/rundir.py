"""The run directory of a training run: created once, resumed only as the same run, records kept whole.

A run directory holds `config.json` (the run config, plus one entry per resume), `metrics.jsonl`
(one JSON line per logged step), `summary.json` (at the end), `tensorboard/`, `checkpoints/` (see
mpp.checkpoint) and `run.lock` (see mpp.runlock). This module decides what may start or resume in
one, and repairs what a kill can leave torn in it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mpp import checkpoint as ckpt_io
from mpp.errors import UsageError
from mpp.folders import TEST_FOLDERS


def prepare_run_dir(config) -> Path:
    """Refuse to overwrite a run, and to resume one that has nothing to resume from."""
    run_dir = Path(config.output_dir)
    has_ckpt = bool(ckpt_io.list_checkpoints(run_dir))
    if has_ckpt and not config.resume:
        raise UsageError(
            f"run directory '{run_dir}' already holds checkpoints: pass --resume to continue it "
            "or --output-dir for a new run"
        )
    if config.resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in '{ckpt_io.checkpoint_dir(run_dir)}': drop --resume to start this run")
    data = Path(config.dataset).expanduser()
    for split in (data / name for name in ("train", *TEST_FOLDERS)) if data.is_dir() else ():
        if split.is_dir() and run_dir.resolve().is_relative_to(split.resolve()):  # its files would become data
            raise UsageError(f"--output-dir '{run_dir}' is inside the dataset's {split.name}/ folder: "
                             "pass an --output-dir outside the dataset")
    return ckpt_io.writable_dir(run_dir, "--output-dir")


# Settings a resumed run may change: they do not alter what it computes, only how long and how it reports.
RESUMABLE = {"max_steps", "epochs", "log_every", "save_every", "keep_checkpoints", "eval_every", "num_workers",
             "cpu_threads", "kernels", "kernel_cache", "compile", "resume", "output_dir", "strict_images"}


def check_resume(saved: dict, run_cfg: dict, num_processes: int, source: str) -> None:
    """Refuse to resume a run with settings that would make it a different run."""
    sections = ("train", "mpp") if run_cfg["train"]["objective"] == "mpp" else ("train",)
    changed = [f"--{k.replace('_', '-')} {saved[section].get(k)} → {v}"
               for section in sections for k, v in run_cfg[section].items()
               if k not in RESUMABLE and saved[section].get(k) != v]
    if saved.get("precision", run_cfg["precision"]) != run_cfg["precision"]:  # e.g. the GPU default changed
        changed.append(f"--mixed-precision {saved['precision']} → {run_cfg['precision']}")
    if saved.get("num_processes", num_processes) != num_processes:
        changed.append(f"processes {saved['num_processes']} → {num_processes}")
    if changed:
        raise UsageError(f"{source} was trained with other settings ({'; '.join(changed)}): resume with the "
                         "run's own settings (see its config.json) or pass a new --output-dir")


def diverged(step: int, run_dir: Path, lr: float, peak_lr: float, what: str) -> str:
    """The one line for a run whose loss or weights stopped being finite, with advice that works:
    --resume keeps the run's settings, and so would diverge again."""
    last = ckpt_io.list_checkpoints(run_dir)
    where = (f"the newest checkpoint, {last[-1]}, holds finite weights but may already be diverging"
             if last else "no checkpoint was saved")
    return (f"{what} step {step} (lr {lr:.3g}); {where}: start a new run (another --output-dir) with a lower --lr "
            f"(e.g. {peak_lr / 2:g}), more --warmup-steps, a smaller --grad-clip or --mixed-precision no (fp32); "
            "--resume keeps this run's settings and would diverge again")


def read_run_config(run_dir: Path, from_checkpoint: dict) -> dict:
    """The run's config.json; when it is missing or torn (a kill while the run started), the copy every
    checkpoint carries, with a note."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        if isinstance(config, dict) and "train" in config:
            return config
    except (OSError, ValueError):
        pass
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {path} is missing or unreadable; rewriting it from the checkpoint's copy of the run config",
              file=sys.stderr, flush=True)
    return dict(from_checkpoint)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from: those steps are trained again.
    A line a kill cut short (not JSON) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # torn or foreign: never read again
    ckpt_io.atomic_write(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))
