"""Fine-tuning a pretrained run, or training from scratch, on labelled images (the ViT paper's protocol).

The pretrained head is replaced by a zero-initialised linear layer; SGD with momentum 0.9, no weight
decay, linear warmup then cosine decay, gradient clipping at global norm 1. The learning rate is
picked from a grid by accuracy on a dev split held out of the labelled training data (never the test
split); then the model is trained on all the labelled data at that rate, once per seed, and scored
once on the test split. The entry point is eval/finetune.py (its docstring shows the commands); the
starting point and what a --resume may continue are mpp.train.finetune_start's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mpp.core.config import (
    Invocation,
    Parser,
    add_dataclass_flags,
    dataclass_from_args,
)
from mpp.core.errors import TooFewImages, UsageError
from mpp.core.files import writable_dir, write_json
from mpp.core.provenance import provenance
from mpp.core.runlock import RunLock
from mpp.data.sources import LABELLED_FORMS, build_dataset, normalize
from mpp.eval.held_out import evaluate
from mpp.eval.probes import stratified_split
from mpp.model.kernel_policy import KernelPolicy, RunShapes
from mpp.model.ops import Kernels
from mpp.model.vit import ViT
from mpp.run import rundir
from mpp.run.checkpoint import save_checkpoint
from mpp.run.optim import Schedule
from mpp.run.records import AccuracyOverSeeds, DatasetUsed, FinetuneReport, FinetuneStart, GridPoint, Training
from mpp.run.runtime import (
    autocast_dtype,
    choose_kernels,
    compile_blocks,
    loader_kwargs,
    make_accelerator,
)
from mpp.run.trackers import Trackers, flat_config
from mpp.train import loop
from mpp.train.finetune_config import FinetuneConfig
from mpp.train.finetune_start import (
    SCRATCH_MODEL,
    prepare_output,
    pretrained_source,
    recorded_results,
    starting_model,
)


def split_labelled(labels: np.ndarray, config: FinetuneConfig) -> dict[str, np.ndarray]:
    """Indices into the training split: the labelled subset ("train"), and its parts "fit" and "dev".

    The lr grid trains on "fit" and scores on "dev"; the final trainings use all of "train"."""
    # Permutation draws (not the probes' choice draws): the labelled subsets fine-tunes were scored on.
    try:
        if config.train_per_class or config.train_fraction < 1:
            labelled, _ = stratified_split(
                labels, lambda n: config.train_per_class or max(1, round(config.train_fraction * n)),
                config.subset_seed, draw="permutation")
        else:
            labelled = np.arange(len(labels))
        dev_pos, fit_pos = stratified_split(labels[labelled], lambda n: max(1, round(config.dev_fraction * n)),
                                            config.subset_seed + 1, draw="permutation")
    except TooFewImages as e:  # said in fine-tuning's flags
        raise e.advised("pass a smaller --train-per-class") from e
    if len(fit_pos) == 0:
        raise UsageError(f"the labelled set ({len(labelled)} images) leaves nothing to train on after the dev split: "
                         "pass a larger --train-fraction / --train-per-class or a smaller --dev-fraction")
    return {"train": labelled, "fit": labelled[fit_pos], "dev": labelled[dev_pos]}


def train_transform(config: FinetuneConfig, image_size: int):
    """The training augmentation: timm's RandAugment (on PIL images) first, if asked, then crop + flip."""
    from mpp.data.sources import train_transform as crop_flip

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

    def accuracy(self, vit: ViT, loader: DataLoader) -> tuple[float, int]:
        """(top-1 accuracy, images scored) over the loader: every image once, from every process."""
        acc = self.accelerator

        def batch_sums(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
            with acc.autocast():
                logits = vit(normalize(images))  # (B, K)
            return {"correct": int((logits.argmax(-1) == labels.to(logits.device)).sum())}

        sums, scored = evaluate(vit, batch_sums, loader, acc)
        return sums.get("correct", 0.0), scored

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim == 2:  # soft targets from Mixup/CutMix (label smoothing already folded in)
            return torch.sum(-labels * torch.log_softmax(logits.float(), -1), -1).mean()
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)

    def train(self, indices: np.ndarray, lr: float, seed: int, tag: str, score_on: str) -> Trained:
        """Train from the starting weights on `indices` of the training split, in the one training loop
        (mpp.train.loop); then its accuracy on `score_on` ("dev" or "test")."""
        from accelerate.utils import set_seed

        config, acc = self.config, self.accelerator
        set_seed(seed, device_specific=False)  # the same initial head and data order on every process
        vit = ViT(self.vit_config, self.kernels)
        vit.load_state_dict(self.start_state)
        if config.compile:
            compile_blocks(vit)
        if not config.run:  # from scratch: the seed draws the initial weights too
            vit.init_weights()
            vit.reset_head(self.num_classes)
        kw = loader_kwargs(config.batch_size // acc.num_processes, config.num_workers)
        train_loader = DataLoader(Subset(self.train_set, indices.tolist()), shuffle=True, drop_last=True, **kw)
        optimizer = optimizer_for(vit, config, lr)
        vit, optimizer, train_loader = acc.prepare(vit, optimizer, train_loader)
        eval_loader = loop.eval_loader(self.eval_sets[score_on], acc, kw)
        scheduler = Schedule(self.steps, config.warmup_steps, "cosine").scheduler(optimizer)
        set_seed(seed, device_specific=True)  # each process its own augmentation and mixup draws
        trackers = Trackers(config.report_to, self.out, f"{rundir.TENSORBOARD}/{tag}", f"{self.out.name}/{tag}",
                            main=acc.is_main_process, job_type="finetune")
        built = loop.Built(acc, vit, optimizer, scheduler, train_loader, self.steps)
        settings = loop.LoopSettings(config.grad_clip, config.log_every, config.batch_size, desc=f"finetune {tag}",
                                     leave_bar=False)
        try:
            loop.TrainLoop(built, settings, _Hooks(self, vit, tag, trackers)).run()
            model = acc.unwrap_model(vit)
            score, scored = self.accuracy(model, eval_loader)
            trackers.log({f"{score_on}/accuracy": score}, self.steps)
        except BaseException as e:  # marked failed (unless a stop's SystemExit), then raised on
            trackers.finish_on_exit(type(e), e, e.__traceback__)
            raise
        finally:
            trackers.finish()
        acc.free_memory()
        return Trained(score, scored, model)


@dataclass(frozen=True)
class Trained:
    """One fine-tuning training's outcome."""

    score: float  # top-1 accuracy on the split it was scored on
    scored: int  # images scored (every image of that split once, across processes)
    model: ViT  # the trained ViT (unwrapped)


class _Hooks(loop.Hooks):
    """A fine-tune's part of the loop: the loss of a batch (normalised, Mixup/CutMix), its logging."""

    def __init__(self, tuner: Finetuner, vit: torch.nn.Module, tag: str, trackers: Trackers):
        self.tuner, self.vit, self.tag, self.trackers = tuner, vit, tag, trackers

    def loss(self, images, labels):
        images = normalize(images)  # (B, 3, S, S) in [-1, 1]
        if self.tuner.mixup is not None:
            images, labels = self.tuner.mixup(images, labels)  # labels -> soft (B, K)
        with self.tuner.accelerator.autocast():
            loss = self.tuner.loss(self.vit(images), labels)
        return loss, {"loss": loss}

    def diverged(self, step: int) -> str:
        return (f"fine-tuning {self.tag}: the loss is not finite at step {step}: "
                "try a smaller --lrs, --mixed-precision no (fp32) or --grad-clip 1")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.trackers.active:
            self.trackers.log(values, step)


def select_lr(grid: dict[str, dict]) -> float:
    """The lr with the best dev accuracy (finetune.json's grid: lr → {"dev_accuracy": ...}); ties go to
    the smaller lr (the more conservative choice)."""
    return min((-v["dev_accuracy"], float(lr)) for lr, v in grid.items())[1]


def finetune(config: FinetuneConfig, invocation: Invocation | None = None) -> dict:
    """Choose the lr on the dev split, train every seed on the labelled set, score on the test split.
    The output directory is held (mpp.core.runlock) until the fine-tune ends, however it ends. `invocation`:
    the command line that asked for it, which config.json records (None: called from Python)."""
    with contextlib.ExitStack() as held:
        return _finetune(config, held, invocation or Invocation(None, None))


@dataclass
class _Setup:
    """What every training of one fine-tune shares, built once by `_setup`."""

    tuner: Finetuner  # the data, the starting weights, the loss
    split: dict  # indices into the training split: "train" (the labelled subset), its "fit" and "dev" parts
    steps: int  # optimizer steps of every training
    report: FinetuneReport  # finetune.json so far (a --resume keeps its trainings)
    run_cfg: dict  # OUT/config.json


def _finetune(config: FinetuneConfig, held: contextlib.ExitStack, invocation: Invocation) -> dict:
    # ---- config
    config.validate()
    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)
    default_out = (rundir.run_dir_of(Path(config.run)) / "finetune") if config.run else Path("runs/finetune-scratch")
    out = Path(config.output_dir) if config.output_dir else default_out
    config = dataclasses.replace(config, output_dir=str(out))

    # ---- accelerator
    accelerator = make_accelerator(config.mixed_precision, config.cpu_threads)
    if config.batch_size % accelerator.num_processes:
        raise UsageError(f"--batch-size {config.batch_size} is not divisible by {accelerator.num_processes} "
                         f"processes: pass a multiple of {accelerator.num_processes}")
    if (config.mixup or config.cutmix) and (config.batch_size // accelerator.num_processes) % 2:
        raise UsageError("timm's Mixup/CutMix needs an even batch on every process: pass an even --batch-size")

    # ---- data, model, kernels and records; then the trainings
    setup = _setup(config, accelerator, held, policy, invocation)
    lr, grid = _choose_lr(setup)
    _final_trainings(setup, lr)
    return _summarise(setup, lr, grid)


def _setup(config: FinetuneConfig, accelerator, held: contextlib.ExitStack, policy: KernelPolicy,
           invocation: Invocation) -> _Setup:
    out = Path(config.output_dir)
    # ---- model and data
    start, pretrained_cfg, dataset, start_point = starting_model(config)
    recorded = recorded_results(out, config, start_point)
    image_size = start.config.image_size
    transform = train_transform(config, image_size)
    train_set, info = build_dataset(dataset, "train", image_size, train=True, transform=transform)
    fix = f"fine-tuning learns the labels: pass --dataset SPEC, a labelled dataset ({LABELLED_FORMS})"
    train_set.require_labels(fix)
    train_eval_set, _ = build_dataset(dataset, "train", image_size, train=False)  # the dev split, unaugmented
    test_set, _ = build_dataset(dataset, "test", image_size, train=False)
    test_set.require_labels(fix, train=info)  # every test image of a class the head learns
    if accelerator.is_main_process:  # one fine-tune writes an output directory at a time; a refused dataset wrote none
        held.enter_context(RunLock(writable_dir(out, "--output-dir")))
    start.reset_head(info.num_classes)  # the paper's zero-initialised linear head
    split = split_labelled(train_set.labels().numpy(), config)
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
        **invocation.record(), **provenance(),  # as a pretraining run's (mpp.run.rundir.RECORDED)
    }
    prepare_output(out, config, settings, run_cfg, accelerator, recorded)
    report = FinetuneReport(
        start=FinetuneStart.from_json(start_point),  # what every recorded training started from: a --resume's too
        pretrained=pretrained_source(config.run), init="pretrained" if config.run else "scratch",
        pretrained_objective=(pretrained_cfg or {}).get("train", {}).get("objective"),
        dataset=DatasetUsed(spec=dataset, image_size=image_size, num_classes=info.num_classes,
                            train_size=len(split["train"]), fit_size=len(split["fit"]), dev_size=len(split["dev"]),
                            test_size=len(test_set)),
        steps=steps, vit=dataclasses.asdict(start.config), config=settings, kernels=kernels.record(),
        trainings=dict(recorded.trainings or {}) if recorded else {})
    return _Setup(tuner, split, steps, report, run_cfg)


