"""Image classification data for every entry point, named by one spec string.

A spec is `digits` (scikit-learn's bundled 8x8 handwritten digits: real, offline, always there),
a local folder laid out as `train/<class>/<image>` plus `test/` or `val/`, or `hf:NAME[:CONFIG]`
(a Hugging Face hub dataset). Raw items are (uint8 [3, H, W] RGB, int label); the transforms make
float32 [3, S, S] in [0, 1], and `normalize` maps a batch to the model's [-1, 1] input on device.
`datasets`, scikit-learn and torchvision are imported where used: they are slow to import.

An image folder's layout (which files are images of which class) is mpp.folders' convention.
"""
from __future__ import annotations

import abc
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset

from mpp.errors import UsageError
from mpp.folders import TEST_FOLDERS, folder_listing

DEFAULT_DATASET = "digits"
# The paper's (big_vision) convention: the model sees (x - 0.5) / 0.5, i.e. pixels in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

SPEC_FORMS = "pass --dataset digits, a folder laid out as train/<class>/<image>, or hf:NAME"
# A "test" request falls back to a validation split when there is no test split.
TEST_SPLITS = ("test", "validation", "val")
TransformFn = Callable[[torch.Tensor], torch.Tensor]
# What PIL raises for a file that is not a readable image: unknown format, truncated data, bad headers.
UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


@dataclass(frozen=True)
class DatasetInfo:
    spec: str  # the spec string as given
    num_classes: int
    class_names: list[str]


class TensorImages(Dataset):
    """Images held in memory as one tensor (the digits: 1,797 tiny images, so no decoding per item)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: TransformFn | None = None):
        self.images = images  # uint8 [N, 3, H, W]
        self.labels = labels  # int64 [N]
        self.transform = transform  # set by build_dataset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]  # uint8 [3, H, W]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class ImageReader(abc.ABC):
    """Decodes a `datasets` image column itself, so that an unreadable file is caught with its path:
    skipped with a warning and counted, or, when `strict`, a one-line error.

    The record of unreadable images lives in shared memory, so DataLoader worker processes add to it."""

    def __init__(self, table: Any, image_column: str, label_column: str, strict: bool):
        import datasets

        table = table.select_columns([image_column, label_column])  # don't decode columns we drop
        if isinstance((table.features or {}).get(image_column), datasets.Image):  # cells become {"path", "bytes"}
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table = table
        self.image_column, self.label_column = image_column, label_column
        self.strict = strict

    @abc.abstractmethod
    def skipped_images(self) -> int:
        """How many distinct images were skipped as unreadable so far, over all worker processes."""

    def read(self, row: dict) -> torch.Tensor | None:
        """uint8 [3, H, W] RGB of the row's image; None (after a warning) when it is unreadable."""
        cell = row[self.image_column]
        try:
            return rgb_tensor(open_image(cell))
        except UNREADABLE as e:
            name = (cell.get("path") if isinstance(cell, dict) else None) or f"row with label {row[self.label_column]}"
            reason = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
            if self.strict:
                raise UsageError(f"image '{name}' cannot be read ({reason}): remove or replace it, "
                                 "or drop --strict-images to skip unreadable images") from e
            self.record_skip(name)
            # One write of the whole line: loader workers warn at once, and print() writes the text and
            # its newline separately, so their lines could interleave.
            sys.stderr.write(f"warning: skipping unreadable image '{name}' ({reason}); {self.skipped_images()} "
                             "skipped so far: pass --strict-images to stop instead\n")
            sys.stderr.flush()
            return None

    @abc.abstractmethod
    def record_skip(self, name: str) -> None:
        """Remember that the image being read, `name`, is unreadable."""


