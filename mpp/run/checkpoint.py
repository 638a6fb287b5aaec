"""Checkpoints: written atomically (mpp.core.files), the last K kept, loaded weights-only and shape-checked.

Where they live in a run directory is mpp.run.rundir's (`checkpoints/ckpt-<step>.pt`). Each checkpoint
carries the full run config, so a model can be rebuilt from the file alone, and the ViT's weights under
timm's names (`"model"`), so they load into timm as they are.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.torch_version import TorchVersion

from mpp.core.errors import UsageError
from mpp.core.files import atomic_write, remove_killed_writes
from mpp.model import weights
from mpp.model.ops import TORCH, Kernels
from mpp.model.vit import ViT, ViTConfig
from mpp.run.rundir import checkpoint_dir, checkpoint_path, list_checkpoints

KernelsFor = Callable[[ViTConfig], Kernels]  # the kernels a ViT of this config is built with

def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    """Save `state` as checkpoints/ckpt-<step>.pt atomically; keep the newest `keep` checkpoints.

    A failed write (a full disk, a quota, permissions) raises a one-line UsageError that says what
    to free; the older checkpoints are deleted only after the new one is complete, so the newest
    complete checkpoint always survives."""
    folder = checkpoint_dir(run_dir)
    path = checkpoint_path(run_dir, step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise UsageError(save_failure(folder, step, state, e)) from e
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    remove_killed_writes(folder)
    return path


def save_failure(folder: Path, step: int, state: dict, error: OSError) -> str:
    """The one line for a checkpoint that could not be written: why, how much room it needs, and
    which complete checkpoint is left to resume from."""
    import shutil

    need = sum(t.numel() * t.element_size() for t in _tensors(state)) / 2**20  # MiB, a lower bound
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    kept = list_checkpoints(folder.parent)
    left = f"the newest complete one, {kept[-1].name}, is intact" if kept else "no earlier checkpoint exists"
    # without a checkpoint there is nothing to resume: the run starts again, in a folder of its own
    again = ("rerun the same command with --resume" if kept else
             f"start the run again with a new --output-dir (or after deleting '{folder.parent}')")
    return (f"could not write the step-{step} checkpoint in {folder} ({error.strerror or error}; it needs about "
            f"{need:,.0f} MiB{free}; {left}): free at least that much space on that disk (or fix the folder's "
            f"permissions), then {again}")


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# What weights-only loading must accept beyond tensors and plain data, and nothing more. Every
# checkpoint's config records torch.__version__, a TorchVersion (a str subclass); checkpoints written
# before rng_state stored plain lists hold numpy's RNG state, a uint32 ndarray (numpy 2 pickles its
# rebuild function as numpy._core..., numpy 1 as numpy.core...). All of them only build data: the
# unpickler still refuses every other global, so no file can name a function to call.
_NP_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy.{_core,core}.multiarray._reconstruct
CHECKPOINT_GLOBALS = [
    TorchVersion,
    (_NP_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_NP_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the keys' dtype
]
_REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([A-Za-z_][\w.]*[\w])")  # in torch's message: "... GLOBAL posix.system ..."


class BadCheckpoint(UsageError):
    """A checkpoint file that cannot be used. `kind`: "unreadable" (torn, corrupted, not a checkpoint) or
    "unsafe" (it needs globals that weights-only loading refuses: loading it could run code);
    `reason`: why, in a few words (a note in compare.py's report)."""

    def __init__(self, message: str, kind: str, reason: str) -> None:
        super().__init__(message)
        self.kind, self.reason = kind, reason


def unreadable(path: Path, reason: str) -> BadCheckpoint:
    return BadCheckpoint(f"checkpoint '{path}' cannot be read ({reason}): it is truncated or corrupted",
                         "unreadable", reason)


def unsafe(path: Path, name: str) -> BadCheckpoint:
    reason = f"it needs the global '{name}'"
    return BadCheckpoint(f"checkpoint '{path}' is not a safe checkpoint ({reason}, which weights-only loading "
                         "refuses): load only checkpoints written by this repository, or re-save it from a "
                         "trusted copy",
                         "unsafe", reason)


def load_weights_only(path: Path, **kwargs):
    """torch.load restricted to tensors and plain data, on the CPU. A legacy (not zip) pickle makes
    torch warn of its protocol: held back, so a refusal stays one line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint's dict, loaded weights-only: a file may hold tensors and plain data, never code
    to run (issue #15), so a checkpoint from anywhere is safe to open. `mmap` maps the tensors instead
    of reading them: only those used come off the disk."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist: pass a run directory or a checkpoint file that exists")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = load_weights_only(path, mmap=mmap)
    except pickle.UnpicklingError as e:  # a refused global, or bytes that are no pickle at all
        match = _REFUSED_GLOBAL.search(str(e))
        raise (unsafe(path, match.group(1)) if match else unreadable(path, type(e).__name__)) from e
    except Exception as e:  # truncated (RuntimeError from the zip reader), empty (EOFError), not a torch file
        raise unreadable(path, type(e).__name__) from e
    if not isinstance(state, dict):  # a bare tensor or list: safe, but no checkpoint, and callers index it
        raise BadCheckpoint(f"checkpoint '{path}' holds a {type(state).__name__}, not a checkpoint's dict: "
                            "pass a checkpoint written by this repository", "unreadable", f"a {type(state).__name__}")
    return state


def warn_skipped(path: Path, error: BadCheckpoint) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"warning: {error}; falling back to the previous checkpoint", file=sys.stderr, flush=True)


def load_latest(run_dir: str | Path, mmap: bool = False,
                skipped: Callable[[Path, BadCheckpoint], None] = warn_skipped) -> tuple[dict, Path] | None:
    """The newest usable checkpoint of a run and its path, or None when it has none. One that cannot
    be used, torn or unsafe, is reported (`skipped`; by default one line on stderr) and passed over
    for the one before: a copy cut short, or a file dropped in, costs the steps since the previous
    one. When no checkpoint is usable and one was unsafe, that one is raised: "no checkpoint" would
    hide why, and the file deserves a look before anything else runs."""
    passed: list[tuple[Path, BadCheckpoint]] = []
    found = None
    for path in reversed(list_checkpoints(run_dir)):
        try:
            found = load_checkpoint(path, mmap=mmap), path
            break
        except BadCheckpoint as e:
            # Kept as a fresh copy: the raised one's traceback holds this frame and, through it, the
            # caller's, so keeping it here would be a cycle that keeps the trainer's locals (its
            # loaders' worker processes) alive until exit, where joining those workers hangs.
            passed.append((path, BadCheckpoint(str(e), e.kind, e.reason)))
    refused = next((e for _, e in passed if e.kind == "unsafe"), None) if found is None else None
    for path, e in passed:  # reported only now, so the unsafe one raised is not also a warning
        if e is not refused:
            skipped(path, e)
    if refused is not None:
        raise refused
    return found


def rng_state() -> dict:
    """Every generator's state, in types weights-only loading accepts: Python's is a tuple of ints and
    torch's are tensors; numpy's holds an ndarray, so it is stored as a list (set_rng_state rebuilds it)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"algorithm": str(algorithm), "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_state(saved) -> tuple:
    """np.random.set_state's tuple from what rng_state stored; checkpoints written before it stored
    lists hold numpy's own tuple."""
    if not isinstance(saved, dict):
        return saved
    keys = np.asarray(saved["keys"], dtype=np.uint32)
    return saved["algorithm"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # setstate insists on tuples
    np.random.set_state(numpy_state(state["numpy"]))
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


def vit_from_checkpoint(ckpt: dict, source: str, kernels_for: KernelsFor | None = None, **overrides) -> ViT:
    """Rebuild the ViT a checkpoint was trained with (overrides, e.g. image_size, change the config).
    `kernels_for(config)` gives the kernels to build it with (decided at its shapes); PyTorch's ops by default.
    Its weights are checked against the config it stores (mpp.model.weights) before anything is built."""
    fix = "pass another checkpoint of the run (an earlier one) or a fresh copy of this one"
    stored = ckpt["config"].get("vit") if isinstance(ckpt.get("config"), dict) else None
    for part, value in (("ViT config (config.vit)", stored), ("model", ckpt.get("model"))):
        if not isinstance(value, dict):
            raise UsageError(f"checkpoint '{source}' has no {part}, which every checkpoint of a run holds: "
                             "pass a checkpoint written by this repository's training")
    config = weights.vit_config_of(stored, f"checkpoint '{source}'", fix)
    weights.check(ckpt["model"], config, f"checkpoint '{source}'", fix)
    config = dataclasses.replace(config, **overrides).validate()
    vit = ViT(config, kernels_for(config) if kernels_for else TORCH)
    load_vit_weights(vit, ckpt["model"], source)
    return vit


def load_run(run_dir: str | Path, kernels_for: KernelsFor | None = None, **overrides) -> tuple[dict, ViT, Path]:
    """(run config, trained ViT on CPU, checkpoint path) from a run directory or a checkpoint file."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        ckpt = load_checkpoint(run_dir)
        return ckpt["config"], vit_from_checkpoint(ckpt, str(run_dir), kernels_for, **overrides), run_dir
    if not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' does not exist: pass the --output-dir of a pretraining run")
    found = load_latest(run_dir)
    if found is None:
        raise UsageError(
            f"run directory '{run_dir}' has no checkpoint in {checkpoint_dir(run_dir)}: "
            "let the run save one (it does at --save-every steps and at the end) or pass another run"
        )
    ckpt, path = found
    return ckpt["config"], vit_from_checkpoint(ckpt, str(path), kernels_for, **overrides), path
