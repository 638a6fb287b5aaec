"""What a data set is: the contract every data set mpp.data.sources builds keeps (`ImageDataset`), its map-style
kind with per-item seeding (`MapImages`), and the data sets over a Hugging Face `datasets` table or
stream, which decode each image themselves so that an unreadable file is skipped or fatal, not a crash.

A data set is built whole by its constructor (mpp.data.sources.load_split / build_dataset choose the
arguments) and not changed afterwards; consumers ask it through the members below, never by
looking for attributes. (`import datasets` in this module is Hugging Face's library: imports are absolute.)
"""
from __future__ import annotations

import abc
import functools
import hashlib
import io
import multiprocessing
import multiprocessing.context
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset

from mpp.core.errors import LocalError, UsageError, first_line
from mpp.core.reproducible import seed_of
from mpp.data.labels import NO_LABEL
from mpp.data.readlimit import read_limit

TransformFn = Callable[[torch.Tensor], torch.Tensor]
# What PIL raises for a file that is not a readable image: unknown format, truncated data, bad headers.
UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


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


def new_skip_lock() -> Any:
    """A lock that loader workers started any way share: a spawn-context lock is inherited by forked
    workers too, where a fork-context one cannot be sent to spawned workers."""
    return multiprocessing.get_context("spawn").Lock()


