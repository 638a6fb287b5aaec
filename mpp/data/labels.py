"""Labels read from files, checked where a split is built, before anything is sized by them.

A labelled split's labels are class numbers 0..K-1. Its K classes come from a class list (a
`ClassLabel` feature, classes.txt or classes.json beside shards, a folder's class folders), or,
without one, from the train split's labels: 0..the largest. Without a list the largest label must
be below the number of labelled training images: K classes need K images to each have one, so a
larger label leaves classes empty by construction (a typo, or a label of 10^12 that would size a
10^12-class head and list), and K stays bounded by the data already read. A test split's labels
are class numbers of the train split's classes.

-1 is the Hugging Face convention for an image without a label: a Hugging Face split labelled -1
throughout is unlabelled (mpp.data.sources), and one with some -1 stays labelled, its -1 images counted
(DatasetInfo.unlabelled_items) so that whatever needs labels refuses it while MPP, which ignores
labels, reads it. Shards have no such convention: a negative `cls` is refused (mpp.data.shards).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mpp.core.errors import UsageError

NO_LABEL = -1  # the label every item of an unlabelled data set carries (a batch still collates)
# A row's name in a refusal: "row 20 of split 'train' of dataset 'hf:x'", "sample 'k3' of shard 'a.tar'".
RowName = Callable[[int], str]


def first_outside(labels: np.ndarray, low: int, high: int | None) -> int | None:
    """The index of the first label below `low` or (high not None) at or above `high`, or None."""
    bad = labels < low
    if high is not None:
        bad |= labels >= high
    return int(np.argmax(bad)) if bad.any() else None


def inferred_classes(labels: np.ndarray, name_row: RowName, fix: str) -> list[str] | None:
    """The classes "0".."largest" of a train split's labels (-1 or more: checked before) read without a
    class list; None when none is 0 or more (every image -1: an unlabelled split). A largest label
    at or above the number of labelled images is refused, naming its row (the module docstring)."""
    labelled = int((labels >= 0).sum())
    if not labelled:
        return None
    row = int(np.argmax(labels))
    largest = int(labels[row])
    if largest >= labelled:
        raise UsageError(f"{name_row(row)} has label {largest:,}: without a class list the classes are 0..the largest "
                         f"label, and {largest + 1:,} classes are more than its {labelled:,} labelled training "
                         f"images can fill: {fix}")
    return [str(c) for c in range(largest + 1)]


def check_labels(labels: np.ndarray, low: int, num_classes: int | None, name_row: RowName, whose: str,
                 fix: str) -> None:
    """Every label is `low` (NO_LABEL where -1 means "no label", else 0) or more and, when
    `num_classes` is given, below it (the classes `whose`: "its ClassLabel lists"); else a one-line
    refusal naming the first row that is not, the label, and how many are not."""
    row = first_outside(labels, low, num_classes)
    if row is None:
        return
    label = int(labels[row])
    count = int((labels < low).sum()) + (int((labels >= num_classes).sum()) if num_classes else 0)
    also = f" (as are {count - 1:,} more of its {len(labels):,} labels)" if count > 1 else ""
    if label < low:
        number = "0 or more, or -1: no label" if low < 0 else "0 or more"
        raise UsageError(f"{name_row(row)} has label {label:,}, not a class number ({number}){also}: {fix}")
    raise UsageError(f"{name_row(row)} has label {label:,}, outside the {num_classes:,} classes {whose} "
                     f"(0..{num_classes - 1:,}){also}: {fix}")


def class_counts(labels: np.ndarray, num_classes: int) -> tuple[tuple[int, ...], int]:
    """(images per class, images labelled NO_LABEL) of labels already checked to lie in -1..num_classes-1."""
    kept = labels[labels >= 0].astype(np.int64)
    return tuple(int(n) for n in np.bincount(kept, minlength=num_classes)), int((labels == NO_LABEL).sum())
