"""The two training objectives: masked patch prediction (the paper's, App. B.1.2) and supervised.

Both are modules that own the ViT (`.vit`) and map a batch of images in [0, 1] (and labels) to
a loss and detached metrics, so one training loop serves both. MPP targets are computed from the
un-normalised images; the ViT sees `mpp.data.sources.normalize(images)`.

An MPP target is one `Target` entry of `TARGETS` (what it predicts, the head's width, its loss and
metrics); `--target`'s validation and help, the MPP head and the comparison pipeline's ablation runs
all read that table, so a new target is one `register_target(Target(...))`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpp.core.config import FRACTION, Range, check_ranges
from mpp.core.errors import UsageError
from mpp.data.sources import normalize
from mpp.model.floor import neighbour_fill, unpatchify
from mpp.model.vit import ViT, ViTConfig, gather_tokens


@dataclass(frozen=True)
class MPPConfig:
    target: str = "mean_color"  # what each corrupted patch predicts: a name in TARGETS (--help lists them)
    corrupt_rate: float = 0.5  # fraction of patches corrupted per image (exact count); BERT used 0.15
    mask_prob: float = 0.8  # of the corrupted: replaced by the learnable [mask] embedding
    random_prob: float = 0.1  # of the corrupted: replaced by the embedding of a random other patch of the batch
    keep_prob: float = 0.1  # of the corrupted: left unchanged (still predicted)
    bits: int = 3  # colour bits per channel for the class targets: 2**(3*bits) classes
    cells: int = 4  # the downsample target predicts a cells×cells version of each patch

    RANGES: ClassVar[dict[str, Range]] = {
        "corrupt_rate": Range(0, 1, low_open=True), "mask_prob": FRACTION, "random_prob": FRACTION,
        "keep_prob": FRACTION, "bits": Range(1, 8), "cells": Range(1, 64),
    }
    # --target's help, built with the flags from the table of the moment (mpp.core.config.add_dataclass_flags).
    FLAG_HELP: ClassVar[dict[str, Callable[[], str]]] = {
        "target": lambda: " | ".join(f"{t.name}: {t.help}" for t in TARGETS.values()),
    }

    def validate(self) -> "MPPConfig":
        if self.target not in TARGETS:
            raise UsageError(f"unknown MPP target '{self.target}': use one of {', '.join(TARGETS)}")
        check_ranges(self)
        probs = (self.mask_prob, self.random_prob, self.keep_prob)
        if abs(sum(probs) - 1.0) > 1e-6:  # each is in [0, 1] already (RANGES)
            raise UsageError(
                f"corruption split mask/random/keep = {probs} must be non-negative and sum to 1: "
                "e.g. --mask-prob 0.8 --random-prob 0.1 --keep-prob 0.1"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Targets, from images in [0, 1]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, P*P*C), patches in row-major order, pixels as (row, col, channel)."""
    B, C, H, W = images.shape
    P = patch_size
    x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, h, P, w, P)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)


def _color_classes(colors: torch.Tensor, bits: int) -> torch.Tensor:
    """(B, 3, ...) colours in [0, 1] → (B, ...) classes r·L² + g·L + b, each level min(floor(c·L), L−1)."""
    L = 2**bits
    levels = (colors.float() * L).floor().clamp_(0, L - 1).long()  # (B, 3, ...)
    return (levels[:, 0] * L + levels[:, 1]) * L + levels[:, 2]


def mean_color_target(images: torch.Tensor, patch_size: int, bits: int = 3) -> torch.Tensor:
    """The paper's target: each patch's mean colour quantised to `bits` per channel. → LongTensor (B, N)."""
    means = F.avg_pool2d(images.float(), patch_size)  # (B, 3, h, w)
    return _color_classes(means, bits).flatten(1)  # (B, N)


def downsample_target(images: torch.Tensor, patch_size: int, cells: int = 4, bits: int = 3) -> torch.Tensor:
    """Each patch averaged down to cells×cells, each cell a colour class. → LongTensor (B, N, cells²).

    Pooled patch by patch, so with P not a multiple of `cells` (e.g. 14) no cell mixes two patches."""
    B, C, H, W = images.shape
    P = patch_size
    patches = patchify(images.float(), P).reshape(-1, P, P, C).permute(0, 3, 1, 2)  # (B·N, C, P, P)
    small = F.adaptive_avg_pool2d(patches, cells)  # (B·N, C, c, c)
    return _color_classes(small, bits).reshape(B, -1, cells * cells)  # (B, N, c²)


# ---------------------------------------------------------------------------------------------
# The table of targets


