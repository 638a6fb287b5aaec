"""Image classification data for every entry point, named by one spec string.

A spec is `digits` (scikit-learn's bundled 8x8 handwritten digits: real, offline, always there),
a local folder laid out as `train/<class>/<image>` plus `test/` or `val/`, `shards:LOCATION` (tar
shards in the webdataset layout, `<key>.jpg` + `<key>.cls`: mpp.data.shards), or `hf:NAME[:CONFIG]`
(a Hugging Face hub dataset). `load_split` and `build_dataset` build a split whole, as a data set
keeping mpp.data.datasets' contract. Raw items are (uint8 [3, H, W] RGB, int label); the transforms make
float32 [3, S, S] in [0, 1], and `normalize` maps a batch to the model's [-1, 1] input on device.
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
from typing import Any, Callable, Iterator

import PIL.Image
import torch

from mpp.core.errors import MissingSplit, UsageError, first_line
from mpp.data.datasets import (
    DatasetInfo,
    HubImages,
    HubImageStream,
    ImageDataset,
    MapImages,
    TransformFn,
)
from mpp.data.digits import load_digits, stratified_split
from mpp.data.folders import LAYOUTS, folder_listing
from mpp.data.labels import NO_LABEL, check_labels, class_counts, inferred_classes
from mpp.data.shards import PREFIX as SHARDS_PREFIX
from mpp.data.shards import load_shards

DEFAULT_DATASET = "digits"
# The paper's (big_vision) convention: the model sees (x - 0.5) / 0.5, i.e. pixels in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

SPEC_FORMS = ("pass --dataset digits, a folder of images (train/<class>/<image> for classes), shards:FOLDER "
              "(webdataset tar shards), or hf:NAME (hf:PATH for a local dataset)")
# What makes a dataset labelled, for the refusals of those that need labels (DatasetInfo.require_labels).
LABELLED_FORMS = ("a folder laid out as train/<class>/<image>, tar shards with <key>.cls members, or an hf: dataset "
                  "with a label column")
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
        return _load_hub(spec, split, streaming)
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


def _load_hub(spec: str, split: str, streaming: bool) -> tuple[Make, DatasetInfo]:
    """hf:NAME[:CONFIG] from the hub, or hf:PATH of a local dataset: a `save_to_disk` folder, or a folder or
    file `datasets.load_dataset` reads (parquet, arrow, imagefolder, ...)."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise UsageError(f"'{spec}' names no hub dataset: pass hf:NAME or hf:NAME:CONFIG, e.g. hf:uoft-cs/cifar10")
    import datasets

    local = Path(name).expanduser()
    try:
        if _saved_to_disk(local):
            splits = _from_disk(local, streaming)
        elif local.is_file():  # one data file: its suffix names the builder
            builder = {".parquet": "parquet", ".arrow": "arrow"}.get(local.suffix.lower())
            if builder is None:
                raise UsageError(f"'{name}' is not a .parquet or .arrow file: pass hf:FOLDER for other local data")
            splits = datasets.load_dataset(builder, data_files={"train": str(local)}, streaming=streaming)
        else:
            splits = datasets.load_dataset(str(local) if local.exists() else name, config or None, streaming=streaming)
    except UsageError:
        raise
    except Exception as e:  # offline, unknown name, bad config, ...: all fixed by the user
        raise UsageError(f"could not load hub dataset '{name}' ({first_line(e)}): "
                         "check the name and your network, or pass a local image folder") from e
    return _wrap(splits, spec, split, streaming, fix="pass a dataset with a train and a test or validation split")


