"""Fine-tuning a pretrained run, or training from scratch, on labelled images (the ViT paper's protocol).

The pretrained head is replaced by a zero-initialised linear layer; SGD with momentum 0.9, no weight
decay, linear warmup then cosine decay, gradient clipping at global norm 1. The learning rate is
picked from a grid by accuracy on a dev split held out of the labelled training data (never the test
split); then the model is trained on all the labelled data at that rate, once per seed, and scored
once on the test split. A new --image-size keeps the patch size and resamples the position
embeddings in 2-D.

    accelerate launch eval/finetune.py --run runs/mpp                 # fine-tune a pretrained run
    accelerate launch eval/finetune.py --model Micro/4 --output-dir runs/scratch   # from scratch

Each training (a grid point or a seed) is recorded in OUTPUT_DIR/finetune.json as it finishes, so
`--resume` after an interruption retrains only what was not finished. It also records the starting
point (the checkpoint's path, step and sha256, or scratch): a `--resume` whose --run now gives another
checkpoint (the pretraining saved a newer one) is refused rather than mixing the two. OUTPUT_DIR also
holds config.json, TensorBoard events (one sub-folder per training) and the seed-0 fine-tuned weights
as a checkpoint that eval/fewshot.py and eval/linear_probe.py read like any run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mpp import checkpoint as ckpt_io
from mpp import files, rundir
from mpp.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    Parser,
    Range,
    check_ranges,
)
from mpp.data import DEFAULT_DATASET, build_dataset, normalize
from mpp.errors import UsageError, cli_main
from mpp.kernels import KernelPolicy, RunShapes
from mpp.model import ViT, vit_config
from mpp.ops import Kernels
from mpp.runlock import RunLock
from mpp.runtime import autocast_dtype, choose_kernels, compile_blocks, make_accelerator
from mpp.stopping import end_workers_at_exit
from mpp.train import lr_factor

RESULTS = "finetune.json"
SCRATCH_MODEL = "Micro/4"


@dataclass(frozen=True)
class FinetuneConfig:
    run: str = ""  # pretrained run directory or checkpoint file; empty: train from scratch (a random --model)
    model: str = ""  # ViT preset when training from scratch; empty: Micro/4 (a --run brings its own)
    dataset: str = ""  # digits | PATH to an image folder | hf:NAME; empty: the run's pretraining dataset (digits from scratch)
    image_size: int = 0  # fine-tuning resolution; 0: the pretrained one (another size resamples the position embeddings)
    train_fraction: float = 1.0  # labelled subset: this fraction of each class of the training split
    train_per_class: int = 0  # labelled subset: this many images of each class instead (0: use --train-fraction)
    subset_seed: int = 0  # draws the labelled subset and the dev split: fixed, so every model sees the same labels
    dev_fraction: float = 0.1  # of the labelled data, held out (stratified) to choose the lr (the paper: 2% of CIFAR)
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # learning-rate grid (the paper's CIFAR grid); one value: no grid
    seeds: int = 3  # final trainings at the chosen lr, seeds 0..N-1 (the grid trains with seed 0)
    batch_size: int = 512  # global batch, across processes (the paper's)
    steps: int = 500  # optimizer steps of every training (grid and final), unless --epochs is set
    epochs: float = 0.0  # if > 0: this many passes over the labelled data instead of --steps
    warmup_steps: int = 50  # linear warmup from 0, then cosine decay to 0
    momentum: float = 0.9  # SGD momentum (the paper's)
    grad_clip: float = 1.0  # clip the global gradient norm to this (the paper's 1); 0 disables
    layer_decay: float = 1.0  # layer-wise lr decay: block i of L gets lr × decay^(L − i); 1: off
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup: float = 0.0  # timm Mixup alpha; 0: off
    cutmix: float = 0.0  # timm CutMix alpha; 0: off
    randaugment: str = ""  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1; empty: off
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range (inception crop)
    hflip: bool = True  # random horizontal flips
    dropout: float = 0.0  # ViT dropout during fine-tuning
    num_workers: int = 2  # DataLoader worker processes per training process
    cpu_threads: int = 0  # torch threads per process on CPU; 0: available cores / local processes
    mixed_precision: str = ""  # no | fp16 | bf16; empty: Accelerate's config if any, else bf16 on a CUDA GPU with bf16, fp32 elsewhere
    kernels: str = ""  # attention/LayerNorm: auto (ours where verified and faster) | triton | torch; empty: $MPP_KERNELS or auto
    kernel_cache: str = ""  # folder caching the kernels' verdicts; off: measure every run; empty: $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels
    compile: bool = False  # torch.compile the ViT's blocks
    output_dir: str = ""  # results, TensorBoard, fine-tuned weights; empty: RUN/finetune or runs/finetune-scratch
    resume: bool = False  # keep the trainings already recorded in OUTPUT_DIR/finetune.json, run the rest
    log_every: int = 25  # steps between logged training metrics

    # What each numeric field accepts (checked at parse time and by validate(); mpp.config.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "image_size": NON_NEGATIVE, "train_fraction": Range(0, 1, low_open=True), "train_per_class": NON_NEGATIVE,
        "subset_seed": SEED, "dev_fraction": Range(0, 1, low_open=True, high_open=True), "lrs": POSITIVE,
        "seeds": Range(1, 1000), "batch_size": AT_LEAST_1, "steps": AT_LEAST_1, "epochs": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE, "momentum": OPEN_FRACTION, "grad_clip": NON_NEGATIVE,
        "layer_decay": Range(0, 1, low_open=True), "label_smoothing": OPEN_FRACTION, "mixup": NON_NEGATIVE,
        "cutmix": NON_NEGATIVE, "crop_scale": Range(0, 1, low_open=True), "dropout": OPEN_FRACTION,
        "num_workers": Range(0, 256), "cpu_threads": Range(0, 4096), "log_every": AT_LEAST_1,
    }

    def validate(self) -> FinetuneConfig:
        if self.run and self.model:
            raise UsageError("--model builds a from-scratch model: drop it (a --run brings its own architecture)")
        if not self.lrs:
            raise UsageError("--lrs is empty: pass learning rates, e.g. --lrs 0.003 0.01 0.03")
        check_ranges(self)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UsageError(f"--crop-scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        return self


# Settings that do not change what a fine-tune computes: a --resume may differ in them. --run is
# among them because the starting checkpoint is compared by content instead (check_same_start): a
# resume may name the same checkpoint by its file rather than by its run, but not a newer one.
RESUMABLE = {"num_workers", "cpu_threads", "kernels", "kernel_cache", "compile", "output_dir", "resume", "log_every", "seeds", "run"}


def stratified_split(labels: np.ndarray, fraction: float, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest) indices: `per_class` (or round(fraction × n_c), at least 1) of every class c."""
    rng = np.random.default_rng(seed)
    picked, rest = [], []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        n = per_class or max(1, round(fraction * len(pool)))
        if n > len(pool):
            raise UsageError(f"class {c} has {len(pool)} training images, fewer than {n}: "
                             "pass a smaller --train-per-class")
        picked.append(pool[:n])
        rest.append(pool[n:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


def split_labelled(labels: np.ndarray, config: FinetuneConfig) -> dict[str, np.ndarray]:
    """Indices into the training split: the labelled subset ("train"), and its parts "fit" and "dev".

    The lr grid trains on "fit" and scores on "dev"; the final trainings use all of "train"."""
    if config.train_per_class or config.train_fraction < 1:
        labelled, _ = stratified_split(labels, config.train_fraction, config.train_per_class, config.subset_seed)
    else:
        labelled = np.arange(len(labels))
    dev_pos, fit_pos = stratified_split(labels[labelled], config.dev_fraction, 0, config.subset_seed + 1)
    if len(fit_pos) == 0:
        raise UsageError(f"the labelled set ({len(labelled)} images) leaves nothing to train on after the dev split: "
                         "pass a larger --train-fraction / --train-per-class or a smaller --dev-fraction")
    return {"train": labelled, "fit": labelled[fit_pos], "dev": labelled[dev_pos]}


def train_transform(config: FinetuneConfig, image_size: int):
    """The training augmentation: timm's RandAugment (on PIL images) first, if asked, then crop + flip."""
    from mpp.data import train_transform as crop_flip

    base = crop_flip(image_size, config.crop_scale, config.hflip)
    if not config.randaugment:
        return base
    from timm.data.auto_augment import rand_augment_transform
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

    try:
        augment = rand_augment_transform(config.randaugment, {"img_mean": (128, 128, 128)})
    except Exception as e:  # timm asserts on a malformed spec
        raise UsageError(f"--randaugment '{config.randaugment}' is not a timm RandAugment spec ({e}): "
                         "pass e.g. rand-m9-mstd0.5-inc1") from e

    def transform(image: torch.Tensor) -> torch.Tensor:  # uint8 [3, H, W] -> float32 [3, S, S]
        return base(pil_to_tensor(augment(to_pil_image(image))))

    return transform


def optimizer_for(vit: ViT, config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum and no weight decay; with --layer-decay, timm's per-depth lr scales."""
    if config.layer_decay < 1:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(vit, weight_decay=0.0, layer_decay=config.layer_decay)
        for g in groups:  # LambdaLR scales each group's starting lr, so the depth scale goes in here
            g["lr"] = lr * g.pop("lr_scale", 1.0)
    else:
        groups = [{"params": [p for p in vit.parameters() if p.requires_grad], "lr": lr}]
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=0.0)


@torch.no_grad()
def accuracy(vit: torch.nn.Module, loader: DataLoader, accelerator) -> tuple[float, int]:
    """(top-1 accuracy, images scored) over the loader, gathered from every process without the
    duplicates that even batches pad the last one with."""
    vit.eval()
    correct, total = 0, 0
    for images, labels in loader:
        with accelerator.autocast():
            logits = vit(normalize(images))  # (B, K)
        preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += int((preds == labels).sum())
        total += len(labels)
    vit.train()
    return correct / max(1, total), total


class Finetuner:
    """Everything shared by the trainings of one fine-tune: data, the starting weights, the loss."""

    def __init__(self, config: FinetuneConfig, accelerator, start: ViT, num_classes: int,
                 train_set, eval_sets: dict, steps: int, out: Path, kernels: Kernels):
        self.config, self.accelerator, self.num_classes, self.kernels = config, accelerator, num_classes, kernels
        self.start_state = {k: v.clone() for k, v in start.state_dict().items()}  # every training starts here
        self.vit_config = start.config
        self.train_set, self.eval_sets, self.steps, self.out = train_set, eval_sets, steps, out
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.label_smoothing, num_classes=num_classes)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 2:  # soft targets from Mixup/CutMix (label smoothing already folded in)
            return torch.sum(-labels * torch.log_softmax(logits.float(), -1), -1).mean()
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def train(self, indices: np.ndarray, lr: float, seed: int, tag: str, score_on: str) -> tuple[float, ViT]:
        """Train from the starting weights on `indices` of the training split; accuracy on `score_on`
        (the number of images scored is kept in `self.scored`)."""
        from accelerate.utils import set_seed
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        config, acc = self.config, self.accelerator
        set_seed(seed, device_specific=False)  # the same initial head and data order on every process
        vit = ViT(self.vit_config, self.kernels)
        vit.load_state_dict(self.start_state)
        if config.compile:
            compile_blocks(vit)
        if not config.run:  # from scratch: the seed draws the initial weights too
            vit.init_weights()
            vit.reset_head(self.num_classes)
        micro = config.batch_size // acc.num_processes
        loader_kw = {"batch_size": micro, "num_workers": config.num_workers, "pin_memory": torch.cuda.is_available()}
        if config.num_workers:
            end_workers_at_exit()  # a crash must not leave the process waiting for its workers
        train_loader = DataLoader(Subset(self.train_set, indices.tolist()), shuffle=True, drop_last=True,
                                  persistent_workers=config.num_workers > 0, **loader_kw)  # no restart per epoch
        eval_loader = DataLoader(self.eval_sets[score_on], **loader_kw)
        optimizer = optimizer_for(vit, config, lr)
        vit, optimizer, train_loader, eval_loader = acc.prepare(vit, optimizer, train_loader, eval_loader)
        schedule = SimpleNamespace(warmup_steps=config.warmup_steps, schedule="cosine", min_lr=0.0, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, self.steps))
        set_seed(seed, device_specific=True)  # each process its own augmentation and mixup draws
        tb = SummaryWriter(str(self.out / "tensorboard" / tag)) if acc.is_main_process else None
        bar = tqdm(total=self.steps, desc=f"finetune {tag}", disable=not acc.is_local_main_process,
                   dynamic_ncols=True, leave=False)
        step, epoch, window = 0, 0, []
        vit.train()
        try:
            while step < self.steps:
                train_loader.set_epoch(epoch)
                for images, labels in train_loader:
                    images = normalize(images)  # (B, 3, S, S) in [-1, 1]
                    if self.mixup is not None:
                        images, labels = self.mixup(images, labels)  # labels -> soft (B, K)
                    with acc.autocast():
                        loss = self.loss(vit(images), labels)
                    if not torch.isfinite(acc.reduce(loss.detach(), "sum")):  # every process stops together
                        raise UsageError(f"fine-tuning {tag}: the loss is not finite at step {step + 1}: "
                                         "try a smaller --lrs, --mixed-precision no (fp32) or --grad-clip 1")
                    acc.backward(loss)
                    if config.grad_clip > 0:
                        acc.clip_grad_norm_(vit.parameters(), config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                    window.append(loss.detach())
                    bar.update(1)
                    if tb and (step % config.log_every == 0 or step == self.steps):
                        tb.add_scalar("train/loss", torch.stack(window).mean().item(), step)
                        tb.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                        window = []
                    if step >= self.steps:
                        break
                epoch += 1
        finally:
            bar.close()  # ends the bar's line, so an error message starts on a line of its own
        score, self.scored = accuracy(vit, eval_loader, acc)
        if tb:
            tb.add_scalar(f"{score_on}/accuracy", score, step)
            tb.close()
        model = acc.unwrap_model(vit)
        acc.free_memory()
        return score, model


def select_lr(grid: dict[str, dict]) -> float:
    """The lr with the best dev accuracy; ties go to the smaller lr (the more conservative choice)."""
    return min((-v["dev_accuracy"], float(lr)) for lr, v in grid.items())[1]


def starting_model(config: FinetuneConfig) -> tuple[ViT, dict | None, str, dict]:
    """(ViT with a fresh zero-initialised head still to size, the pretrained run's config or None, dataset,
    the starting point as finetune.json records it)."""
    overrides = {"dropout": config.dropout}
    if config.image_size:
        overrides["image_size"] = config.image_size
    if config.run:
        run_cfg, vit, start = load_start(config.run, **overrides)
        return vit, run_cfg, config.dataset or run_cfg["train"]["dataset"], start
    torch.manual_seed(0)  # replaced per seed in Finetuner.train; this one only sizes the model
    vit = ViT(vit_config(config.model or SCRATCH_MODEL, image_size=config.image_size or None, dropout=config.dropout))
    start = {"init": "scratch", "checkpoint": None, "step": None, "sha256": None}  # each seed draws its own weights
    return vit, None, config.dataset or DEFAULT_DATASET, start


def load_start(run: str, **overrides) -> tuple[dict, ViT, dict]:
    """(run config, ViT, starting point) of --run: the run's newest readable checkpoint, or the file it names."""
    path = Path(run)
    if path.is_file():  # a file's name may be anything (a copy, a rename): its step is read from inside
        ckpt = ckpt_io.load_checkpoint(path)
        run_cfg, vit, step = ckpt["config"], ckpt_io.vit_from_checkpoint(ckpt, run, **overrides), ckpt.get("step")
    else:
        run_cfg, vit, path = ckpt_io.load_run(run, **overrides)
        step = int(rundir.CKPT_RE.search(path.name).group(1))  # a run's checkpoints are all ckpt-<step>.pt
    return run_cfg, vit, {"init": "pretrained", "checkpoint": str(path), "step": step, "sha256": file_sha256(path)}


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


def finetune(config: FinetuneConfig) -> dict:
    """Choose the lr on the dev split, train every seed on the labelled set, score on the test split.
    The output directory is held (mpp.runlock) until the fine-tune ends, however it ends."""
    with contextlib.ExitStack() as held:
        return _finetune(config, held)


def _finetune(config: FinetuneConfig, held: contextlib.ExitStack) -> dict:
    from eval.fewshot import dataset_labels, run_dir_of

    # ---- config
    config.validate()
    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)
    default_out = (run_dir_of(Path(config.run)) / "finetune") if config.run else Path("runs/finetune-scratch")
    out = Path(config.output_dir) if config.output_dir else default_out
    config = dataclasses.replace(config, output_dir=str(out))

    # ---- accelerator
    accelerator = make_accelerator(config.mixed_precision, config.cpu_threads)
    if config.batch_size % accelerator.num_processes:
        raise UsageError(f"--batch-size {config.batch_size} is not divisible by {accelerator.num_processes} "
                         f"processes: pass a multiple of {accelerator.num_processes}")
    if (config.mixup or config.cutmix) and (config.batch_size // accelerator.num_processes) % 2:
        raise UsageError("timm's Mixup/CutMix needs an even batch on every process: pass an even --batch-size")

    # ---- model and data
    start, pretrained_cfg, dataset, start_point = starting_model(config)
    results = recorded_results(out, config, start_point)
    if accelerator.is_main_process:  # one fine-tune writes an output directory at a time
        held.enter_context(RunLock(files.writable_dir(out, "--output-dir")))
    image_size = start.config.image_size
    train_set, info = build_dataset(dataset, "train", image_size, train=True)
    train_set.transform = train_transform(config, image_size)
    train_eval_set, _ = build_dataset(dataset, "train", image_size, train=False)  # the dev split, unaugmented
    test_set, _ = build_dataset(dataset, "test", image_size, train=False)
    if not hasattr(train_set, "__len__"):
        raise UsageError(f"dataset '{dataset}' is streamed: fine-tuning needs a map-style dataset (drop --streaming)")
    start.reset_head(info.num_classes)  # the paper's zero-initialised linear head
    split = split_labelled(dataset_labels(train_set), config)
    steps = math.ceil(config.epochs * len(split["train"]) / config.batch_size) if config.epochs > 0 else config.steps
    if len(split["fit"]) < config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(split['fit'])} labelled images "
                         "left for training after the dev split: pass a smaller --batch-size")
    eval_sets = {"dev": Subset(train_eval_set, split["dev"].tolist()), "test": test_set}
    # ---- kernels: decided once at the fine-tune's shapes (the head reads the class token: 1 query last)
    shapes = RunShapes.of(start.config, config.batch_size // accelerator.num_processes, autocast_dtype(accelerator),
                          last_queries=1, compiled=config.compile)
    kernels = choose_kernels(policy, shapes, accelerator.device, accelerator)
    tuner = Finetuner(config, accelerator, start, info.num_classes, train_set, eval_sets, steps, out, kernels.kernels)

    # ---- results so far (--resume) and the run directory
    settings = dataclasses.asdict(config)
    run_cfg = {  # the shape of a pretraining run's config, so the probes and compare.py read this directory
        "train": {"objective": "finetune", "init": "pretrained" if config.run else "scratch", "dataset": dataset,
                  "model": config.model or (pretrained_cfg or {}).get("train", {}).get("model") or SCRATCH_MODEL,
                  "image_size": image_size, "seed": 0},
        "vit": dataclasses.asdict(start.config), "finetune": settings, "command": " ".join(sys.argv),
    }
    prepare_output(out, config, settings, run_cfg, accelerator, results)
    results.update({
        "start": start_point,  # what every recorded training started from: a --resume must start there too
        "pretrained": str(run_dir_of(Path(config.run))) if config.run else None,
        "init": "pretrained" if config.run else "scratch",
        "pretrained_objective": (pretrained_cfg or {}).get("train", {}).get("objective"),
        "dataset": {"spec": dataset, "image_size": image_size, "num_classes": info.num_classes,
                    "train_size": len(split["train"]), "fit_size": len(split["fit"]), "dev_size": len(split["dev"]),
                    "test_size": len(test_set)},
        "steps": steps, "vit": dataclasses.asdict(start.config), "config": settings, "kernels": kernels.record(),
    })
    trainings = results.setdefault("trainings", {})

    def record(tag: str, entry: dict) -> None:
        trainings[tag] = entry
        if accelerator.is_main_process:
            files.write_json(out / RESULTS, results)

    # ---- the lr grid: train on "fit", score on "dev" only
    lrs = list(dict.fromkeys(float(lr) for lr in config.lrs))
    grid = {}
    for lr in lrs if len(lrs) > 1 else []:
        tag = f"grid-lr{lr:g}"
        if tag not in trainings:
            started = time.perf_counter()
            score, _ = tuner.train(split["fit"], lr, 0, tag, "dev")
            record(tag, {"lr": lr, "seed": 0, "dev_accuracy": score, "scored": tuner.scored,
                         "wall_time_s": time.perf_counter() - started})
        grid[f"{lr:g}"] = {"dev_accuracy": trainings[tag]["dev_accuracy"]}
    lr = select_lr(grid) if grid else lrs[0]
    accelerator.print(f"lr {lr:g} chosen on the dev split ({len(split['dev'])} images): "
                      + (", ".join(f"{k}: {100 * v['dev_accuracy']:.1f}%" for k, v in grid.items()) or "no grid"))

    # ---- final trainings on all the labelled data, scored once on the test split
    for seed in range(config.seeds):
        tag = f"seed{seed}"
        if tag not in trainings or trainings[tag]["lr"] != lr:
            started = time.perf_counter()
            score, model = tuner.train(split["train"], lr, seed, tag, "test")
            if seed == 0 and accelerator.is_main_process:
                ckpt_io.save_checkpoint(out, steps, {"config": run_cfg, "model": model.state_dict(), "step": steps},
                                        keep=1)  # seed 0's weights: the probes read this directory as a run
            record(tag, {"lr": lr, "seed": seed, "test_accuracy": score, "scored": tuner.scored,
                         "wall_time_s": time.perf_counter() - started})
    per_seed = [trainings[f"seed{s}"]["test_accuracy"] for s in range(config.seeds)]
    results.update({
        "lr": lr, "grid": grid, "seeds": list(range(config.seeds)),
        "test_accuracy": {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed},
        "std": "population (ddof=0) over seeds",
        "wall_time_s": sum(t.get("wall_time_s", 0.0) for t in trainings.values()),  # every training, resumed or not
    })
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        files.write_json(out / RESULTS, results)

        with SummaryWriter(str(out / "tensorboard" / "summary")) as tb:
            tb.add_scalar("finetune/test_accuracy", results["test_accuracy"]["mean"], steps)
            tb.add_scalar("finetune/lr", lr, steps)
        acc = results["test_accuracy"]
        accelerator.print(f"test accuracy {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}% over {config.seeds} "
                          f"seed(s) at lr {lr:g}; wrote {out / RESULTS}")
    accelerator.end_training()
    return results