class HubImages(ImageReader, Dataset):
    """A map-style `datasets.Dataset` (hub or image folder) whose images decode to uint8 RGB tensors.

    An unreadable image is replaced by the next readable one (deterministically, wrapping around)
    and marked, so it is reported and decoded once, not each time a neighbour falls back on it."""

    def __init__(self, table: Any, image_column: str, label_column: str, transform: TransformFn | None = None,
                 strict: bool = False):
        super().__init__(table, image_column, label_column, strict)
        self.transform = transform  # set by build_dataset
        self.unreadable = torch.zeros(len(self.table), dtype=torch.bool).share_memory_()  # bool [N]: 1 MB per million
        self._current = -1  # the index being read, for record_skip

    def __len__(self) -> int:
        return len(self.table)

    def skipped_images(self) -> int:
        return int(self.unreadable.sum())

    def record_skip(self, name: str) -> None:
        self.unreadable[self._current] = True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self)):
            self._current = (int(index) + offset) % len(self)
            if self.unreadable[self._current]:
                continue
            row = self.table[self._current]
            image = self.read(row)  # uint8 [3, H, W] | None
            if image is not None:
                return (self.transform(image) if self.transform else image), int(row[self.label_column])
        raise UsageError("no image of the dataset can be read: check the files (see the warnings above)")


class HubImageStream(ImageReader, IterableDataset):
    """A streamed `datasets.IterableDataset`. It has no __len__: callers use that to tell streams apart.

    DataLoader workers each read their own shards (the wrapped stream checks the worker info itself).
    An unreadable image is dropped from the stream, and counted once however many epochs meet it."""

    def __init__(self, stream: Any, image_column: str, label_column: str, transform: TransformFn | None = None,
                 strict: bool = False):
        super().__init__(stream, image_column, label_column, strict)
        self.transform = transform  # set by build_dataset
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()  # int64 []: distinct images skipped
        self.seed = 0  # of the augmentations; build_dataset sets it
        self._seen: set[str] = set()  # this process's skipped names (each worker reads its own shards)

    @property
    def stream(self) -> Any:  # build_dataset may shuffle it
        return self.table

    @stream.setter
    def stream(self, value: Any) -> None:
        self.table = value

    def skipped_images(self) -> int:
        return int(self.skipped)

    def record_skip(self, name: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.skipped.add_(1)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # a shuffled stream reshuffles with seed + epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        from mpp.reproducible import seed_of

        # The k-th item of a worker's share draws its augmentation from (seed, epoch, worker, k): a
        # resumed run, which reads its way back to the same position, repeats the same crops.
        info = torch.utils.data.get_worker_info()
        worker, epoch = (info.id if info else 0), getattr(self.stream, "epoch", 0)
        for k, row in enumerate(self.stream):
            image = self.read(row)  # uint8 [3, H, W] | None
            if image is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of(self.seed, epoch, worker, k))
                image = self.transform(image) if self.transform else image
            yield image, int(row[self.label_column])


def open_image(cell: Any) -> Any:
    """A `datasets` image cell stored undecoded ({"path", "bytes"}) → a PIL image decoded now, so a
    truncated file fails here and not in a transform; anything else (PIL image, array) as it is."""
    if not isinstance(cell, dict):
        return cell
    image = PIL.Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
    image.load()
    return image


def rgb_tensor(image: Any) -> torch.Tensor:
    """A decoded image of any PIL mode (L, P, RGBA, CMYK, 16-bit ...) or an array -> uint8 [3, H, W] RGB."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image))
    if image.mode.startswith("I"):  # 16-bit grayscale (PNG/TIFF): PIL's convert would clip to white
        image = PIL.Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    return pil_to_tensor(image.convert("RGB"))  # uint8 [3, H, W]


def dataset_name(spec: str) -> str:
    """A short name for tables and TensorBoard tags: "hf:cifar10" → "cifar10", "/data/pets/" → "pets"."""
    name = Path(spec.removeprefix("hf:").rstrip("/")).name or spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def load_split(spec: str, split: str, *, streaming: bool = False, strict: bool = False) -> tuple[Dataset, DatasetInfo]:
    """The raw `split` ("train" or "test") of the dataset `spec`: items (uint8 [3, H, W] RGB, int label).

    Map-style (has __len__) unless `streaming`, then a torch IterableDataset. Unreadable image files
    are skipped with a warning and counted (`skipped_images()`), or with `strict` stop the run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if spec == "digits":
        dataset, info = _load_digits(spec, split, streaming)
    elif spec.startswith("hf:"):
        dataset, info = _load_hub(spec, split, streaming)
    elif spec.startswith((".", "/", "~")) or "/" in spec or os.sep in spec or os.path.exists(spec):
        dataset, info = _load_folder(spec, split, streaming)
    else:
        raise UsageError(f"unknown dataset '{spec}': {SPEC_FORMS}")
    if isinstance(dataset, ImageReader):
        dataset.strict = strict
    return dataset, info


