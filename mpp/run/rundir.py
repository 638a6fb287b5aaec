"""The run directory: its layout (the one definition every writer and reader uses), what may start or
resume in one, and repairs of what a kill can leave torn in it.

    RUN/
      config.json        the run config (`train`, `mpp`, `model`, `kernels`, ...), plus `resumed[]`: one
                         entry per resume; how it started: `config_file` (the --config FILE, absolute, or null),
                         `command_line` (the arguments given, or null from Python), `commit` (git HEAD of the
                         checkout holding mpp, "+dirty" when a tracked file differs, "unknown" outside git) and
                         `versions` (python, torch, triton, timm, accelerate, datasets; null: not installed); each
                         resumed[] entry records the same four of what resumed it. A resume compares only
                         `train`/`mpp` (and precision, processes): these records may differ
                         (a fine-tune's OUT/config.json has the same records and resumed[] entries)
      metrics.jsonl      one JSON line per logged step ({"step": int, "<tag>": float, ...})
      summary.json       written once, at the end: final metrics, steps, wall time
      tensorboard/       TensorBoard events (the run's own with --report-to tensorboard|all; probes add
                         tensorboard/<probe>/)
      wandb/             W&B's files with --report-to wandb|all: one W&B run per process start (mpp.run.trackers)
      checkpoints/       ckpt-<step:08d>.pt (see mpp.run.checkpoint), the newest K kept
      run.lock           who holds the run (see mpp.core.runlock)
      fewshot*.json, linear-probe*.json, knn*.json, finetune*/finetune.json   evaluation reports written beside it

Eval reports written elsewhere are still found by the readers in mpp.report.reports.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import uuid
from pathlib import Path

from mpp.core.errors import UsageError
from mpp.core.files import atomic_write, writable_dir, write_json
from mpp.core.layout import (  # noqa: F401  (the layout's names, read by the run's writers from here)
    CHECKPOINTS,
    CONFIG,
    FINETUNE,
    LOCK,
    METRICS,
    REPORT_GLOBS,
    RUN_MARKERS,
    SUMMARY,
    TENSORBOARD,
)
from mpp.core.provenance import provenance
from mpp.core.runlock import holder_of
from mpp.data.folders import TEST_FOLDERS
from mpp.data.sources import local_folder

# What config.json records of how and by which code a run was started, and each resumed[] entry of
# what resumed it: the --config FILE and the arguments given, the git commit, the versions.
RECORDED = ("config_file", "command_line", "commit", "versions")
CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (temporary files of an interrupted save are ignored)."""
    folder = checkpoint_dir(run_dir)
    found = [p for p in folder.glob("ckpt-*.pt") if CKPT_RE.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)))


def step_of_name(path: str | Path) -> int | None:
    """The step a checkpoint's file name says (ckpt-<step>.pt), or None for any other name."""
    match = CKPT_RE.search(Path(path).name)
    return int(match.group(1)) if match else None


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a path that names a run or one of its checkpoints (RUN/checkpoints/ckpt-N.pt);
    a file anywhere else belongs to the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent



def holds_run(folder: Path) -> bool:
    """Whether `folder` is a pretraining run or a fine-tune's output (this layout), which no export may
    write over. Unlike RUN_MARKERS, a config.json counts only with a `train` section: an export's
    config.json is timm's."""
    if any((folder / name).exists() for name in (CHECKPOINTS, METRICS, FINETUNE)):
        return True
    try:
        recorded = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and "train" in recorded


def changed_settings(saved: dict, now: dict, free: set[str] | frozenset[str] = frozenset(), flag=None) -> list[str]:
    """`--flag old → new` for each setting in `now` that differs from `saved` and is not in `free`:
    the one comparison behind every "this would be a different run, refuse" check."""
    flag = flag or (lambda k: f"--{k.replace('_', '-')}")
    return [f"{flag(k)} {saved.get(k)} → {v}" for k, v in now.items() if k not in free and saved.get(k) != v]


