"""Image classification data for every entry point, named by one spec string.

A spec is `digits` (scikit-learn's bundled 8x8 handwritten digits: real, offline, always there),
a local folder laid out as `train/<class>/<image>` plus `test/` or `val/`, `shards:LOCATION` (tar
shards in the webdataset layout, `<key>.jpg` + `<key>.cls`: mpp.data.shards), or `hf:NAME[:CONFIG]`
(a Hugging Face hub dataset, or hf:PATH of a local one: mpp.data.hub). `load_split` and
`build_dataset` build a split whole, as a data set keeping mpp.data.datasets' contract. Raw items are
(uint8 [3, H, W] RGB, int label); the transforms make float32 [3, S, S] in [0, 1], and `normalize`
maps a batch to the model's [-1, 1] input on device.
`datasets`, scikit-learn and torchvision are imported where used: they are slow to import.

An image folder's layout (which files are images of which class) is mpp.data.folders' convention. Every
source's labels are checked against its classes where the split is built (mpp.data.labels says how).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import PIL.Image
import torch

from mpp.core.errors import UsageError
from mpp.data.datasets import DatasetInfo, ImageDataset, MapImages, TransformFn
from mpp.data.digits import load_digits, stratified_split
from mpp.data.folders import LAYOUTS, folder_listing
from mpp.data.hub import load_hub
from mpp.data.shards import PREFIX as SHARDS_PREFIX
from mpp.data.shards import load_shards
from mpp.data.table_readers import HubImages, HubImageStream

DEFAULT_DATASET = "digits"
# The paper's (big_vision) convention: the model sees (x - 0.5) / 0.5, i.e. pixels in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

SPEC_FORMS = ("pass --dataset digits, a folder of images (train/<class>/<image> for classes), shards:FOLDER "
              "(webdataset tar shards), or hf:NAME (hf:PATH for a local dataset)")
# What makes a dataset labelled, for the refusals of those that need labels (DatasetInfo.require_labels).
LABELLED_FORMS = ("a folder laid out as train/<class>/<image>, tar shards with <key>.cls members, or an hf: dataset "
                  "with a label column")
# A source's data set class with its source's arguments bound; load_split adds the contract's (info, ...).
Make = Callable[..., ImageDataset]


class TensorImages(MapImages):
    """Images held in memory as one tensor (the digits: 1,797 tiny images, so no decoding per item)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, info: DatasetInfo,
                 transform: TransformFn | None = None, seed: int | None = None, strict: bool = False):
        super().__init__(info, transform, seed, strict)
        self.images = images  # uint8 [N, 3, H, W]
        self._labels = labels  # int64 [N]

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> torch.Tensor:
        return self._labels.clone()  # int64 [N]

    def skipped_images(self) -> int:
        return 0  # nothing to decode, so nothing unreadable

    def try_raw(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self._labels[index])  # uint8 [3, H, W], int: never unreadable

    def identity(self, index: int) -> str:
        return hashlib.sha1(self.images[index].numpy().tobytes()).hexdigest()