def _load_digits(spec: str, split: str, streaming: bool) -> tuple[Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # pixel values 0..16
    # Fixed stratified split, the same on every machine: 1437 train / 360 test.
    train_index, test_index = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0
    )
    index = torch.from_numpy(train_index if split == "train" else test_index)  # int64 [N]
    pixels = (torch.from_numpy(digits.images) * 255 / 16).round().to(torch.uint8)  # uint8 [1797, 8, 8]
    images = pixels[index].unsqueeze(1).repeat(1, 3, 1, 1)  # uint8 [N, 3, 8, 8], grey in every channel
    labels = torch.from_numpy(digits.target)[index]  # int64 [N]
    info = DatasetInfo(spec, 10, [str(d) for d in range(10)])
    if not streaming:
        return TensorImages(images, labels), info
    # Streamed through `datasets` like any other source, so --streaming works (and is testable) offline.
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=info.class_names)})
    rows = {"image": [PIL.Image.fromarray(im[0].numpy()) for im in images], "label": labels.tolist()}
    stream = datasets.Dataset.from_dict(rows, features=features).to_iterable_dataset(num_shards=8)
    return HubImageStream(stream, "image", "label"), info


def _load_folder(spec: str, split: str, streaming: bool) -> tuple[Dataset, DatasetInfo]:
    """The split of an image folder, loaded or streamed from one listing (`_folder_listing`), so both
    modes hold the same classes, labels and images in the same order by construction (mpp.folders).

    Nothing is opened or statted per image: a directory scan takes a few seconds per million names
    (`load_dataset("imagefolder")` stats every file of every split first, about 2 minutes per 100,000)."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise UsageError(f"dataset folder '{spec}' {problem}: {SPEC_FORMS}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    listing = ", ".join(f"{name}/" for name in found) or "no subfolders"
    if "train" not in found:
        raise UsageError(f"dataset folder '{spec}' has no train/ subfolder (found {listing}): "
                         "lay it out as train/<class>/<image> and test/<class>/<image>")
    test_folder = next((f for f in TEST_FOLDERS if f in found), None)
    if split == "test" and test_folder is None:
        raise UsageError(f"dataset folder '{spec}' has no test split (found {listing}): "
                         "add test/<class>/<image> or val/<class>/<image>")
    class_names, paths, labels = folder_listing(root, spec, split, test_folder)
    import datasets

    info = DatasetInfo(spec, len(class_names), class_names)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    if streaming:
        # Lists in gen_kwargs are the stream's shards: one per image, so .shuffle() permutes all of them
        # (then mixes through the buffer) and processes and DataLoader workers split them evenly.
        stream = datasets.IterableDataset.from_generator(
            _folder_rows, features=features, gen_kwargs={"paths": paths, "labels": labels})
        return HubImageStream(stream, "image", "label"), info
    # An in-memory table of paths (about 3 s per million to build), no Arrow cache file: forked
    # DataLoader workers share it, and HubImages decodes each image itself.
    table = datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)
    return HubImages(table, "image", "label"), info


def _folder_rows(paths: list[str], labels: list[int]) -> Iterator[dict]:
    for path, label in zip(paths, labels):
        yield {"image": {"path": path, "bytes": None}, "label": label}


def _load_hub(spec: str, split: str, streaming: bool) -> tuple[Dataset, DatasetInfo]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise UsageError(f"'{spec}' names no hub dataset: pass hf:NAME or hf:NAME:CONFIG, e.g. hf:uoft-cs/cifar10")
    import datasets

    try:
        splits = datasets.load_dataset(name, config or None, streaming=streaming)
    except Exception as e:  # offline, unknown name, bad config, ...: all fixed by the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"could not load hub dataset '{name}' ({reason}): "
                         "check the name and your network, or pass a local image folder") from e
    return _wrap(splits, spec, split, streaming, fix="pass a dataset with a train and a test or validation split")


def _wrap(splits: Any, spec: str, split: str, streaming: bool, fix: str) -> tuple[Dataset, DatasetInfo]:
    """Pick `split` out of a `datasets` (Iterable)DatasetDict and wrap it as a torch dataset."""
    import datasets

    names = [s for s in ((split,) if split == "train" else TEST_SPLITS) if s in splits]
    if not names:
        raise UsageError(f"dataset '{spec}' has no {split} split (it has {', '.join(splits) or 'none'}): {fix}")
    table = splits[names[0]]
    features = table.features or {}  # a stream may not know its columns
    image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image_column = image_column or next((c for c in ("img", "image") if c in features), None)
    label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_column = label_column or next((c for c in ("label", "labels", "fine_label") if c in features), None)
    if image_column is None or label_column is None:
        raise UsageError(f"dataset '{spec}' has no image and label columns (columns: "
                         f"{', '.join(features) or 'unknown'}): pass an image classification dataset")
    if len(names) > 1 and not _labelled(table, label_column):  # e.g. ImageNet-1k's test split: all -1
        table = splits[names[1]]
    if isinstance(features[label_column], datasets.ClassLabel):
        class_names = list(features[label_column].names)
    elif not streaming:  # plain integer labels: classes 0..max
        class_names = [str(c) for c in range(max(table[label_column]) + 1)]
    else:
        raise UsageError(f"streamed dataset '{spec}' does not list its classes: drop --streaming")
    info = DatasetInfo(spec, len(class_names), class_names)
    wrapper = HubImageStream if streaming else HubImages
    return wrapper(table, image_column, label_column), info


def _labelled(table: Any, label_column: str) -> bool:
    """Whether a split has labels: hub test splits are sometimes published with every label -1."""
    first = next(iter(table.select_columns([label_column])), None)  # skips decoding the image
    return first is not None and first[label_column] >= 0


def train_transform(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> TransformFn:
    """uint8 [3, H, W] -> float32 [3, S, S] in [0, 1]: the paper's inception crop (+ flip)."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True)]  # bilinear
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))  # after the crop: resizing uint8 is faster
    return v2.Compose(steps)


