"""Where a fine-tune starts, and which --resume may continue it.

The starting point is a pretrained run's newest readable checkpoint (or the checkpoint file --run
names), identified by its content (sha256), or random weights (scratch). A fine-tune records it in
OUTPUT_DIR/finetune.json with every training as it finishes; a --resume whose --run now gives
another checkpoint, or whose settings would compute something else, is refused rather than mixing
the two into one average.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mpp.core.errors import BadField, UsageError
from mpp.core.files import writable_dir, write_json
from mpp.data.sources import DEFAULT_DATASET
from mpp.eval import timm_io
from mpp.model.vit import ViT, vit_config
from mpp.run import checkpoint as ckpt_io
from mpp.run import rundir
from mpp.run.records import FinetuneReport, read_record
from mpp.train.finetune_config import FinetuneConfig

SCRATCH_MODEL = "Micro/4"
# Settings that do not change what a fine-tune computes: a --resume may differ in them. --run is
# among them because the starting checkpoint is compared by content instead (check_same_start): a
# resume may name the same checkpoint by its file rather than by its run, but not a newer one.
RESUMABLE = {"num_workers", "cpu_threads", "kernels", "kernel_cache", "compile", "output_dir", "resume", "log_every",
             "seeds", "run", "report_to"}


def starting_model(config: FinetuneConfig) -> tuple[ViT, dict | None, str, dict]:
    """(ViT with a fresh zero-initialised head still to size, the pretrained run's config or None, dataset,
    the starting point as finetune.json records it)."""
    try:
        return _starting_model(config)
    except BadField as e:  # the model's own terms, said in the flag that set the field
        if e.field != "image_size":
            raise
        raise e.flag_advised("--image-size") from e


def _starting_model(config: FinetuneConfig) -> tuple[ViT, dict | None, str, dict]:
    overrides = {"dropout": config.dropout}
    if config.image_size:
        overrides["image_size"] = config.image_size
    if timm_io.is_timm_source(config.run):
        imported, vit, start = import_start(config.run, **overrides)
        return vit, imported, config.dataset or DEFAULT_DATASET, start
    if config.run:
        run_cfg, vit, start = load_start(config.run, **overrides)
        return vit, run_cfg, config.dataset or run_cfg["train"]["dataset"], start
    torch.manual_seed(0)  # replaced per seed in Finetuner.train; this one only sizes the model
    vit = ViT(vit_config(config.model or SCRATCH_MODEL, image_size=config.image_size or None, dropout=config.dropout))
    start = {"init": "scratch", "checkpoint": None, "step": None, "sha256": None}  # each seed draws its own weights
    return vit, None, config.dataset or DEFAULT_DATASET, start


def pretrained_source(run: str) -> str | None:
    """What finetune.json's `pretrained` names: the run directory of one of our runs (or of its
    checkpoint file), a timm source as itself (timm:NAME, or the absolute path), None from scratch."""
    if not run:
        return None
    if timm_io.is_timm_source(run):
        return run if run.startswith(timm_io.PREFIX) else str(Path(run).expanduser().absolute())
    return str(rundir.run_dir_of(Path(run)))


def load_start(run: str, **overrides) -> tuple[dict, ViT, dict]:
    """(run config, ViT, starting point) of --run: the run's newest readable checkpoint, or the file it names."""
    path = Path(run)
    if path.is_file():  # a file's name may be anything (a copy, a rename): its step is read from inside
        ckpt = ckpt_io.load_checkpoint(path)
        run_cfg, vit, step = ckpt["config"], ckpt_io.vit_from_checkpoint(ckpt, run, **overrides), ckpt.get("step")
    else:
        run_cfg, vit, path = ckpt_io.load_run(run, **overrides)
        step = rundir.step_of_name(path)  # a run's checkpoints are all ckpt-<step>.pt
    return run_cfg, vit, {"init": "pretrained", "checkpoint": str(path), "step": step, "sha256": file_sha256(path)}