def _record(setup: _Setup, tag: str, training: Training) -> None:
    """One training's outcome into finetune.json, written at once: a --resume keeps it."""
    setup.report.trainings[tag] = training
    if setup.tuner.accelerator.is_main_process:
        write_json(setup.tuner.out / rundir.FINETUNE, setup.report.to_json())


def _choose_lr(setup: _Setup) -> tuple[float, dict]:
    """The lr grid: each rate trained on "fit" and scored on "dev" only; (the best rate, the grid)."""
    config, trainings, split = setup.tuner.config, setup.report.trainings, setup.split
    lrs = list(dict.fromkeys(float(lr) for lr in config.lrs))
    grid = {}
    for lr in lrs if len(lrs) > 1 else []:
        tag = f"grid-lr{lr:g}"
        if tag not in trainings:
            started = time.perf_counter()
            trained = setup.tuner.train(split["fit"], lr, 0, tag, "dev")
            _record(setup, tag, Training(lr=lr, seed=0, dev_accuracy=trained.score, scored=trained.scored,
                                         wall_time_s=time.perf_counter() - started))
        grid[f"{lr:g}"] = GridPoint(dev_accuracy=trainings[tag].dev_accuracy)
    lr = select_lr({k: point.to_json() for k, point in grid.items()}) if grid else lrs[0]
    setup.tuner.accelerator.print(f"lr {lr:g} chosen on the dev split ({len(split['dev'])} images): " + (
        ", ".join(f"{k}: {100 * v.dev_accuracy:.1f}%" for k, v in grid.items()) or "no grid"))
    return lr, grid


