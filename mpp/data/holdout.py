"""What pretraining trains and evaluates on (`Splits`), and the held-out split it carves from the
training images when a dataset has no test split (an unlabelled folder, most often).

The carve is fixed by the data alone: HOLDOUT_SEED, not the run's --seed, draws it, so every run on
the same images (any seed, either objective) is evaluated on the same held-out images, a resumed run
on the ones it started with, and every process of `accelerate launch` draws the same. Its images are
never trained on.
- A map-style set (loaded): `--holdout-images` images (at most a tenth of the set), a seeded random
  subset of it; training reads the rest (`MapSubset`). An unreadable image's stand-in comes from its
  own side of the carve.
- A stream: the first `--holdout-images` images of the stream in the order HOLDOUT_SEED shuffles it
  (its shards permuted, then mixed through the run's shuffle buffer). The stream is counted on, undecoded,
  up to ten times that many images: one that ends sooner holds out its first tenth. The held-out
  images are held in memory, undecoded, and read as a map-style set; the training stream skips
  every image with the same bytes (or path) wherever it meets one (mpp.data.table_readers.image_identity).
What was carved is written in the run's config.json (`data.holdout`: its count, seed, rule and a
fingerprint of the images held out) and said in its log; a resume that would carve other images is
refused (mpp.run.rundir.check_resume).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mpp.core.errors import MissingSplit, UsageError
from mpp.data.datasets import DatasetInfo, ImageDataset, MapImages, TransformFn
from mpp.data.sources import build_dataset, eval_transform, split_source, train_transform
from mpp.data.table_readers import HubImages, image_identity

HOLDOUT_SEED = 0  # draws every carve: the same held-out images for every run on the same data
MAX_SHARE = 10  # at most a tenth of the training images are held out


class MapSubset(MapImages):
    """The items `indices` of a map-style set read raw (`base`, transform None), as a data set of
    their own with its own transform and seeds: item i is base item indices[i]. Unreadable images
    are the base's: its skips (and their count) are shared by every subset of it."""

    def __init__(self, base: MapImages, indices: np.ndarray, *, info: DatasetInfo, transform: TransformFn | None = None,
                 seed: int | None = None, strict: bool = False):
        super().__init__(info, transform, seed, strict)
        if base.transform is not None:
            raise ValueError("MapSubset reads its base raw: build the base without a transform")
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)  # int64 [n], into base

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> torch.Tensor:
        return self.base.labels()[torch.from_numpy(self.indices)]  # int64 [n]

    def require_labels(self, fix: str, train: DatasetInfo | None = None) -> DatasetInfo:
        self.base.require_labels(fix, train)  # the items are the base's: its reads check their labels
        return super().require_labels(fix, train)

    def skipped_images(self) -> int:
        return self.base.skipped_images()

    def try_raw(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self.base.try_raw(int(self.indices[index]))  # uint8 [3, H, W], int | None

    def identity(self, index: int) -> str:
        return self.base.identity(int(self.indices[index]))


def fingerprint(identities) -> str:
    """One hash of a set of images (mpp.data.table_readers.image_identity each): equal exactly when the sets are."""
    return hashlib.sha1("\n".join(sorted(identities)).encode()).hexdigest()


@dataclass(frozen=True)
class Splits:
    """What a pretraining run trains and evaluates on, built whole from one spec."""
    train: ImageDataset  # the train transform, seeded by the run
    eval: ImageDataset  # the source's test split, or the held-out split carved from train; eval transform
    info: DatasetInfo
    holdout: dict | None  # how the held-out split was carved (config.json's data.holdout); None: the test split

    def train_images(self) -> int | None:
        """How many images training reads per epoch, or None for a stream whose length is not known
        (a carve counts a stream only when it ends within ten times the held-out images)."""
        if not self.train.streamed:
            return len(self.train)
        counted = (self.holdout or {}).get("of")
        return None if counted is None else counted - self.holdout["images"]

    def note(self) -> str | None:
        """The log's line on the carve, or None when the source has a test split."""
        if self.holdout is None:
            return None
        return f"held-out split: {self.holdout['rule']} ({self.holdout['why']})"


def pretraining_splits(spec: str, image_size: int, *, holdout_images: int, crop_scale=(0.08, 1.0),
                       hflip: bool = True, streaming: bool = False, shuffle_buffer: int = 10_000,
                       seed: int | None = None, strict: bool = False) -> Splits:
    """The training split (train transform, `seed`) and the held-out one (eval transform) of `spec`:
    its test split, or, when it has none, `holdout_images` images carved from its training images."""
    train_kw = {"crop_scale": crop_scale, "hflip": hflip, "streaming": streaming, "shuffle_buffer": shuffle_buffer,
                "seed": seed, "strict": strict}
    try:
        held_out, _ = build_dataset(spec, "test", image_size, train=False, streaming=streaming, strict=strict)
    except MissingSplit as missing:
        carve = _carve_stream if streaming else _carve_map
        return carve(spec, image_size, holdout_images, missing.problem, train_kw)  # the carve is the fix
    train, info = build_dataset(spec, "train", image_size, train=True, **train_kw)
    return Splits(train, held_out, info, None)


def too_few(spec: str, total: int) -> UsageError:
    return UsageError(f"dataset '{spec}' has no test split and only {total} training image(s), too few to hold out a "
                      f"tenth for the held-out evaluation: pass a dataset with {MAX_SHARE} or more images or with a "
                      "test split")


def _carve_map(spec: str, image_size: int, wanted: int, why: str, train_kw: dict) -> Splits:
    make, info = split_source(spec, "train", False)
    base = make(info=info, transform=None, seed=None, strict=train_kw["strict"])
    total = len(base)
    count = min(wanted, total // MAX_SHARE)
    if count < 1:
        raise too_few(spec, total)
    held = np.sort(np.random.default_rng(HOLDOUT_SEED).choice(total, size=count, replace=False))  # int64 [count]
    rest = np.setdiff1d(np.arange(total), held)  # int64 [total - count], sorted
    train = MapSubset(base, rest, info=info, transform=train_transform(image_size, train_kw["crop_scale"],
                      train_kw["hflip"]), seed=train_kw["seed"], strict=train_kw["strict"])
    held_out = MapSubset(base, held, info=info, transform=eval_transform(image_size), strict=train_kw["strict"])
    record = {"images": count, "of": total, "seed": HOLDOUT_SEED, "why": why,
              "fingerprint": fingerprint(held_out.identity(i) for i in range(count)),
              "rule": f"{count:,} of the {total:,} training images (a random subset drawn with seed {HOLDOUT_SEED}) "
                      f"are held out and never trained on; training reads the other {total - count:,}"}
    return Splits(train, held_out, info, record)


def _carve_stream(spec: str, image_size: int, wanted: int, why: str, train_kw: dict) -> Splits:
    import datasets

    make, info = split_source(spec, "train", True)
    buffer = train_kw["shuffle_buffer"]
    base = make(info=info, transform=None, seed=HOLDOUT_SEED, strict=train_kw["strict"], shuffle_buffer=buffer)
    stream = base.undecoded_rows()  # {image column: {"path", "bytes"}, label column?, ...}: nothing decoded
    rows = list(itertools.islice(stream, wanted))
    # Counted on (not kept) to ten times as many: a shorter stream holds out only its first tenth.
    total = len(rows) + sum(1 for _ in itertools.islice(stream, (MAX_SHARE - 1) * wanted))
    known = total < MAX_SHARE * wanted  # the stream ended: its length is known
    rows = rows[:total // MAX_SHARE] if known else rows
    if not rows:
        raise too_few(spec, total)
    identities = [image_identity(row[base.image_column]) for row in rows]
    exclude = frozenset(identities)
    train = make(info=info, transform=train_transform(image_size, train_kw["crop_scale"], train_kw["hflip"]),
                 seed=train_kw["seed"], strict=train_kw["strict"], shuffle_buffer=buffer, exclude=exclude)
    table = datasets.Dataset.from_list(rows)  # a few MB to a few hundred: the held-out images' files, in memory
    held_out = HubImages(table, base.image_column, base.label_column, info=info, transform=eval_transform(image_size),
                         strict=train_kw["strict"])
    of = f"of its {total:,} images" if known else f"of its at least {total:,} images"
    record = {"images": len(rows), "of": total if known else None, "seed": HOLDOUT_SEED, "why": why,
              "fingerprint": fingerprint(identities),
              "rule": f"the first {len(rows):,} {of} in the training stream shuffled with seed {HOLDOUT_SEED} "
                      f"(shards permuted, a {buffer:,}-image buffer) are held out; training skips every image "
                      "with the same bytes (or path)"}
    return Splits(train, held_out, info, record)
