"""`hf:NAME[:CONFIG]` as a dataset source: a Hugging Face hub dataset, or `hf:PATH` of a local one (a
`save_to_disk` folder, or a folder or .parquet / .arrow file `datasets.load_dataset` reads).

`load_hub` picks the split out of what `datasets` loads and hands back its data set class with the
table bound and its DatasetInfo, as mpp.data.sources.load_split's other sources (mpp.data.shards): a
split with an image column and no label column is unlabelled; a label column's values are checked
against the train split's classes (a ClassLabel's names, or 0..its largest label: mpp.data.labels)
where the split is built, or, streamed, as they are read (mpp.data.table_readers.TableReader.label_of).
`datasets` and pyarrow are imported where used: they are slow to import.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from mpp.core.errors import MissingSplit, UsageError, first_line
from mpp.data.datasets import DatasetInfo, ImageDataset
from mpp.data.labels import NO_LABEL, check_labels, class_counts, inferred_classes
from mpp.data.table_readers import HubImages, HubImageStream

# A "test" request falls back to a validation split when there is no test split.
TEST_SPLITS = ("test", "validation", "val")


def load_hub(spec: str, split: str, streaming: bool) -> tuple[Callable[..., ImageDataset], DatasetInfo]:
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


def _wrap(splits: Any, spec: str, split: str, streaming: bool,
          fix: str) -> tuple[Callable[..., ImageDataset], DatasetInfo]:
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