def _final_trainings(setup: _Setup, lr: float) -> None:
    """Every seed trained on all the labelled data at `lr`, scored once on the test split."""
    tuner, trainings = setup.tuner, setup.report.trainings
    for seed in range(tuner.config.seeds):
        tag = f"seed{seed}"
        if tag not in trainings or trainings[tag].lr != lr:
            started = time.perf_counter()
            trained = tuner.train(setup.split["train"], lr, seed, tag, "test")
            if seed == 0 and tuner.accelerator.is_main_process:
                save_checkpoint(tuner.out, setup.steps, {"config": setup.run_cfg, "model": trained.model.state_dict(),
                                                         "step": setup.steps},
                                keep=1)  # seed 0's weights: the probes read this directory as a run
            _record(setup, tag, Training(lr=lr, seed=seed, test_accuracy=trained.score, scored=trained.scored,
                                         wall_time_s=time.perf_counter() - started))


def _summarise(setup: _Setup, lr: float, grid: dict[str, GridPoint]) -> dict:
    """finetune.json's totals, its TensorBoard summary and the line that reports them; the report as written."""
    config, accelerator, out = setup.tuner.config, setup.tuner.accelerator, setup.tuner.out
    per_seed = [setup.report.trainings[f"seed{s}"].test_accuracy for s in range(config.seeds)]
    accuracy = AccuracyOverSeeds(mean=float(np.mean(per_seed)), std=float(np.std(per_seed)), per_seed=per_seed)
    report = setup.report = dataclasses.replace(
        setup.report, lr=lr, grid=grid, seeds=list(range(config.seeds)), test_accuracy=accuracy,
        std="population (ddof=0) over seeds",
        # every training's wall time, resumed or not
        wall_time_s=sum(t.wall_time_s or 0.0 for t in setup.report.trainings.values()))
    if accelerator.is_main_process:
        write_json(out / rundir.FINETUNE, report.to_json())
        summary = Trackers(config.report_to, out, f"{rundir.TENSORBOARD}/summary", f"{out.name}/summary", main=True,
                           job_type="finetune", config=flat_config(setup.run_cfg, ("train", "vit", "finetune")))
        summary.log({"finetune/test_accuracy": accuracy.mean, "finetune/lr": lr}, setup.steps)
        summary.finish()
        accelerator.print(f"test accuracy {100 * accuracy.mean:.2f} ± {100 * accuracy.std:.2f}% over {config.seeds} "
                          f"seed(s) at lr {lr:g}; wrote {out / rundir.FINETUNE}")
    accelerator.end_training()
    return report.to_json()


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:

    return dataclass_from_args(FinetuneConfig, build_parser().parse_args(argv))


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(parser, FinetuneConfig, run_section="finetune")
    parser.alternatives.append(("steps", "epochs"))  # each training's length, in steps or in passes
    return parser