def dataset_name(spec: str) -> str:
    """A short name for tables and TensorBoard tags: "hf:cifar10" → "cifar10", "/data/pets/" → "pets",
    "shards:/data/in1k/train-{000000..001281}.tar" → "in1k" (the shards' folder)."""
    path = Path(spec.removeprefix("hf:").removeprefix(SHARDS_PREFIX).rstrip("/"))
    if spec.startswith(SHARDS_PREFIX) and (path.suffix == ".tar" or any(c in path.name for c in "{*?")):
        path = path.parent  # a pattern's file name says nothing of the data
    name = path.name or spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def load_split(
    spec: str, split: str, *, streaming: bool = False, strict: bool = False, transform: TransformFn | None = None,
    seed: int | None = None, shuffle_buffer: int = 0,
) -> tuple[ImageDataset, DatasetInfo]:
    """The `split` ("train" or "test") of the dataset `spec`, built whole: items (uint8 [3, H, W] RGB,
    int label), raw unless a `transform` is given (mpp.data.datasets.ImageDataset says what each argument is).

    Map-style unless `streaming`, then a stream, shuffled through a buffer of `shuffle_buffer` items
    when that is not 0 (a DataLoader shuffles a map-style split instead). Unreadable image files are
    skipped with a warning and counted (`skipped_images()`), or with `strict` stop the run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if shuffle_buffer and not streaming:
        raise ValueError("shuffle_buffer shuffles a stream: a map-style split is shuffled by its DataLoader")
    make, info = split_source(spec, split, streaming)
    stream_only = {"shuffle_buffer": shuffle_buffer} if streaming else {}
    return make(info=info, transform=transform, seed=seed, strict=strict, **stream_only), info


def local_folder(spec: str) -> Path | None:
    """The local folder whose files a spec reads, wherever they lie below it (an image folder, an
    hf:PATH folder), or None (digits, a hub name, shards or files named one by one)."""
    if spec == "digits" or spec.startswith(SHARDS_PREFIX):
        return None
    path = Path(spec.removeprefix("hf:")).expanduser()
    return path if path.is_dir() else None


def split_source(spec: str, split: str, streaming: bool = False) -> tuple[Make, DatasetInfo]:
    """(the split's data set class with its source's arguments bound, its DatasetInfo): what
    `load_split` builds from, for those (mpp.data.holdout) that build several data sets from one source.
    A source without the split raises MissingSplit."""
    if spec == "digits":
        return _load_digits(spec, split, streaming)
    if spec.startswith("hf:"):
        return load_hub(spec, split, streaming)
    if spec.startswith(SHARDS_PREFIX):
        return load_shards(spec, split, streaming)
    if spec.startswith((".", "/", "~")) or "/" in spec or os.sep in spec or os.path.exists(spec):
        return _load_folder(spec, split, streaming)
    raise UsageError(f"unknown dataset '{spec}': {SPEC_FORMS}")


def _load_digits(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
    digit_images, target = load_digits()  # float64 [1797, 8, 8] with values 0..16, int64 [1797]
    # Fixed stratified split, the same on every machine: 1437 train / 360 test.
    train_index, test_index = stratified_split(target)
    index = torch.from_numpy(train_index if split == "train" else test_index)  # int64 [N]
    pixels = (torch.from_numpy(digit_images) * 255 / 16).round().to(torch.uint8)  # uint8 [1797, 8, 8]
    images = pixels[index].unsqueeze(1).repeat(1, 3, 1, 1)  # uint8 [N, 3, 8, 8], grey in every channel
    labels = torch.from_numpy(target)[index]  # int64 [N]
    counts = tuple(int(n) for n in torch.bincount(labels, minlength=10))
    info = DatasetInfo(spec, [str(d) for d in range(10)], "scikit-learn's handwritten digits", split, counts)
    if not streaming:
        return functools.partial(TensorImages, images, labels), info
    # Streamed through `datasets` like any other source, so --streaming works (and is testable) offline.
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=info.class_names)})
    rows = {"image": [PIL.Image.fromarray(im[0].numpy()) for im in images], "label": labels.tolist()}
    stream = datasets.Dataset.from_dict(rows, features=features).to_iterable_dataset(num_shards=8)
    return functools.partial(HubImageStream, stream, "image", "label"), info


def _load_folder(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
    """The split of an image folder, loaded or streamed from one listing (mpp.data.folders), so both
    modes hold the same classes (or none), labels and images in the same order by construction.

    Nothing is opened or statted per image: a directory scan takes a few seconds per million names
    (`load_dataset("imagefolder")` stats every file of every split first, about 2 minutes per 100,000)."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise UsageError(f"dataset folder '{spec}' {problem}: {SPEC_FORMS}")
    listing = folder_listing(root, spec, split)
    import datasets

    counts = None
    if listing.labels is not None:  # images per class, from the listing: no image opened
        counts = tuple(Counter(listing.labels)[c] for c in range(len(listing.class_names)))
    info = DatasetInfo(spec, listing.class_names, LAYOUTS[listing.layout], split, counts)
    columns = {"image": listing.paths}
    features = {"image": datasets.Image()}
    if info.labelled:
        columns["label"] = listing.labels
        features["label"] = datasets.ClassLabel(names=info.class_names)
    label_column = "label" if info.labelled else None
    if streaming:
        # Lists in gen_kwargs are the stream's shards: one per image, so .shuffle() permutes all of them
        # (then mixes through the buffer) and processes and DataLoader workers split them evenly.
        stream = datasets.IterableDataset.from_generator(_folder_rows, features=datasets.Features(features),
                                                         gen_kwargs={"paths": listing.paths, "labels": listing.labels})
        return functools.partial(HubImageStream, stream, "image", label_column), info
    # An in-memory table of paths (about 3 s per million to build), no Arrow cache file: forked
    # DataLoader workers share it, and HubImages decodes each image itself.
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return functools.partial(HubImages, table, "image", label_column), info


def _folder_rows(paths: list[str], labels: list[int] | None) -> Iterator[dict]:
    for index, path in enumerate(paths):
        row = {"image": {"path": path, "bytes": None}}
        yield row if labels is None else {**row, "label": labels[index]}


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
    hflip: bool = True, streaming: bool = False, shuffle_buffer: int = 10_000, seed: int | None = None,
    strict: bool = False, transform: TransformFn | None = None,
) -> tuple[ImageDataset, DatasetInfo]:
    """`load_split` with the train or eval transform: items (float32 [3, S, S] in [0, 1], int label).

    `transform` replaces the one `train` picks (fine-tuning brings its own augmentation). `seed`: each
    item's random draws come from it, its epoch and its index (None: from the torch generator as it
    stands; a stream counts None as 0). A streamed train split is shuffled through a buffer of
    `shuffle_buffer` items, with seed + epoch; map-style splits are shuffled by the DataLoader instead."""
    if transform is None:
        transform = train_transform(image_size, crop_scale, hflip) if train else eval_transform(image_size)
    return load_split(spec, split, streaming=streaming, strict=strict, transform=transform, seed=seed,
                      shuffle_buffer=shuffle_buffer if streaming and train else 0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> the model's input (x - MEAN) / STD, on the images' device and dtype."""
    mean = torch.tensor(MEAN, device=images.device, dtype=images.dtype).view(-1, 1, 1)  # [3, 1, 1]
    std = torch.tensor(STD, device=images.device, dtype=images.dtype).view(-1, 1, 1)  # [3, 1, 1]
    return (images - mean) / std  # [B, 3, H, W] in [-1, 1]