@dataclass(frozen=True)
class Target:
    """One MPP target: everything that differs between targets, in one entry of `TARGETS`.

    The objective computes `target` on the whole batch, gathers the corrupted patches' rows, and hands
    the head's outputs `pred` (M, head_width) in float32 (M corrupted patches of the batch) and those
    rows `target` (M, ...) to `loss` and `metrics`. `decode` and `render` are for pictures only
    (mpp.eval.visualize): the head's outputs in the target's form, and that form as pixels."""
    name: str  # --target's value, recorded in the run's config.json
    # its name in comparison tables, "mpp (<label>, 50%)"; the built-ins' is their name, as committed tables show
    label: str
    help: str  # what is predicted, for --target's help: "3-bit mean colour, 512 classes"
    head_width: Callable[[ViTConfig, MPPConfig], int]  # the linear head's outputs per patch
    target: Callable[[torch.Tensor, int, MPPConfig], torch.Tensor]  # (images (B, C, H, W) in [0, 1], P) → (B, N, ...)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) → scalar loss
    # (pred, target, loss) → detached metrics, besides "loss"
    metrics: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict]
    check: Callable[[ViTConfig, MPPConfig], None] | None = None  # raises UsageError for a setting it cannot train
    arm: str | None = None  # its run in scripts/compare_pretraining.py's ablations ("mpp-4x4"); None: no run
    # How mpp.eval.visualize shows it; None: the target trains but cannot be drawn.
    # pred (M, head_width) → (M, ...) in target form
    decode: Callable[[torch.Tensor, MPPConfig], torch.Tensor] | None = None
    # ((M, ...) target form, P) → (M, P, P, 3) in [0, 1]
    render: Callable[[torch.Tensor, int, MPPConfig], torch.Tensor] | None = None
    # (guess, target), both (M, ...) in target form → {metric: value}: how the no-learning guess scores
    # (mpp.model.floor), under `metrics`' names; None: no floor is reported
    floor: Callable[[torch.Tensor, torch.Tensor], dict] | None = None


TARGETS: dict[str, Target] = {}  # name → Target, in registration order (the order --help and the ablations use)


def register_target(target: Target) -> Target:
    """Add `target` to `TARGETS` (a name is registered once); returns it."""
    if target.name in TARGETS:
        raise ValueError(f"MPP target '{target.name}' is already registered")
    TARGETS[target.name] = target
    return target


def color_classes(config: MPPConfig) -> int:
    """Classes of one quantised colour: 2**(3·bits)."""
    return 2 ** (3 * config.bits)


def as_classes(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M, K·classes) head outputs → (M, [K,] classes), one row of logits per class target."""
    return pred.reshape(*target.shape, -1)


def class_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every class target of every corrupted patch (each of the K cells alike)."""
    return F.cross_entropy(as_classes(pred, target).flatten(0, -2), target.flatten())  # (M·K, classes), (M·K,)


def class_floor(guess: torch.Tensor, target: torch.Tensor) -> dict:
    """The accuracy of guessed classes, (M, ...) like `target`: the head's argmax, or no learning's guess."""
    return {"accuracy": (guess == target).float().mean()}