class TableReader(ImageDataset):
    """A data set over a `datasets` table or stream (`table`): the image column is read undecoded and
    decoded here, so an unreadable file is caught with its path: skipped with a warning and counted
    (`record_skip`), or, when `strict`, a one-line error."""

    def _use_table(self, table: Any, image_column: str, label_column: str | None) -> None:
        """`label_column` None: the table has no labels (info.class_names is None), items carry NO_LABEL."""
        import datasets

        if (label_column is None) == self.info.labelled:
            raise ValueError(f"label column {label_column!r} for a data set whose info says {self.info.describe()}")
        # Guards the skip marks in shared memory: two loader workers can meet the same unreadable file
        # at once (one reads it, another falls back on it), and only the first may count and warn.
        self._skip_lock = new_skip_lock()

        table = table.select_columns([c for c in (image_column, label_column) if c])  # don't decode columns we drop
        if isinstance((table.features or {}).get(image_column), datasets.Image):  # cells become {"path", "bytes"}
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table = table
        self.image_column, self.label_column = image_column, label_column

    def read(self, row: dict) -> torch.Tensor | None:
        """uint8 [3, H, W] RGB of the row's image; None (after a warning) when it is unreadable."""
        cell = row[self.image_column]
        name = (cell.get("path") if isinstance(cell, dict) else None) or f"a row of split '{self.info.split}'"
        try:
            with read_limit(f"image '{name}'"):  # a file that never answers (a FIFO, a stalled mount) is named
                return rgb_tensor(open_image(cell))
        except UNREADABLE as e:
            reason = first_line(e)
            if self.strict:
                raise LocalError(f"image '{name}' cannot be read ({reason}): remove or replace it, "
                                 "or drop --strict-images to skip unreadable images") from e
            if not self.record_skip(name):
                return None  # another worker has already counted and reported it
            # One write of the whole line: loader workers warn at once, and print() writes the text and
            # its newline separately, so their lines could interleave.
            sys.stderr.write(f"warning: skipping unreadable image '{name}' ({reason}); {self.skipped_images()} "
                             "skipped so far: pass --strict-images to stop instead\n")
            sys.stderr.flush()
            return None

    def label_of(self, row: dict) -> int:
        """The row's label, checked (a stream's rows are checked only here): a class number, or
        NO_LABEL while no one has required labels (`require_labels`)."""
        if not self.label_column:
            return NO_LABEL
        label = row[self.label_column]
        if label is None or not NO_LABEL <= label < self.info.num_classes or (label == NO_LABEL and self._labels_fix):
            raise UsageError(self._refused_label(row, label))
        return int(label)

    def _refused_label(self, row: dict, label: Any) -> str:
        cell = row[self.image_column]
        if "__key__" in row:  # a shard's sample (mpp.data.shards)
            where = f"sample '{row['__key__']}' of shard '{row['__url__']}'"
        else:
            path = cell.get("path") if isinstance(cell, dict) else None
            where = f"image '{path}'" if path else f"an image of split '{self.info.split}'"
            where += f" of dataset '{self.info.spec}'"
        if label is None:
            return f"{where} has no label: give every image its label, or drop the label column to read it unlabelled"
        if label == NO_LABEL:
            return (f"{where} is labelled -1 (no label): keep only the labelled images (datasets' Dataset.filter), "
                    f"or pretrain by MPP, which ignores labels; {self._labels_fix}")
        return (f"{where} has label {label}, outside the {self.info.num_classes} classes of the dataset "
                f"(0..{self.info.num_classes - 1}): fix the label, or list every class (a ClassLabel feature)")

    @abc.abstractmethod
    def record_skip(self, name: str) -> bool:
        """Remember that the image being read, `name`, is unreadable (under `_skip_lock`); True if
        this is the first time it is met, so the caller reports it."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_skip_lock"] = None  # a copy (not a spawned worker) cannot share the lock: it gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._skip_lock is None:
            self._skip_lock = new_skip_lock()


class HubImages(TableReader, MapImages):
    """A map-style `datasets.Dataset` (hub or image folder) whose images decode to uint8 RGB tensors.

    An unreadable image is marked, so it is reported and decoded once, not each time a neighbour
    falls back on it (MapImages.raw). The marks live in shared memory, so DataLoader worker processes
    add to them."""

    def __init__(self, table: Any, image_column: str, label_column: str | None, *, info: DatasetInfo,
                 transform: TransformFn | None = None, seed: int | None = None, strict: bool = False):
        super().__init__(info, transform, seed, strict)
        self._use_table(table, image_column, label_column)
        self.unreadable = torch.zeros(len(self.table), dtype=torch.bool).share_memory_()  # bool [N]: 1 MB per million
        self._current = -1  # the index being read, for record_skip

    def __len__(self) -> int:
        return len(self.table)

    def labels(self) -> torch.Tensor:
        self.info.require_labels("a probe or a supervised run needs a labelled dataset")
        # One column, read as an Arrow batch: no image decoded, and not a Python object per row (which
        # `table[column]` builds: minutes for ImageNet).
        column = self.table.select_columns([self.label_column]).with_format("numpy")[:][self.label_column]
        return torch.from_numpy(np.asarray(column).astype(np.int64).reshape(-1))  # int64 [N]

    def skipped_images(self) -> int:
        return int(self.unreadable.sum())

    def record_skip(self, name: str) -> bool:
        with self._skip_lock:
            first = not bool(self.unreadable[self._current])
            self.unreadable[self._current] = True
        return first

    def try_raw(self, index: int) -> tuple[torch.Tensor, int] | None:
        if self.unreadable[index]:
            return None
        self._current = index
        row = self.table[index]
        image = self.read(row)  # uint8 [3, H, W] | None
        return None if image is None else (image, self.label_of(row))

    def identity(self, index: int) -> str:
        return image_identity(self.table[int(index)][self.image_column])  # the cell undecoded: path or bytes


class HubImageStream(TableReader, IterableDataset):
    """A streamed `datasets.IterableDataset` (`table`), shuffled through a buffer of `shuffle_buffer`
    items when that is not 0. It has no length.

    DataLoader workers each read their own shards (the wrapped stream checks the worker info itself).
    An unreadable image is dropped from the stream, and counted once however many epochs meet it (the
    count lives in shared memory, so worker processes add to it)."""

    streamed = True

    def __init__(self, stream: Any, image_column: str, label_column: str | None, *, info: DatasetInfo,
                 transform: TransformFn | None = None, seed: int | None = None, strict: bool = False,
                 shuffle_buffer: int = 0, read_error: Callable[[BaseException], str] | None = None,
                 exclude: frozenset[str] = frozenset()):
        # read_error: the one line for a failure inside the stream's own reading (a bad file it met);
        # None: a line naming the dataset and the error
        self.read_error = read_error
        seed = 0 if seed is None else seed  # a stream's order and crops always repeat
        super().__init__(info, transform, seed, strict)
        self._use_table(stream, image_column, label_column)
        if exclude:  # images held out (mpp.data.holdout), known by image_identity: skipped wherever they come
            self.table = self.table.filter(functools.partial(_kept, image_column, exclude))
        if shuffle_buffer:  # reshuffled each epoch, with seed + epoch (`set_epoch`)
            self.table = self.table.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()  # int64 []: distinct images skipped
        self._seen: set[str] = set()  # this process's skipped names (each worker reads its own shards)

    def skipped_images(self) -> int:
        return int(self.skipped)

    def record_skip(self, name: str) -> bool:
        if name in self._seen:  # met again in a later epoch (each worker reads its own shards)
            return False
        self._seen.add(name)
        with self._skip_lock:  # add_ on shared memory is a read and a write: workers must take turns
            self.skipped.add_(1)
        return True

    def set_epoch(self, epoch: int) -> None:
        self.table.set_epoch(epoch)  # the stream keeps its epoch in shared memory itself

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        # The k-th item of a worker's share draws its augmentation from (seed, epoch, worker, k): a
        # resumed run, which reads its way back to the same position, repeats the same crops.
        info = torch.utils.data.get_worker_info()
        worker, epoch = (info.id if info else 0), self.table.epoch
        for k, row in enumerate(self.undecoded_rows()):
            image = self.read(row)  # uint8 [3, H, W] | None
            if image is None:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of(self.seed, epoch, worker, k))
                image = self.transform(image) if self.transform else image
            yield image, self.label_of(row)

    def undecoded_rows(self) -> Iterator[dict]:
        """The stream's rows in its order, undecoded ({image column: {"path", "bytes"}, ...}); an error
        of its own reading (not of ours, such as a row check's UsageError) becomes one line."""
        rows = iter(self.table)
        while True:
            try:
                with read_limit(f"the stream of dataset '{self.info.spec}'"):  # a stalled remote or mount
                    row = next(rows)
            except StopIteration:
                return
            except UsageError:  # already its one line (mpp.data.shards.check_row)
                raise
            except (ValueError, OSError, OverflowError) as e:  # a label not a number or over 64 bits, a torn file
                raise UsageError(self.read_error(e) if self.read_error else
                                 f"the stream of dataset '{self.info.spec}' could not be read ({first_line(e)}): "
                                 "fix or remove the file it met") from e
            yield row


def image_identity(cell: Any) -> str:
    """What tells two images of a table apart, without decoding: the file's bytes (their SHA-1), or
    its path when a cell holds only that (an image folder's rows)."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return hashlib.sha1(cell["bytes"]).hexdigest()
    if isinstance(cell, dict) and cell.get("path"):
        return f"path:{cell['path']}"
    return hashlib.sha1(np.ascontiguousarray(np.asarray(cell)).tobytes()).hexdigest()  # a decoded image


def _kept(image_column: str, exclude: frozenset[str], row: dict) -> bool:
    return image_identity(row[image_column]) not in exclude


def open_image(cell: Any) -> Any:
    """A `datasets` image cell stored undecoded ({"path", "bytes"}) → a PIL image decoded now, so a
    truncated file fails here and not in a transform; anything else (PIL image, array) as it is."""
    if not isinstance(cell, dict):
        return cell
    image = PIL.Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
    image.load()
    return image


def rgb_tensor(image: Any) -> torch.Tensor:
    """A decoded image of any PIL mode (L, P, RGBA, CMYK, 16-bit, 32-bit int or float ...) or an array ->
    uint8 [3, H, W] RGB. Pixels wider than a byte are scaled by their range (`byte_values`): PIL's
    own convert would clip them, so a float image in [0, 1] or 8-bit values stored in 16 bits came out black."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    if not isinstance(image, PIL.Image.Image):
        values = np.asarray(image)
        image = PIL.Image.fromarray(values if values.dtype in (np.uint8, np.bool_) else byte_values(values))
    elif image.mode == "F" or image.mode.startswith("I"):  # one channel of float32, int32 or uint16 values
        image = PIL.Image.fromarray(byte_values(np.asarray(image)))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
    return pil_to_tensor(image.convert("RGB"))  # uint8 [3, H, W]


def byte_values(values: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> uint8, by the range the values lie in, the conventions of the files
    that hold them: 0..255 as they are (8-bit data saved wider, e.g. by astype(np.uint16)); integers up
    to 65535 as 16-bit (the top byte: 16-bit PNG and TIFF); floats in [0, 1] times 255 (the float-image
    convention); anything else (negative values, 32-bit counts, floats beyond 255) stretched from the
    image's own minimum to its maximum. NaN or infinite pixels: unreadable (ValueError), not guessed."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"pixels of type {values.dtype} are not numbers")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("the image holds NaN or infinite pixel values")
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if values.dtype.kind == "f" and 0 <= low and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if 0 <= low and high <= 255:
        return np.rint(values).astype(np.uint8)  # rint: a no-op on integers, the nearest byte for floats
    if values.dtype.kind in "iu" and 0 <= low and high <= 65535:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    span = float(high) - float(low) or 1.0  # a constant image outside 0..255 becomes black: no range to show
    return np.rint((values.astype(np.float64) - low) * (255 / span)).astype(np.uint8)
