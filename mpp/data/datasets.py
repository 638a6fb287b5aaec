"""What a data set is: the contract every data set mpp.data.sources builds keeps (`ImageDataset`), and its
map-style kind with per-item seeding (`MapImages`). The data sets over a Hugging Face `datasets` table or
stream, which decode each image themselves, are mpp.data.table_readers'.

A data set is built whole by its constructor (mpp.data.sources.load_split / build_dataset choose the
arguments) and not changed afterwards; consumers ask it through the members below, never by
looking for attributes.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset

from mpp.core.errors import UsageError
from mpp.core.reproducible import seed_of

TransformFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """What a split holds, whatever its source: its spec, and its classes or that it has none.

    A source is labelled (its classes are named: label i is class_names[i]) or unlabelled
    (class_names is None, every item's label is NO_LABEL, `labels()` refuses): the source's own
    layout says which (mpp.data.sources), and nothing downstream guesses. The labels were checked against
    the classes when the split was built (mpp.data.labels), and counted unless it is a stream. Whoever
    needs labels calls `require_labels` once, where the data set is built, before anything is written."""

    spec: str  # the spec string as given
    class_names: list[str] | None  # label i is class_names[i]; None: unlabelled
    layout: str = ""  # how the source was read, said in the log and in refusals, e.g. "a folder without train/"
    split: str = "train"  # the source's split this is ("train", "test", "validation", ...), named in refusals
    # Images per class (label i: class_counts[i]) and images labelled NO_LABEL in a labelled split
    # (Hugging Face's -1, "no label"), counted when it was built; None and 0 when not counted (a
    # stream, whose labels are checked as they are read, or an unlabelled split).
    class_counts: tuple[int, ...] | None = None
    unlabelled_items: int = 0

    @property
    def labelled(self) -> bool:
        return self.class_names is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names is not None else 0

    def require_labels(self, fix: str, train: DatasetInfo | None = None) -> DatasetInfo:
        """This info when a classifier can learn from (or, given the `train` split's info, be scored
        on) this split's labels; else a one-line UsageError ending with `fix`: unlabelled, images
        labelled -1 among labelled ones, fewer than 2 classes to learn, or test images of a class
        without a training image (which a classifier trained on `train` cannot predict)."""
        if not self.labelled:
            raise UsageError(f"dataset '{self.spec}' has no labels ({self.layout or 'unlabelled'}): {fix}")
        if self.unlabelled_items:
            total = self.unlabelled_items + sum(self.class_counts or ())
            raise UsageError(f"{self.unlabelled_items:,} of the {total:,} images in split '{self.split}' of dataset "
                             f"'{self.spec}' are labelled -1 (no label): keep only the labelled ones (datasets' "
                             f"Dataset.filter on the label >= 0, then save_to_disk), or pretrain by MPP, which ignores "
                             f"labels; {fix}")
        counted = self.class_counts is not None
        if train is None:  # the split learnt from: two classes at least, each with an image when counted
            held = sum(1 for n in self.class_counts if n) if counted else self.num_classes
            if held < 2:
                named = ", ".join(f"'{self.class_names[c]}'" for c, n in enumerate(self.class_counts or ()) if n)
                raise UsageError(f"split '{self.split}' of dataset '{self.spec}' has images of {held} class"
                                 f"{'' if held == 1 else 'es'}{f' ({named})' if named else ''}, and a classifier "
                                 f"needs 2 or more ({self.layout}): {fix}")
        elif counted and train.class_counts is not None:
            missing = [c for c, n in enumerate(self.class_counts) if n and not train.class_counts[c]]
            if missing:
                c = missing[0]
                raise UsageError(f"split '{self.split}' of dataset '{self.spec}' has {self.class_counts[c]:,} images "
                                 f"of class {c} ('{self.class_names[c]}'), which has no image in split "
                                 f"'{train.split}' ({len(missing):,} such classes), so a classifier trained there "
                                 f"cannot predict them: pass a dataset whose train split holds every class of its "
                                 f"test split; {fix}")
        return self

    def describe(self) -> str:
        """What the log says of the data: "10 classes" or "unlabelled (a folder without train/ ...)"."""
        return f"{self.num_classes} classes" if self.labelled else f"unlabelled ({self.layout})"


class ImageDataset(abc.ABC):
    """The interface of every data set: items (image, int label), the image the raw uint8 [3, H, W] RGB
    or what `transform` makes of it (mpp.data.sources's: float32 [3, S, S] in [0, 1]); the label is NO_LABEL
    in every item of an unlabelled set.

    Members, each fixed by the constructor (only the epoch moves, by `set_epoch`):
    - `info`: a DatasetInfo: the spec, and the classes' names or that there are none (unlabelled).
    - `transform`: the function applied to each raw image; None: the items are raw.
    - `streamed`: False for a map-style set (a torch Dataset with `len()`, `dataset[i]` and `labels()`,
      see MapImages); True for a stream (a torch IterableDataset without a length, read in its own
      order: a DataLoader must not shuffle or sample it).
    - `seed`: what each item's random transform draws from, so that no draw depends on which loader
      worker, process or resumed run reads the item (mpp.core.reproducible): item `index` of a map-style
      set from seed_of(seed, epoch, index); the k-th item a loader worker reads from a stream from
      seed_of(seed, epoch, worker, k), and a shuffled stream's order from seed + epoch. None: a
      map-style set's transforms draw from the torch generator as it stands (its caller seeds it); a
      stream's seed is never None (0 when none is given). Only torch's generator is seeded: a
      transform that draws from Python's or numpy's (timm's RandAugment) is its caller's to seed.
    - `set_epoch(epoch)`: the epoch of those draws (and of a stream's shuffle), seen by DataLoader
      workers already running (persistent ones too).
    - `strict`: an unreadable image file raises a one-line UsageError; else it is skipped with a
      warning and counted.
    - `skipped_images()`: how many distinct images were skipped as unreadable so far, over all loader
      worker processes; 0 for a set held in memory.
    - `require_labels(fix, train)`: called once by whoever needs labels, before its loaders start.
    """

    streamed: ClassVar[bool]

    def __init__(self, info: DatasetInfo, transform: TransformFn | None, seed: int | None, strict: bool):
        self._info, self._transform, self._seed, self._strict = info, transform, seed, strict
        self._labels_fix: str | None = None  # set by require_labels: the fix of a refusal met while reading

    def require_labels(self, fix: str, train: DatasetInfo | None = None) -> DatasetInfo:
        """`info.require_labels(fix, train)` (DatasetInfo); and from now on an image labelled NO_LABEL
        that only reading can find (a stream's, not counted when it was built) stops the run with one
        line ending in `fix`, here and in the loader workers started afterwards (they copy this set)."""
        info = self.info.require_labels(fix, train)
        self._labels_fix = fix
        return info

    @property
    def info(self) -> DatasetInfo:
        return self._info

    @property
    def transform(self) -> TransformFn | None:
        return self._transform

    @property
    def seed(self) -> int | None:
        return self._seed

    @property
    def strict(self) -> bool:
        return self._strict

    @abc.abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """The epoch every later item's random draws come from (see the class docstring)."""

    @abc.abstractmethod
    def skipped_images(self) -> int:
        """How many distinct images were skipped as unreadable so far, over all worker processes."""


class MapImages(ImageDataset, Dataset):
    """A map-style data set: `len(dataset)` items, `dataset[index]`, and `labels()`, every label read
    without decoding an image. Subclasses say how to try to read one raw item (`try_raw`) and what
    tells an item's image apart (`identity`); `raw` replaces an unreadable image by the next readable
    one of the same set (deterministically, wrapping around).

    The epoch lives in a shared-memory tensor, so persistent DataLoader workers (forked or spawned)
    see `set_epoch` without being restarted."""

    streamed = False

    def __init__(self, info: DatasetInfo, transform: TransformFn | None = None, seed: int | None = None,
                 strict: bool = False):
        super().__init__(info, transform, seed, strict)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # int64 []

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def labels(self) -> torch.Tensor:
        """int64 [N]: the label of every index, as listed (an unreadable image's stand-in may differ).
        An unlabelled set has none: a UsageError (DatasetInfo.require_labels)."""

    @abc.abstractmethod
    def try_raw(self, index: int) -> tuple[torch.Tensor, int] | None:
        """Item `index` untransformed, (uint8 [3, H, W] RGB, int label), or None when its image cannot be
        read (then skipped: warned and counted once, or with `strict` a one-line UsageError)."""

    @abc.abstractmethod
    def identity(self, index: int) -> str:
        """What tells item `index`'s image apart from every other, read without decoding it."""

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` untransformed; an unreadable image's stand-in is the next readable one of this set."""
        return first_readable(self.try_raw, range(len(self)), index)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):  # as a sequence: so iterating the set ends (HubImages.raw wraps around)
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        if self.seed is None:
            return self._transformed(index)
        with torch.random.fork_rng(devices=[]):  # CPU only: transforms run on CPU; the caller's stream is untouched
            torch.manual_seed(seed_of(self.seed, int(self._epoch), int(index)))
            return self._transformed(index)

    def _transformed(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.raw(index)  # uint8 [3, H, W], int
        return (self.transform(image) if self.transform else image), label


def first_readable(try_raw: Callable[[int], Any], indices: Any, position: int) -> Any:
    """try_raw(indices[position]), or when that image is unreadable, of the next position that is
    readable (wrapping around): a set's stand-ins come from the set itself, never from beyond it."""
    for offset in range(len(indices)):
        item = try_raw(int(indices[(int(position) + offset) % len(indices)]))
        if item is not None:
            return item
    raise UsageError("no image of the dataset can be read: check the files (see the warnings above)")