def check_run_dir(config) -> Path:
    """Refuse, writing nothing, to overwrite a run, to resume one that has nothing to resume from, and
    to write a run where the dataset's images are read."""
    run_dir = Path(config.output_dir)
    has_ckpt = bool(list_checkpoints(run_dir))
    if has_ckpt and not config.resume:
        raise UsageError(
            f"run directory '{run_dir}' already holds checkpoints: pass --resume to continue it "
            "or --output-dir for a new run"
        )
    if config.resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in '{checkpoint_dir(run_dir)}': drop --resume to start this run")
    if not config.resume:
        refuse_not_empty(run_dir, "--output-dir", "run")
    data = local_folder(config.dataset)
    splits = [data / name for name in ("train", *TEST_FOLDERS) if (data / name).is_dir()] if data else []
    # A folder without train/ is read whole (mpp.data.folders): a run anywhere inside it would be in its data.
    for folder in splits or ([data] if data else []):
        if run_dir.resolve().is_relative_to(folder.resolve()):  # its files would become data
            where = f"the dataset's {folder.name}/ folder" if splits else f"the dataset folder '{data}'"
            raise UsageError(f"--output-dir '{run_dir}' is inside {where}: pass an --output-dir outside the dataset")
    return run_dir


def refuse_not_empty(folder: Path, flag: str, what: str) -> None:
    """A new run (or fine-tune) starts in an empty or new folder only: its records (config.json,
    metrics.jsonl, TensorBoard events) are never appended to another run's (whose checkpoints were
    deleted, or which died before its first) nor written over a user's own files."""
    try:
        held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return  # unreadable: writable_dir says why
    user = holder_of(folder)
    if not user and held == [LOCK] and not (folder / LOCK).stat().st_size:
        return  # a start refused or stopped before it wrote any record (a clean end empties the lock)
    if not held:
        return
    if user:
        raise UsageError(f"run directory '{folder}' is in use by {user}: wait for that run to end, stop it, "
                         f"or pass another {flag}")
    # e.g. a start that wrote records but no checkpoint (out of memory, a full disk)
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    raise UsageError(f"{flag} '{folder}' is not empty ({shown}) and holds nothing to resume: a new {what} "
                     f"starts in an empty or new folder, so that no records but its own are written there: pass "
                     f"a new {flag}, or delete '{folder}' if nothing in it is needed")


def check_same_run(run_dir: Path, recorded: dict, checkpoint: dict) -> None:
    """Refuse to resume from a checkpoint of another run than the one whose records (config.json,
    metrics.jsonl) the directory holds: e.g. checkpoints copied in from another run's directory."""
    mine, theirs = recorded.get("run_id"), checkpoint.get("run_id")
    if mine and theirs and mine != theirs:
        raise UsageError(f"the checkpoints in '{checkpoint_dir(run_dir)}' are of run {theirs[:8]}, but the records "
                         f"of '{run_dir}' (config.json, metrics.jsonl) are of run {mine[:8]}: resume each run in "
                         "its own directory (copy a run's directory whole)")


def prepare_run_dir(config) -> Path:
    """`check_run_dir`, then the run directory created and proved writable."""
    return writable_dir(check_run_dir(config), "--output-dir")


# Settings a resumed run may change: they do not alter what it computes, only how long and how it reports.
RESUMABLE = {"max_steps", "epochs", "log_every", "save_every", "keep_checkpoints", "eval_every", "num_workers",
             "cpu_threads", "kernels", "kernel_cache", "compile", "resume", "output_dir", "strict_images", "report_to",
             # the in-run few-shot probe reads the model and changes nothing (mpp.eval.fewshot_monitor)
             "fewshot_every", "fewshot_max_images", "fewshot_dataset"}


