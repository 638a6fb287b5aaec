"""Pretraining, MPP or supervised: its config (`TrainConfig`), its flags, and `train()`.

The run itself (config → Accelerator → data → model → optimizer → loop → logging → checkpoint) is
mpp.train.trainer's `Trainer`. Accelerate handles devices, processes, mixed precision and gradient
accumulation, so the same code runs on one CPU, one GPU or many machines under `accelerate launch`.
The entry points are scripts/pretrain_mpp.py and scripts/pretrain_supervised.py (`main`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mpp.core.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    Invocation,
    Parser,
    Range,
    add_dataclass_flags,
    check_ranges,
    dataclass_from_args,
)
from mpp.core.errors import BadField, UsageError, cli_main
from mpp.data.sources import dataset_name
from mpp.model.objective import MPPConfig
from mpp.model.vit import ViTConfig, vit_config
from mpp.run.optim import SCHEDULES, Schedule
from mpp.run.trackers import check_report_to
from mpp.train.trainer import Trainer

OBJECTIVES = ("mpp", "supervised")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "mpp"  # mpp (self-supervised, no labels) | supervised (labels; also the from-scratch baseline)
    dataset: str = "digits"  # digits (offline default) | PATH: a folder of images (train/<class>/... for classes,
        # else unlabelled) | shards:PATH | hf:NAME or hf:PATH
    model: str = "Micro/4"  # ViT preset: Micro/4, Ti/4, S/4 (32 px), Ti/16, S/16, B/16, L/16, H/14, or SIZE/PATCH
    image_size: int = 0  # training resolution in pixels, divisible by the patch size; 0: the preset's
        # (Micro 16, /4 32, else 224)
    dropout: float = 0.0  # ViT dropout (the paper used 0.1 for supervised training on smaller datasets)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range (inception crop)
    hflip: bool = True  # random horizontal flips
    streaming: bool = False  # stream the dataset (hf: or a folder) instead of loading or listing it whole
    shuffle_buffer: int = 10_000  # with --streaming: images held to shuffle the stream (memory grows with it)
    strict_images: bool = False  # stop at the first unreadable image instead of skipping it (skips are counted)
    num_workers: int = 2  # DataLoader worker processes per training process
    cpu_threads: int = 0  # torch threads per process when training on CPU; 0: available cores / local processes
    batch_size: int = 128  # global batch: across all processes and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1500  # optimizer steps (ignored when --epochs is set)
    epochs: float = 0.0  # if > 0: train this many passes over the training set instead of --max-steps
    lr: float = 1e-3  # peak learning rate, reached after the warmup
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "cosine"  # decay after warmup: cosine | linear
    weight_decay: float = 0.05  # AdamW decoupled decay; never on norms, biases, embeddings or the [mask] token
    beta1: float = 0.9  # Adam β1 (the paper's)
    beta2: float = 0.999  # Adam β2 (the paper's)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    label_smoothing: float = 0.0  # supervised objective only
    kernels: str = ""  # attention/LayerNorm: auto (ours where verified and faster at the run's shapes) | triton
        # | torch; empty: $MPP_KERNELS or auto
    kernel_cache: str = ""  # folder caching the kernels' verdicts; off: measure every run;
        # empty: $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels
    compile: bool = False  # torch.compile the ViT's blocks (regional: compiled once, reused by every block)
    mixed_precision: str = ""  # no | fp16 | bf16; empty: Accelerate's config if any, else bf16 on a CUDA GPU
        # with bf16, fp32 elsewhere
    output_dir: str = "runs/mpp"  # the run directory: config, TensorBoard events, metrics, checkpoints
    seed: int = 0  # seeds initialisation, data order, augmentation and corruption
    resume: bool = False  # continue the run in --output-dir from its newest checkpoint
    log_every: int = 25  # steps between logged metrics
    report_to: str = "tensorboard"  # where the curves go besides metrics.jsonl: tensorboard | wandb | all
        # (mpp.run.trackers)
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    holdout_images: int = 1000  # a dataset without a test split: training images held out for the held-out
        # evaluation (at most a tenth of them; never trained on)
    fewshot_every: int = 0  # steps between in-run few-shot probes (also at step 0 and the end); 0: off
    fewshot_max_images: int = 2000  # test images each in-run probe scores (a fixed random subset; 0: all);
        # the 1/5/10/25-shot draws add at most 123 images per class
    fewshot_dataset: str = ""  # a second dataset the in-run probe scores (transfer), besides the run's own

    # What each numeric field accepts (checked at parse time and by validate(); mpp.core.config.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "image_size": NON_NEGATIVE, "dropout": OPEN_FRACTION, "crop_scale": Range(0, 1, low_open=True),
        "shuffle_buffer": AT_LEAST_1, "num_workers": Range(0, 256), "cpu_threads": Range(0, 4096),
        "batch_size": AT_LEAST_1, "grad_accum_steps": AT_LEAST_1, "max_steps": AT_LEAST_1, "epochs": NON_NEGATIVE,
        "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "beta1": OPEN_FRACTION, "beta2": OPEN_FRACTION, "grad_clip": NON_NEGATIVE, "label_smoothing": OPEN_FRACTION,
        "seed": SEED, "log_every": AT_LEAST_1, "save_every": AT_LEAST_1, "keep_checkpoints": AT_LEAST_1,
        "eval_every": NON_NEGATIVE, "holdout_images": Range(1, 100_000), "fewshot_every": NON_NEGATIVE,
        "fewshot_max_images": NON_NEGATIVE,
    }

    def validate(self) -> TrainConfig:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{self.objective}': use one of {', '.join(OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule '{self.schedule}': use cosine or linear")
        if self.mixed_precision not in ("", "no", "fp16", "bf16"):
            raise UsageError(f"unknown --mixed-precision '{self.mixed_precision}': use no, fp16 or bf16")
        check_report_to(self.report_to)
        check_ranges(self)
        if self.min_lr > self.lr:
            raise UsageError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}: pass a --min-lr of at most --lr")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UsageError(f"--crop-scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        if self.fewshot_every and self.streaming and not self.fewshot_dataset:
            raise UsageError("--fewshot-every draws images by index, which a stream cannot serve: pass "
                             "--fewshot-dataset SPEC (a folder or hub dataset that loads whole) to probe that instead")
        if self.fewshot_dataset and not self.fewshot_every:
            raise UsageError(f"--fewshot-dataset {self.fewshot_dataset} probes nothing without --fewshot-every: "
                             "pass --fewshot-every STEPS too (e.g. the steps of one epoch)")
        if (self.fewshot_dataset and not self.streaming  # a stream's own data is not probed: no clash then
                and dataset_name(self.fewshot_dataset) == dataset_name(self.dataset)):
            raise UsageError(f"--fewshot-dataset '{self.fewshot_dataset}' names a dataset whose short name "
                             f"({dataset_name(self.dataset)}) repeats the run's: the run's own data is already probed; "
                             "pass another dataset")
        return self

    def vit(self) -> ViTConfig:
        """The ViT these flags describe; a size the model refuses is said in the flag that set it."""
        try:
            return vit_config(self.model, image_size=self.image_size or None, dropout=self.dropout)
        except BadField as e:  # the model's own terms, said in the flag that set the field
            if e.field != "image_size":
                raise
            raise e.flag_advised("--image-size") from e

    def lr_schedule(self, total_steps: int) -> Schedule:
        """The learning-rate multiplier of a run of `total_steps` optimizer steps."""
        return Schedule(total_steps, self.warmup_steps, self.schedule, self.min_lr / self.lr)


def train(config: TrainConfig, mpp_config: MPPConfig | None = None, invocation: Invocation | None = None) -> Path:
    """Train, log and checkpoint one run; returns its directory. `mpp_config`: the MPP objective's
    settings (None: MPPConfig's defaults). `invocation`: the command line that asked for it, which
    config.json records (None: called from Python).

    What the run holds (the run directory's lock, the stop-signal handlers) is released however it
    ends: finished, stopped by a signal, refused, or crashed."""
    if mpp_config is None:
        mpp_config = MPPConfig()
    with contextlib.ExitStack() as held:
        return Trainer(config, mpp_config, held, invocation).run()


def build_parser(objective: str):
    """The flags of one objective's entry point: every TrainConfig field, plus MPPConfig's for MPP."""
    parser = Parser(
        description=f"{objective} training of a ViT (run it with `accelerate launch` for several GPUs or machines)",
    )
    add_dataclass_flags(parser, TrainConfig, defaults={"output_dir": f"runs/{objective}"}, skip=("objective",),
                        run_section="train")
    if objective == "mpp":
        add_dataclass_flags(parser, MPPConfig, run_section="mpp")
    parser.alternatives.append(("max_steps", "epochs"))  # the run's length, in steps or in passes
    return parser


def parse_args(objective: str, argv: list[str] | None = None) -> tuple[TrainConfig, MPPConfig]:
    args = build_parser(objective).parse_args(argv)
    config = dataclasses.replace(dataclass_from_args(TrainConfig, args), objective=objective)
    return config, dataclass_from_args(MPPConfig, args)


def main(objective: str, argv: list[str] | None = None) -> None:
    cli_main(lambda: train(*parse_args(objective, argv), Invocation.of(argv)))()
