"""The two training objectives: masked patch prediction (the paper's, App. B.1.2) and supervised.

Both are modules that own the ViT (`.vit`) and map a batch of images in [0, 1] (and labels) to
a loss and detached metrics, so one training loop serves both. MPP targets are computed from the
un-normalised images; the ViT sees `mpp.data.normalize(images)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpp.config import FRACTION, Range, check_ranges
from mpp.data import normalize
from mpp.errors import UsageError
from mpp.model import ViT, gather_tokens

TARGETS = ("mean_color", "downsample", "l2")


@dataclass(frozen=True)
class MPPConfig:
    target: str = "mean_color"  # mean_color: 3-bit mean colour, 512 classes | downsample: 4×4 cells × 512 classes | l2: regress the pixels
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
# Corruption, in patch-embedding space


def corrupted_count(corrupt_rate: float, num_patches: int) -> int:
    """Patches corrupted per image (and so the tokens MPP's last block computes): exact, at least 1."""
    return max(1, round(corrupt_rate * num_patches))


def corrupt_patches(
    patches: torch.Tensor, mask_token: torch.Tensor, config: MPPConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt an exact `corrupt_rate` of each image's patch embeddings, BERT-style.

    patches: (B, N, D); mask_token: (1, 1, D).
    Returns (corrupted patches (B, N, D), the corrupted indices (B, n) sorted, kind (B, N) int8:
    0 untouched, 1 [mask], 2 random other patch, 3 corrupted but kept).
    Fixed-size indices rather than a boolean mask so callers gather without a device sync.
    """
    B, N, D = patches.shape
    if B * N < 2:
        raise UsageError("MPP needs at least two patches per batch to pick random replacements: use a larger batch or image")
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
    kind = torch.where(to_mask, 1, torch.where(to_random, 2, torch.where(corrupted, 3, 0))).to(torch.int8)
    return x, chosen, kind


# ---------------------------------------------------------------------------------------------
# The objectives


class MPPObjective(nn.Module):
    """ViT + [mask] embedding + a linear prediction head on each patch's output token."""

    def __init__(self, vit: ViT, config: MPPConfig = MPPConfig()):
        super().__init__()
        self.config = config.validate()
        self.vit = vit
        D, P = vit.config.embed_dim, vit.config.patch_size
        if config.target == "downsample" and config.cells > P:  # a cell finer than a pixel predicts nothing new
            raise UsageError(f"--cells {config.cells} is more than the patch size {P}: pass --cells between 1 and {P}")
        num_classes = 2 ** (3 * config.bits)
        out = {"mean_color": num_classes, "downsample": config.cells**2 * num_classes, "l2": P * P * vit.config.in_chans}
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(D, out[config.target])
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        P, c = self.vit.config.patch_size, self.config
        if c.target == "mean_color":
            return mean_color_target(images, P, c.bits)  # (B, N)
        if c.target == "downsample":
            return downsample_target(images, P, c.cells, c.bits)  # (B, N, cells²)
        return patchify(images.float(), P)  # (B, N, P·P·3)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """images: (B, 3, H, W) in [0, 1]; labels unused (MPP needs none). → (loss, metrics)."""
        target = self.targets(images)
        patches = self.vit.embed_patches(normalize(images))  # (B, N, D)
        patches, chosen, _ = corrupt_patches(patches, self.mask_token, self.config)  # chosen: (B, n)
        # The loss sees the corrupted patches only (token i + 1 is patch i): the ViT computes no more.
        tokens = self.vit.forward_tokens(patches, keep=chosen + 1)  # (B, n, D)
        pred = self.head(tokens).float().flatten(0, 1)  # (M, out), M = B·n
        target = gather_tokens(target, chosen).flatten(0, 1)  # (M,) | (M, cells²) | (M, P·P·3)
        if self.config.target == "l2":
            loss = F.mse_loss(pred, target)
            return loss, {"loss": loss.detach(), "mse": loss.detach()}
        pred = pred.reshape(*target.shape, -1)  # (M, [cells²,] classes)
        loss = F.cross_entropy(pred.flatten(0, -2), target.flatten())
        accuracy = (pred.argmax(-1) == target).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}


class SupervisedObjective(nn.Module):
    """ViT with its classification head, cross-entropy on the labels (the supervised / from-scratch baseline)."""

    def __init__(self, vit: ViT, label_smoothing: float = 0.0):
        super().__init__()
        self.vit = vit
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.vit(normalize(images)).float()  # (B, K)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}
