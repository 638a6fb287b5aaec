"""Optimisation pieces shared by pretraining, fine-tuning and the benchmarks, taking plain values.

- `Schedule`: the learning-rate multiplier per optimizer step (linear warmup, then cosine or linear
  decay to a floor), and the LambdaLR that applies it.
- `param_groups`: AdamW's two groups, weight decay on matrices only.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # optimizer steps of the whole run; the decay ends here
    warmup_steps: int = 0  # linear warmup from 0 over these steps
    kind: str = "cosine"  # decay after the warmup: cosine | linear
    floor: float = 0.0  # the multiplier the decay ends at (min_lr / lr)

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at `step` (0-based: the rate step `step + 1` trains with)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * decay

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Stepped by the caller once per optimizer step (not prepared by accelerate, which would step
        it once per process); each group's starting lr is its peak."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)

    def restart(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """After loading a scheduler saved under another run length: the optimizer's rates follow this
        schedule from the step the scheduler stands at (the saved rates were computed for the old one)."""
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * self.factor(scheduler.last_epoch)


def param_groups(module: torch.nn.Module, weight_decay: float, no_decay: Collection[str] = ()) -> list[dict]:
    """Weight decay on matrices only: vectors (norms, biases) and the parameters named in `no_decay`
    (full names, e.g. a ViT's `no_weight_decay()`: embeddings and tokens) are left undecayed."""
    decay, undecayed = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (undecayed if p.ndim <= 1 or name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