def import_start(run: str, **overrides) -> tuple[dict, ViT, dict]:
    """(the import's record, ViT, starting point) of a timm --run (mpp.eval.timm_io): identified by the sha256
    of its weights, so a --resume may name the same weights by a copied file or folder, but no others."""
    imported = timm_io.load_source(run, overrides.get("image_size"))
    vit = imported.rebuilt(**overrides)
    digest = hashlib.sha256()
    for name, tensor in sorted(vit.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return imported.record(), vit, {"init": "pretrained", "checkpoint": run, "step": None, "sha256": digest.hexdigest()}


def file_sha256(path: Path) -> str:
    """The file's content identity, which survives a copy or a rename; streamed, so a B/16 checkpoint
    (~350 MB) costs a fraction of a second and no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_start(start: dict) -> str:
    return "scratch (random weights)" if start["init"] == "scratch" else f"{start['checkpoint']} (step {start['step']})"


def check_same_start(out: Path, recorded: dict | None, current: dict) -> None:
    """Refuse a --resume whose starting point is not the one the recorded trainings started from:
    seeds fine-tuned from different checkpoints would be averaged as one model."""
    if recorded is None:  # written before finetune.json recorded it: nothing proves the recorded seeds match
        if current["init"] == "scratch":
            return  # from scratch every seed draws its weights from its own seed: nothing to mix
        raise UsageError(f"'{out}' does not record which checkpoint it was fine-tuned from (an older finetune.json), "
                         f"so resuming from {describe_start(current)} could mix checkpoints: pass a new --output-dir")
    if recorded["init"] == current["init"] == "scratch" or (
            recorded["init"] == current["init"] == "pretrained" and recorded["sha256"] == current["sha256"]):
        return
    now = "--run is now " + describe_start(current) if current["init"] == "pretrained" else "there is no --run now"
    if recorded["init"] == "scratch":
        fix = "drop --run to finish it"
    elif still_there(recorded):
        fix = f"pass --run {recorded['checkpoint']} to finish it"
    else:
        fix = (f"{recorded['checkpoint']} is gone or changed, so pass --run a copy of it "
               f"(sha256 {recorded['sha256'][:12]}…) to finish it")
    raise UsageError(f"'{out}' was fine-tuned from {describe_start(recorded)} but {now}: {fix}, "
                     f"or pass a new --output-dir to fine-tune {'from ' if current['init'] == 'scratch' else ''}"
                     f"{describe_start(current)}")


def still_there(start: dict) -> bool:
    """Whether the recorded checkpoint file still holds the bytes the fine-tune started from."""
    path = Path(start["checkpoint"])
    return path.is_file() and file_sha256(path) == start["sha256"]


def recorded_results(out: Path, config: FinetuneConfig, start: dict) -> FinetuneReport | None:
    """The results recorded so far (with --resume), after refusing to overwrite them or to resume them
    from another starting point; checked before the data is loaded, so a refusal comes at once."""
    path = out / rundir.FINETUNE
    if path.is_file() and not config.resume:
        raise UsageError(f"'{out}' already holds fine-tuning results: pass --resume to finish them "
                         "or --output-dir for a new fine-tune")
    if config.resume and not path.is_file():
        raise UsageError(f"--resume: no {rundir.FINETUNE} in '{out}': drop --resume to start this fine-tune")
    if not config.resume:
        rundir.refuse_not_empty(out, "--output-dir", "fine-tune")
    if not config.resume:
        return None
    recorded = read_record(path, FinetuneReport)  # a malformed file: one line naming it
    check_same_start(out, recorded.start.to_json() if recorded.start else None, start)
    return recorded


def prepare_output(out: Path, config: FinetuneConfig, settings: dict, run_cfg: dict, accelerator,
                   recorded: FinetuneReport | None) -> None:
    """Refuse to mix settings with the recorded results; a new fine-tune's config.json, or a resume's
    entry in its resumed[] (as a pretraining run records one)."""
    if recorded is not None:
        saved = recorded.config or {}
        as_saved = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}  # JSON has no tuples
        changed = rundir.changed_settings(saved, as_saved, RESUMABLE)
        if changed:
            raise UsageError(f"'{out}' was fine-tuned with other settings ({'; '.join(changed)}): resume with "
                             "the same flags or pass a new --output-dir")
    if not accelerator.is_main_process:
        return
    if not config.resume:
        write_json(writable_dir(out, "--output-dir") / rundir.CONFIG, run_cfg)
        return
    done = len(recorded.trainings or {}) if recorded else 0
    try:
        written = json.loads((out / rundir.CONFIG).read_text())
    except (OSError, ValueError):  # missing or torn (a kill as it was written): the record starts again here
        written = None
    if not isinstance(written, dict):
        written = dict(run_cfg)
    written.setdefault("resumed", []).append({  # what resumed it, and the code that did
        "trainings_done": done, "command": run_cfg["command"], **{k: run_cfg[k] for k in rundir.RECORDED}})
    write_json(out / rundir.CONFIG, written)
