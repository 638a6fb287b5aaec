"""Randomness that depends on *what* is computed, not on how the work is split or interrupted.

A run killed and resumed, or run on 2 processes instead of 1, must draw the same random numbers
for the same work. Global RNG streams cannot give that: DataLoader workers, process counts and
skipped batches all shift where a stream stands. So each random draw is seeded from its identity:
- an augmentation from (seed, epoch, sample index): any worker, process or resume gets the same crop;
- a training step's draws (MPP corruption, dropout) from (seed, step, micro-batch, process).
"""
from __future__ import annotations

import hashlib

import torch
from torch.utils.data import Dataset


def seed_of(*parts) -> int:
    """A 63-bit seed from any hashable parts; stable across processes, machines and Python runs
    (unlike hash(), which is salted per process for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(Dataset):
    """A map-style dataset whose random transform draws from (seed, epoch, index) for each item.

    The epoch lives in a shared-memory tensor, so persistent DataLoader workers (forked or spawned)
    see `set_epoch` without being restarted.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # int64 []

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):  # CPU only: transforms run on CPU; the caller's stream is untouched
            torch.manual_seed(seed_of(self.seed, int(self.epoch), int(index)))
            return self.dataset[index]

    def __getattr__(self, name: str):  # class names, skipped-image counts, ... of the wrapped dataset
        if name in ("dataset", "__setstate__", "__getstate__"):  # unpickling in a worker: not set yet
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seed_step(seed: int, step: int, micro: int, process: int) -> None:
    """Seed every generator (CPU and accelerators) for one micro-batch of one optimizer step."""
    torch.manual_seed(seed_of(seed, "step", step, micro, process))
