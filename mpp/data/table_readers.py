"""The data sets over a Hugging Face `datasets` table or stream (`HubImages`, `HubImageStream`), which
keep mpp.data.datasets' contract and decode each image themselves (mpp.data.decode), so that an
unreadable file is skipped or fatal, not a crash; and what tells a table's images apart without
decoding them (`image_identity`). Every source is read through them (folders, shards, the hub:
mpp.data.sources, mpp.data.shards, mpp.data.hub) but the digits held in memory (TensorImages).
(`import datasets` in this module is Hugging Face's library: imports are absolute.)
"""
from __future__ import annotations

import abc
import functools
import hashlib
import multiprocessing
import multiprocessing.context
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mpp.core.errors import LocalError, UsageError, first_line
from mpp.core.reproducible import seed_of
from mpp.data.datasets import DatasetInfo, ImageDataset, MapImages, TransformFn
from mpp.data.decode import UNREADABLE, open_image, rgb_tensor
from mpp.data.labels import NO_LABEL
from mpp.data.readlimit import read_limit


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
        except UsageError:  # a StuckRead is no unreadable image (and a ValueError, should UsageError become one)
            raise
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
