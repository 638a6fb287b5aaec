"""Checkpoints and run directories: atomic writes, the last K kept, shape-checked loading.

A run directory holds `config.json`, `metrics.jsonl`, `tensorboard/` and `checkpoints/ckpt-<step>.pt`.
Each checkpoint carries the full run config, so a model can be rebuilt from the file alone, and
the ViT's weights under timm's names (`"model"`), so they load into timm as they are.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from mpp.errors import UsageError
from mpp.model import ViT, ViTConfig

CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (temporary files of an interrupted save are ignored)."""
    folder = checkpoint_dir(run_dir)
    found = [p for p in folder.glob("ckpt-*.pt") if CKPT_RE.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.search(p.name).group(1)))


TMP_MARK = ".tmp-"  # atomic_write's temporary files: .<name>.tmp-<pid of the writer>


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: a reader (or a resumed run)
    sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: Path, flag: str) -> Path:
    """Create `path` and prove it takes files now, not after hours of work; else a one-line error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output directory '{path}' ({e.strerror or e}): pass a writable {flag}") from e
    return path


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Save `state` as checkpoints/ckpt-<step>.pt atomically; keep the newest `keep` checkpoints."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    remove_killed_writes(folder)
    return path


def remove_killed_writes(folder: Path) -> None:
    """Delete the temporary files of `atomic_write`s that a kill cut short (SIGKILL runs no cleanup).
    They are never read, only take space, a checkpoint's worth each. A file whose writer may still
    be alive stays."""
    for tmp in folder.glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist: pass a run directory or a checkpoint file that exists")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupted file
        raise UsageError(f"checkpoint '{path}' cannot be read ({type(e).__name__}): it is truncated or corrupted") from e


def load_latest(run_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint of a run; an unreadable newer one is reported (one line on
    stderr, from the main process) and skipped: the run resumes from the one before."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path), path
        except UsageError as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr, flush=True)
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_shapes(model: torch.nn.Module, state_dict: dict, source: str, hint: str = "") -> None:
    """Raise a one-line UsageError naming the parameters whose shapes differ (position-embedding
    grids may differ: the ViT resamples them)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape and k != "pos_embed"
    ]
    pos = state_dict.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape[-1] != own["pos_embed"].shape[-1]:
        wrong.insert(0, f"pos_embed {list(pos.shape)} vs {list(own['pos_embed'].shape)}")
    problems = wrong + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UsageError(
            f"{source} holds a model of another shape ({'; '.join(problems[:3])}{more}): "
            + (hint or "build the model with the preset and sizes the checkpoint was trained with")
        )


def load_vit_weights(vit: ViT, state_dict: dict, source: str, hint: str = "") -> None:
    check_shapes(vit, state_dict, source, hint)
    vit.load_state_dict(state_dict)


def vit_from_checkpoint(ckpt: dict, source: str, **overrides) -> ViT:
    """Rebuild the ViT a checkpoint was trained with (overrides, e.g. image_size, change the config)."""
    config = ViTConfig(**{**ckpt["config"]["vit"], **overrides})
    vit = ViT(config)
    load_vit_weights(vit, ckpt["model"], source)
    return vit


def load_run(run_dir: str | Path, **overrides) -> tuple[dict, ViT, Path]:
    """(run config, trained ViT on CPU, checkpoint path) from a run directory or a checkpoint file."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return (ckpt := load_checkpoint(run_dir))["config"], vit_from_checkpoint(ckpt, str(run_dir), **overrides), run_dir
    if not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' does not exist: pass the --output-dir of a pretraining run")
    found = load_latest(run_dir)
    if found is None:
        raise UsageError(
            f"run directory '{run_dir}' has no checkpoint in {checkpoint_dir(run_dir)}: "
            "let the run save one (it does at --save-every steps and at the end) or pass another run"
        )
    ckpt, path = found
    return ckpt["config"], vit_from_checkpoint(ckpt, str(path), **overrides), path