def check_resume(saved: dict, run_cfg: dict, num_processes: int, source: str) -> None:
    """Refuse to resume a run with settings that would make it a different run."""
    sections = ("train", "mpp") if run_cfg["train"]["objective"] == "mpp" else ("train",)
    changed = [c for section in sections for c in changed_settings(saved[section], run_cfg[section], RESUMABLE)]
    if saved.get("precision", run_cfg["precision"]) != run_cfg["precision"]:  # e.g. the GPU default changed
        changed.append(f"--mixed-precision {saved['precision']} → {run_cfg['precision']}")
    if saved.get("num_processes", num_processes) != num_processes:
        changed.append(f"processes {saved['num_processes']} → {num_processes}")
    if run_cfg["train"].get("streaming") and saved["train"].get("num_workers") != run_cfg["train"].get("num_workers"):
        # a stream's shards are split among the loader workers, each drawing its own augmentations
        # (mpp.data.table_readers.HubImageStream): another count reads other images in another order
        changed.append(f"--num-workers {saved['train'].get('num_workers')} → {run_cfg['train'].get('num_workers')} "
                       "(a streamed run's loader workers split its shards)")
    held, now = (saved.get("data") or {}).get("holdout"), run_cfg["data"]["holdout"]
    same = ("images", "seed", "fingerprint")  # which images are held out (mpp.data.holdout), not how the log words it
    held_images, now_images = ([(h or {}).get(k) for k in same] for h in (held, now))
    if "holdout" in (saved.get("data") or {}) and held_images != now_images:
        # other held-out images: the run would train on images it evaluated on, or evaluate on others
        changed.append(f"held-out split '{(held or {}).get('rule', 'the test split')}' → "
                       f"'{(now or {}).get('rule', 'the test split')}' (the dataset changed)")
    if changed:
        raise UsageError(f"{source} was trained with other settings ({'; '.join(changed)}): resume with the "
                         "run's own settings (see its config.json) or pass a new --output-dir")


def diverged(step: int, run_dir: Path, lr: float, peak_lr: float, what: str) -> str:
    """The one line for a run whose loss or weights stopped being finite, with advice that works:
    --resume keeps the run's settings, and so would diverge again."""
    last = list_checkpoints(run_dir)
    where = (f"the newest checkpoint, {last[-1]}, holds finite weights but may already be diverging"
             if last else "no checkpoint was saved")
    return (f"{what} step {step} (lr {lr:.3g}); {where}: start a new run (another --output-dir) with a lower --lr "
            f"(e.g. {peak_lr / 2:g}), more --warmup-steps, a smaller --grad-clip or --mixed-precision no (fp32); "
            "--resume keeps this run's settings and would diverge again")


def read_run_config(run_dir: Path, from_checkpoint: dict) -> dict:
    """The run's config.json; when it is missing or torn (a kill while the run started), the copy every
    checkpoint carries, with a note."""
    path = run_dir / CONFIG
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
    atomic_write(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))


def run_config(config, mpp, vit, data_info, holdout: dict | None, invocation) -> dict:
    """Everything needed to rebuild and compare this run, saved in config.json and every checkpoint."""
    return {
        "run_id": uuid.uuid4().hex,  # which run a directory's records and checkpoints belong to (a resume keeps it)
        "train": dataclasses.asdict(config),
        "mpp": dataclasses.asdict(mpp),
        "vit": dataclasses.asdict(vit.config),
        "data": {"num_classes": data_info.num_classes, "labelled": data_info.labelled, "layout": data_info.layout,
                 "class_names": None if data_info.class_names is None else list(data_info.class_names),
                 # how the held-out split was carved from train (mpp.data.holdout); None: a test split
                 "holdout": holdout},
        "command": " ".join(sys.argv),
        **invocation.record(),  # config_file, command_line
        **provenance(),  # commit, versions
    }


def record_resume(run_dir: Path, saved: dict, run_cfg: dict, step: int, config) -> None:
    """A resume at `step`, recorded in the run's original config.json (what resumed it, and the code
    that did), after checking the records are this run's own; the metrics logged after its checkpoint
    are dropped. `saved`: the checkpoint's run config; `run_cfg`: the resuming process's."""
    original = read_run_config(run_dir, saved)
    check_same_run(run_dir, original, saved)
    original.setdefault("resumed", []).append({
        "step": step, "command": run_cfg["command"], "max_steps": config.max_steps, "epochs": config.epochs,
        "kernels": run_cfg["kernels"], **{k: run_cfg[k] for k in RECORDED}})
    write_json(run_dir / CONFIG, original)
    trim_metrics(run_dir / METRICS, step)