def recorded_results(out: Path, config: FinetuneConfig, start: dict) -> dict:
    """The results recorded so far (with --resume), after refusing to overwrite them or to resume them
    from another starting point; checked before the data is loaded, so a refusal comes at once."""
    path = out / RESULTS
    if path.is_file() and not config.resume:
        raise UsageError(f"'{out}' already holds fine-tuning results: pass --resume to finish them "
                         "or --output-dir for a new fine-tune")
    if config.resume and not path.is_file():
        raise UsageError(f"--resume: no {RESULTS} in '{out}': drop --resume to start this fine-tune")
    results = json.loads(path.read_text()) if config.resume else {}
    if results:
        check_same_start(out, results.get("start"), start)
    return results


def prepare_output(out: Path, config: FinetuneConfig, settings: dict, run_cfg: dict, accelerator,
                   results: dict) -> None:
    """Refuse to mix settings with the recorded results; a new fine-tune's config.json."""
    if results:
        saved = results.get("config", {})
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} → {v}" for k, v in settings.items()
                   if k not in RESUMABLE and saved.get(k) != (list(v) if isinstance(v, tuple) else v)]
        if changed:
            raise UsageError(f"'{out}' was fine-tuned with other settings ({'; '.join(changed)}): resume with "
                             "the same flags or pass a new --output-dir")
    if accelerator.is_main_process and not config.resume:
        files.write_json(files.writable_dir(out, "--output-dir") / "config.json", run_cfg)


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    from mpp.config import dataclass_from_args

    return dataclass_from_args(FinetuneConfig, build_parser().parse_args(argv))


def build_parser() -> Parser:
    from mpp.config import add_dataclass_flags

    parser = Parser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, FinetuneConfig)
    return parser


def main(argv: list[str] | None = None) -> None:
    cli_main(lambda: finetune(parse_args(argv)))()


if __name__ == "__main__":
    main()