def _saved_to_disk(path: Path) -> bool:
    """Whether `path` is a folder `Dataset(Dict).save_to_disk` wrote (read by load_from_disk, not load_dataset)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _from_disk(path: Path, streaming: bool) -> Any:
    """A `save_to_disk` folder as a split dict (a single saved Dataset is the train split), streamed
    from its Arrow files without a copy when asked."""
    import datasets

    found = datasets.load_from_disk(str(path))
    splits = found if isinstance(found, datasets.DatasetDict) else datasets.DatasetDict({"train": found})
    if streaming:  # shards for workers and the shuffle: at most one per 1,000 rows, at least one
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset(num_shards=max(1, min(64, len(v) // 1000)))
                                             for k, v in splits.items()})
    return splits


def _wrap(splits: Any, spec: str, split: str, streaming: bool, fix: str) -> tuple[Make, DatasetInfo]:
    """Pick `split` out of a `datasets` (Iterable)DatasetDict, to be wrapped as one of our data sets.
    A split without a label column is unlabelled; one without an image column is refused."""
    names = [s for s in ((split,) if split == "train" else TEST_SPLITS) if s in splits]
    if not names:
        problem = f"dataset '{spec}' has no {split} split (it has {', '.join(splits) or 'none'})"
        raise MissingSplit(problem, fix) if split == "test" else UsageError(f"{problem}: {fix}")
    table = splits[names[0]]
    image_column, label_column = _columns(table)
    if label_column and len(names) > 1 and not _labelled(table, label_column):  # e.g. ImageNet-1k's test split: all -1
        names = names[1:]
        table = splits[names[0]]
        image_column, label_column = _columns(table)
    if image_column is None:
        columns = ", ".join(table.features or {}) or "unknown"  # a stream may not know its columns
        raise UsageError(f"dataset '{spec}' has no image column (columns: {columns}): pass an image dataset (an Image "
                         "feature, or a column named image or img)")
    if label_column is None:  # an image-only dataset: unlabelled, for self-supervised pretraining
        info = DatasetInfo(spec, None, "a Hugging Face dataset without a label column", names[0])
    else:
        info = _hub_labels(splits, table, label_column, spec, names[0], streaming)
    wrapper = HubImageStream if streaming else HubImages
    return functools.partial(wrapper, table, image_column, label_column if info.labelled else None), info


def _columns(table: Any) -> tuple[str | None, str | None]:
    """(the image column, the label column) of a `datasets` split, each None when it has none."""
    import datasets

    features = table.features or {}  # a stream may not know its columns
    image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image_column = image_column or next((c for c in ("img", "image") if c in features), None)
    label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    return image_column, label_column or next((c for c in ("label", "labels", "fine_label") if c in features), None)


def _hub_labels(splits: Any, table: Any, column: str, spec: str, split: str, streaming: bool) -> DatasetInfo:
    """The info of a Hugging Face split with a label column: the classes of the train split (its
    ClassLabel's names, or 0..its largest label: mpp.data.labels), this split's labels checked against
    them and counted; unlabelled when the train split's labels are all -1 (no label). A stream's
    labels are checked as they are read (TableReader.label_of), so it needs the names."""
    import datasets

    train = table if split == "train" else splits.get("train")
    if train is None:
        raise UsageError(f"dataset '{spec}' has no train split (it has {', '.join(splits)}): pass a dataset with a "
                         "train split, the classes its labels are numbers of")
    if column not in (train.features or {}):  # labels in test alone would be numbers of no train class
        return DatasetInfo(spec, None, f"a Hugging Face dataset whose train split has no label column '{column}'",
                           split)
    listed = _class_list(train, column, spec)
    if isinstance(table.features[column], datasets.ClassLabel) and _class_list(table, column, spec) != listed:
        raise UsageError(f"split '{split}' of dataset '{spec}' names other classes than its train split in "
                         f"'{column}': give every split the same ClassLabel")
    layout = f"a Hugging Face dataset with labels in '{column}'"
    if streaming:
        if listed is None:
            raise UsageError(f"streamed dataset '{spec}' does not list its classes: drop --streaming")
        return DatasetInfo(spec, listed, layout, split)

    def row(name: str, index: int) -> str:
        return f"row {index} of split '{name}' of dataset '{spec}'"

    whose, unlisted = ("its ClassLabel lists", "fix the label") if listed else \
        ("the train split's labels give", "fix the label, or list every class (a ClassLabel: datasets' cast_column)")
    train_labels = _label_values(train, column, functools.partial(row, "train"))
    check_labels(train_labels, NO_LABEL, len(listed) if listed else None, functools.partial(row, "train"), whose,
                 unlisted)
    if not (train_labels >= 0).any():  # Hugging Face's -1 throughout: published without labels
        return DatasetInfo(spec, None, f"a Hugging Face dataset whose train labels in '{column}' are all -1, "
                           "no label", split)
    classes = listed or inferred_classes(train_labels, functools.partial(row, "train"), unlisted)
    labels = train_labels if split == "train" else _label_values(table, column, functools.partial(row, split))
    check_labels(labels, NO_LABEL, len(classes), functools.partial(row, split), whose, unlisted)
    return DatasetInfo(spec, classes, layout, split, *class_counts(labels, len(classes)))


def _class_list(table: Any, column: str, spec: str) -> list[str] | None:
    """The names of a label column's ClassLabel, None for integer labels; any other column is refused."""
    import datasets

    feature = (table.features or {})[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not _integers(feature):
        raise UsageError(f"dataset '{spec}' has a label column '{column}' of {feature}, not class numbers: "
                         "cast it to class numbers (datasets' class_encode_column) or drop it to read the images "
                         "unlabelled")
    return None


def _label_values(table: Any, column: str, name_row: Callable[[int], str]) -> Any:
    """A loaded split's labels, read whole from Arrow (no image decoded, no Python object per row)
    in their own integer type; a row without a label is refused."""
    import pyarrow.compute as pc

    values = table.select_columns([column]).with_format("arrow")[:][column]  # pyarrow ChunkedArray
    if values.null_count:
        raise UsageError(f"{name_row(pc.index(pc.is_null(values), True).as_py())} has no label: give every image "
                         "its class number (or -1: no label)")
    return values.to_numpy()  # [N]


def _integers(feature: Any) -> bool:
    """Whether a `datasets` feature holds one integer per row (a label column of class numbers)."""
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


def _labelled(table: Any, label_column: str) -> bool:
    """Whether a split has labels: hub test splits are sometimes published with every label -1."""
    first = next(iter(table.select_columns([label_column])), None)  # skips decoding the image
    return first is not None and first[label_column] is not None and first[label_column] >= 0


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
