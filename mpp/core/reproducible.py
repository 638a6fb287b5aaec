"""Randomness that depends on *what* is computed, not on how the work is split or interrupted.

A run killed and resumed, or run on 2 processes instead of 1, must draw the same random numbers
for the same work. Global RNG streams cannot give that: DataLoader workers, process counts and
skipped batches all shift where a stream stands. So each random draw is seeded from its identity:
- an augmentation from (seed, epoch, sample index), or in a stream (seed, epoch, loader worker, k-th
  item it reads): any worker, process or resume gets the same crop (the data sets of mpp.data.datasets);
- a training step's draws (MPP corruption, dropout) from (seed, step, micro-batch, process).
"""
from __future__ import annotations

import hashlib

import torch


def seed_of(*parts) -> int:
    """A 63-bit seed from any hashable parts; stable across processes, machines and Python runs
    (unlike hash(), which is salted per process for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_step(seed: int, step: int, micro: int, process: int) -> None:
    """Seed every generator (CPU and accelerators) for one micro-batch of one optimizer step."""
    torch.manual_seed(seed_of(seed, "step", step, micro, process))
