"""What a fine-tune is asked to do (eval/finetune.py's flags): one frozen dataclass, each field's range
beside it, checked whole by `validate()`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpp.core.config import AT_LEAST_1, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, SEED, Range, check_ranges
from mpp.core.errors import UsageError
from mpp.run.trackers import check_report_to


@dataclass(frozen=True)
class FinetuneConfig:
    run: str = ""  # pretrained run directory or checkpoint file; empty: train from scratch (a random --model)
    model: str = ""  # ViT preset when training from scratch; empty: Micro/4 (a --run brings its own)
    dataset: str = ""  # a labelled dataset: digits | PATH (train/<class>/...) | shards:PATH | hf:NAME;
        # empty: the run's pretraining dataset (digits from scratch)
    image_size: int = 0  # fine-tuning resolution; 0: the pretrained one (another size resamples the position
        # embeddings)
    train_fraction: float = 1.0  # labelled subset: this fraction of each class of the training split
    train_per_class: int = 0  # labelled subset: this many images of each class instead (0: use --train-fraction)
    subset_seed: int = 0  # draws the labelled subset and the dev split: fixed, so every model sees the same labels
    dev_fraction: float = 0.1  # of the labelled data, held out (stratified) to choose the lr (the paper: 2% of CIFAR)
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)  # learning-rate grid (the paper's CIFAR grid);
        # one value: no grid
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
    mixed_precision: str = ""  # no | fp16 | bf16; empty: Accelerate's config if any, else bf16 on a CUDA GPU
        # with bf16, fp32 elsewhere
    kernels: str = ""  # attention/LayerNorm: auto (ours where verified and faster) | triton | torch;
        # empty: $MPP_KERNELS or auto
    kernel_cache: str = ""  # folder caching the kernels' verdicts; off: measure every run;
        # empty: $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels
    compile: bool = False  # torch.compile the ViT's blocks
    output_dir: str = ""  # results, TensorBoard, fine-tuned weights; empty: RUN/finetune or runs/finetune-scratch
    resume: bool = False  # keep the trainings already recorded in OUTPUT_DIR/finetune.json, run the rest
    log_every: int = 25  # steps between logged training metrics
    report_to: str = "tensorboard"  # where each training's curves go: tensorboard | wandb | all (mpp.run.trackers)

    # What each numeric field accepts (checked at parse time and by validate(); mpp.core.config.Range).
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
        check_report_to(self.report_to)
        check_ranges(self)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UsageError(f"--crop-scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        return self