def eval_transform(image_size: int) -> TransformFn:
    """uint8 [3, H, W] -> float32 [3, S, S] in [0, 1]: shorter side to S, then the centre S x S."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
    ])


def build_dataset(
    spec: str, split: str, image_size: int, *, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True, streaming: bool = False, shuffle_buffer: int = 10_000, seed: int = 0, strict: bool = False,
) -> tuple[Dataset, DatasetInfo]:
    """`load_split` plus the train or eval transform: items (float32 [3, S, S] in [0, 1], int label).

    A streamed train split is shuffled through a buffer of `shuffle_buffer` items (seeded by `seed`);
    map-style splits are shuffled by the DataLoader instead."""
    dataset, info = load_split(spec, split, streaming=streaming, strict=strict)
    # Every wrapper above applies its `transform` attribute to each raw image.
    dataset.transform = train_transform(image_size, crop_scale, hflip) if train else eval_transform(image_size)
    if streaming and train:
        dataset.stream = dataset.stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        dataset.seed = seed
    return dataset, info


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the model's input (x - MEAN) / STD, on the images' device and dtype."""
    mean = torch.tensor(MEAN, device=images.device, dtype=images.dtype).view(-1, 1, 1)  # [3, 1, 1]
    std = torch.tensor(STD, device=images.device, dtype=images.dtype).view(-1, 1, 1)  # [3, 1, 1]
    return (images - mean) / std  # [B, 3, H, W] in [-1, 1]