def class_metrics(pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> dict:
    return {k: v.detach() for k, v in class_floor(as_classes(pred, target).argmax(-1), target).items()}


def check_cells(vit: ViTConfig, config: MPPConfig) -> None:
    if config.cells > vit.patch_size:  # a cell finer than a pixel predicts nothing new
        raise UsageError(f"--cells {config.cells} is more than the patch size {vit.patch_size}: "
                         f"pass --cells between 1 and {vit.patch_size}")


def class_colors(classes: torch.Tensor, bits: int) -> torch.Tensor:
    """(...) colour classes r·L² + g·L + b → (..., 3) in [0, 1]: each channel its level's centre (l + 0.5) / L."""
    L = 2**bits
    levels = torch.stack([classes // (L * L), classes // L % L, classes % L], -1)  # (..., 3)
    return (levels.float() + 0.5) / L


def render_mean_color(classes: torch.Tensor, P: int, config: MPPConfig) -> torch.Tensor:
    """(M,) classes → (M, P, P, 3): each patch flat in its class's colour."""
    return class_colors(classes, config.bits)[:, None, None, :].expand(-1, P, P, -1)


def render_cells(classes: torch.Tensor, P: int, config: MPPConfig) -> torch.Tensor:
    """(M, cells²) classes → (M, P, P, 3): each cell in its colour, upsampled (nearest) to P×P; P need
    not be a multiple of cells."""
    c = config.cells
    small = class_colors(classes, config.bits).reshape(-1, c, c, 3).permute(0, 3, 1, 2)  # (M, 3, c, c)
    return F.interpolate(small, size=(P, P), mode="nearest").permute(0, 2, 3, 1)  # (M, P, P, 3)


def decode_classes(pred: torch.Tensor, config: MPPConfig) -> torch.Tensor:
    """(M, K·classes) logits → (M, K) argmax classes, one per cell."""
    return pred.reshape(len(pred), -1, color_classes(config)).argmax(-1)


register_target(Target(
    "mean_color", "mean_color", "3-bit mean colour, 512 classes",
    head_width=lambda vit, c: color_classes(c),
    target=lambda images, P, c: mean_color_target(images, P, c.bits),  # (B, N)
    loss=class_loss, metrics=class_metrics,
    decode=lambda pred, c: pred.argmax(-1),  # (M,)
    render=render_mean_color, floor=class_floor,
))
register_target(Target(
    "downsample", "downsample", "4×4 cells × 512 classes",
    head_width=lambda vit, c: c.cells**2 * color_classes(c),
    target=lambda images, P, c: downsample_target(images, P, c.cells, c.bits),  # (B, N, cells²)
    loss=class_loss, metrics=class_metrics, check=check_cells, arm="mpp-4x4",
    decode=decode_classes,  # (M, cells²)
    render=render_cells, floor=class_floor,
))
register_target(Target(
    "l2", "l2", "regress the pixels",
    head_width=lambda vit, c: vit.patch_size**2 * vit.in_chans,
    target=lambda images, P, c: patchify(images.float(), P),  # (B, N, P·P·C)
    loss=F.mse_loss, metrics=lambda pred, target, loss: {"mse": loss.detach()}, arm="mpp-l2",
    decode=lambda pred, c: pred,  # (M, P·P·3): the pixels themselves
    render=lambda pixels, P, c: pixels.reshape(-1, P, P, 3).clamp(0, 1),  # patchify's (row, col, channel) order
    floor=lambda guess, target: {"mse": F.mse_loss(guess, target)},
))


# ---------------------------------------------------------------------------------------------
# Corruption, in patch-embedding space


def corrupted_count(corrupt_rate: float, num_patches: int) -> int:
    """Patches corrupted per image (and so the tokens MPP's last block computes): exact, at least 1."""
    return max(1, round(corrupt_rate * num_patches))


UNTOUCHED, MASKED, RANDOM, KEPT = 0, 1, 2, 3  # Corruption.kind's values


@dataclass(frozen=True, eq=False)
class Corruption:
    """What `corrupt_patches` did to a batch of B images of N patch embeddings, n of them corrupted each."""
    patches: torch.Tensor  # (B, N, D) the corrupted embeddings, what the ViT sees
    chosen: torch.Tensor  # (B, n) long: each image's corrupted patch indices, sorted
    # (B, N) int8: UNTOUCHED 0, MASKED 1 ([mask]), RANDOM 2 (another patch's), KEPT 3 (corrupted, unchanged)
    kind: torch.Tensor
    source: torch.Tensor  # (B, N) long: flat index b·N + i of the patch each embedding came from; B·N for [mask]


def corrupt_patches(
    patches: torch.Tensor, mask_token: torch.Tensor, config: MPPConfig, generator: torch.Generator | None = None
) -> Corruption:
    """Corrupt an exact `corrupt_rate` of each image's patch embeddings, BERT-style.

    patches: (B, N, D); mask_token: (1, 1, D). Every draw comes from `generator` (None: torch's global one).
    Fixed-size indices (`chosen`) rather than a boolean mask so callers gather without a device sync.
    """
    B, N, D = patches.shape
    if B * N < 2:
        raise UsageError("MPP needs at least two patches per batch to pick random replacements: "
                         "use a larger batch or image")
    dev = patches.device
    n_corrupt = corrupted_count(config.corrupt_rate, N)
    # Exactly n_corrupt per image: the n smallest of N uniform draws (as MAE's random_masking).
    noise = torch.rand(B, N, device=dev, generator=generator)  # (B, N)
    chosen = noise.argsort(dim=1)[:, :n_corrupt].sort(dim=1).values  # (B, n)
    corrupted = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter_(1, chosen, True)
    # Each corrupted patch independently becomes [mask] / random / kept with the configured split.
    u = torch.rand(B, N, device=dev, generator=generator)  # (B, N)
    to_mask = corrupted & (u < config.mask_prob)
    to_random = corrupted & ~to_mask & (u < config.mask_prob + config.random_prob)
    # A random other patch of the batch: uniform over the B·N − 1 others, so never itself.
    own = torch.arange(B * N, device=dev).view(B, N)
    other = torch.randint(0, B * N - 1, (B, N), device=dev, generator=generator)
    other = other + (other >= own)  # (B, N) flat indices ≠ own
    # One gather builds the result: row B·N of the table is the [mask] embedding. Its backward is
    # one scatter-add, where chained torch.where calls cost several passes over (B, N, D) each way.
    # F.embedding, not table[source]: on CPU its scatter-add is deterministic (indexing's is not, and
    # the [mask] row repeats thousands of times), so runs and resumes stay bitwise reproducible.
    table = torch.cat([patches.reshape(B * N, D), mask_token.reshape(1, D).to(patches.dtype)])  # (B·N + 1, D)
    source = torch.where(to_mask, B * N, torch.where(to_random, other, own))  # (B, N) rows of the table
    x = F.embedding(source, table)  # (B, N, D)
    kind = torch.where(to_mask, MASKED, torch.where(to_random, RANDOM, torch.where(corrupted, KEPT, UNTOUCHED)))
    return Corruption(x, chosen, kind.to(torch.int8), source)


# ---------------------------------------------------------------------------------------------
# The objectives


class MPPObjective(nn.Module):
    """ViT + [mask] embedding + a linear prediction head on each patch's output token."""

    def __init__(self, vit: ViT, config: MPPConfig = MPPConfig()):
        super().__init__()
        self.config = config.validate()
        self.vit = vit
        self.entry = TARGETS[config.target]  # the target's row of the table
        if self.entry.check is not None:
            self.entry.check(vit.config, config)
        D = vit.config.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(D, self.entry.head_width(vit.config, config))
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters AdamW leaves undecayed besides vectors: the ViT's embeddings
        and tokens, and the [mask] embedding."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"mask_token"}

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) in [0, 1] → the target of every patch, (B, N, ...)."""
        return self.entry.target(images, self.vit.config.patch_size, self.config)

    def predict(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, Corruption]:
        """images: (B, 3, H, W) in [0, 1] → (the head's outputs (B, n, head_width) float32, the targets
        of the same patches (B, n, ...), the Corruption), n corrupted patches per image; the corruption
        draws from `generator` (None: torch's global one)."""
        target = self.targets(images)  # (B, N, ...)
        patches = self.vit.embed_patches(normalize(images))  # (B, N, D)
        corruption = corrupt_patches(patches, self.mask_token, self.config, generator)
        # Only the corrupted patches are predicted (token i + 1 is patch i): the ViT computes no more.
        tokens = self.vit.forward_tokens(corruption.patches, keep=corruption.chosen + 1)  # (B, n, D)
        pred = self.head(tokens).float()  # (B, n, head_width)
        return pred, gather_tokens(target, corruption.chosen), corruption  # target: (B, n, ...)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """images: (B, 3, H, W) in [0, 1]; labels unused (MPP needs none). → (loss, metrics), the loss
        over the corrupted patches only."""
        pred, target, corruption = self.predict(images)
        pred, target = pred.flatten(0, 1), target.flatten(0, 1)  # (M, head_width), (M, ...): M = B·n
        loss = self.entry.loss(pred, target)
        metrics = {"loss": loss.detach(), **self.entry.metrics(pred, target, loss)}
        if not self.training and self.entry.floor is not None:  # evaluating: what no learning scores, beside it
            metrics |= {f"floor_{k}": v.detach() for k, v in self.floor(images, corruption, target).items()}
        return loss, metrics

    def floor(self, images: torch.Tensor, corruption: Corruption, target: torch.Tensor) -> dict:
        """The no-learning guess's metrics (mpp.model.floor) on these images and this corruption;
        `target`: the corrupted patches' targets, (M, ...)."""
        P = self.vit.config.patch_size
        grid = (images.shape[-2] // P, images.shape[-1] // P)
        filled = neighbour_fill(patchify(images.float(), P), corruption.kind != UNTOUCHED, grid)  # (B, N, P·P·C)
        guess = gather_tokens(self.targets(unpatchify(filled, P, grid)), corruption.chosen)  # (B, n, ...)
        return self.entry.floor(guess.flatten(0, 1), target)


class SupervisedObjective(nn.Module):
    """ViT with its classification head, cross-entropy on the labels (the supervised / from-scratch baseline)."""

    def __init__(self, vit: ViT, label_smoothing: float = 0.0):
        super().__init__()
        self.vit = vit
        self.label_smoothing = label_smoothing

    def no_weight_decay(self) -> set[str]:
        """Full names of the ViT's embeddings and tokens, which AdamW leaves undecayed."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.vit(normalize(images)).float()  # (B, K)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}
