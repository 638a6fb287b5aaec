"""Image classification data for every entry point, named by one spec string.

A spec is `digits` (scikit-learn's bundled 8x8 handwritten digits: real, offline, always there),
a local folder laid out as `train/<class>/<image>` plus `test/` or `val/`, `shards:LOCATION` (tar
shards in the webdataset layout, `<key>.jpg` + `<key>.cls`: mpp.shards), or `hf:NAME[:CONFIG]`
(a Hugging Face hub dataset). `load_split` and `build_dataset` build a split whole, as a data set
keeping mpp.datasets' contract. Raw items are (uint8 [3, H, W] RGB, int label); the transforms make
float32 [3, S, S] in [0, 1], and `normalize` maps a batch to the model's [-1, 1] input on device.
`datasets`, scikit-learn and torchvision are imported where used: they are slow to import.

An image folder's layout (which files are images of which class) is mpp.folders' convention.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import PIL.Image
import torch

from mpp.datasets import (
    DatasetInfo,
    HubImages,
    HubImageStream,
    ImageDataset,
    MapImages,
    TransformFn,
)
from mpp.digits import load_digits, stratified_split
from mpp.errors import UsageError, first_line
from mpp.folders import TEST_FOLDERS, folder_listing
from mpp.shards import PREFIX as SHARDS_PREFIX
from mpp.shards import load_shards

DEFAULT_DATASET = "digits"
# The paper's (big_vision) convention: the model sees (x - 0.5) / 0.5, i.e. pixels in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

SPEC_FORMS = ("pass --dataset digits, a folder laid out as train/<class>/<image>, shards:FOLDER (webdataset "
              "tar shards), or hf:NAME")
# A "test" request falls back to a validation split when there is no test split.
TEST_SPLITS = ("test", "validation", "val")
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

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self._labels[index])  # uint8 [3, H, W], int


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
    int label), raw unless a `transform` is given (mpp.datasets.ImageDataset says what each argument is).

    Map-style unless `streaming`, then a stream, shuffled through a buffer of `shuffle_buffer` items
    when that is not 0 (a DataLoader shuffles a map-style split instead). Unreadable image files are
    skipped with a warning and counted (`skipped_images()`), or with `strict` stop the run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if shuffle_buffer and not streaming:
        raise ValueError("shuffle_buffer shuffles a stream: a map-style split is shuffled by its DataLoader")
    if spec == "digits":
        make, info = _load_digits(spec, split, streaming)
    elif spec.startswith("hf:"):
        make, info = _load_hub(spec, split, streaming)
    elif spec.startswith(SHARDS_PREFIX):
        make, info = load_shards(spec, split, streaming)
    elif spec.startswith((".", "/", "~")) or "/" in spec or os.sep in spec or os.path.exists(spec):
        make, info = _load_folder(spec, split, streaming)
    else:
        raise UsageError(f"unknown dataset '{spec}': {SPEC_FORMS}")
    stream_only = {"shuffle_buffer": shuffle_buffer} if streaming else {}
    return make(info=info, transform=transform, seed=seed, strict=strict, **stream_only), info


def _load_digits(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
    digit_images, target = load_digits()  # float64 [1797, 8, 8] with values 0..16, int64 [1797]
    # Fixed stratified split, the same on every machine: 1437 train / 360 test.
    train_index, test_index = stratified_split(target)
    index = torch.from_numpy(train_index if split == "train" else test_index)  # int64 [N]
    pixels = (torch.from_numpy(digit_images) * 255 / 16).round().to(torch.uint8)  # uint8 [1797, 8, 8]
    images = pixels[index].unsqueeze(1).repeat(1, 3, 1, 1)  # uint8 [N, 3, 8, 8], grey in every channel
    labels = torch.from_numpy(target)[index]  # int64 [N]
    info = DatasetInfo(spec, 10, [str(d) for d in range(10)])
    if not streaming:
        return functools.partial(TensorImages, images, labels), info
    # Streamed through `datasets` like any other source, so --streaming works (and is testable) offline.
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=info.class_names)})
    rows = {"image": [PIL.Image.fromarray(im[0].numpy()) for im in images], "label": labels.tolist()}
    stream = datasets.Dataset.from_dict(rows, features=features).to_iterable_dataset(num_shards=8)
    return functools.partial(HubImageStream, stream, "image", "label"), info


def _load_folder(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
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
        return functools.partial(HubImageStream, stream, "image", "label"), info
    # An in-memory table of paths (about 3 s per million to build), no Arrow cache file: forked
    # DataLoader workers share it, and HubImages decodes each image itself.
    table = datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)
    return functools.partial(HubImages, table, "image", "label"), info


def _folder_rows(paths: list[str], labels: list[int]) -> Iterator[dict]:
    for path, label in zip(paths, labels):
        yield {"image": {"path": path, "bytes": None}, "label": label}


def _load_hub(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise UsageError(f"'{spec}' names no hub dataset: pass hf:NAME or hf:NAME:CONFIG, e.g. hf:uoft-cs/cifar10")
    import datasets

    try:
        splits = datasets.load_dataset(name, config or None, streaming=streaming)
    except Exception as e:  # offline, unknown name, bad config, ...: all fixed by the user
        raise UsageError(f"could not load hub dataset '{name}' ({first_line(e)}): "
                         "check the name and your network, or pass a local image folder") from e
    return _wrap(splits, spec, split, streaming, fix="pass a dataset with a train and a test or validation split")


def _wrap(splits: Any, spec: str, split: str, streaming: bool, fix: str) -> tuple[Make, DatasetInfo]:
    """Pick `split` out of a `datasets` (Iterable)DatasetDict, to be wrapped as one of our data sets."""
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
    return functools.partial(wrapper, table, image_column, label_column), info


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
