"""The image-folder convention: which files of a dataset folder are images of which class.

An image folder, loaded and streamed alike (one listing serves both modes, see mpp.data):
- splits: `train/`, and for the test split the first of `test/`, `val/`, `validation/` present;
- an image's class is the FIRST folder under its split, whatever lies between: `train/cat/2019/a.png`
  is a cat. Images are files with a suffix in IMAGE_SUFFIXES (any case) at any depth; other files
  (a metadata.csv, notes) are ignored;
- the classes are train's class folders, sorted, and label i is the i-th. Each must hold an image;
  a class folder of the test split must be one of them (it may be empty or missing: no test images);
- an image directly in a split folder (`train/a.png`) has no class: an error, not a guess;
- never read: hidden entries (names starting with '.') at any depth, and run directories (a folder
  holding one of RUN_MARKERS, what training writes), which are skipped with a warning.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mpp.errors import UsageError
from mpp.rundir import RUN_MARKERS  # even when --output-dir points into a dataset

TEST_FOLDERS = ("test", "val", "validation")  # an image folder's test split: the first of these it has
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def folder_listing(
    root: Path, spec: str, split: str, test_folder: str | None
) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of `split` of the folder `root`, by the convention of the
    module docstring. Labels index the class names, in class order, then sorted relative path.

    Train's classes are checked whichever split is asked for (the test split only needs to know that
    each holds an image), and the test folder's class folder names are checked against them: a train
    run fails at once, not at its first evaluation."""
    skipped: list[str] = []  # run directories passed over, reported once at the end
    try:
        classes = _class_folders(root, "train", skipped)
        first_only = split != "train"
        train_images = {c: _images_below(root, f"train/{c}", skipped, first_only) for c in classes}
        _check_train_classes(spec, train_images)
        test_classes = _class_folders(root, test_folder, skipped) if test_folder else []
        _check_test_classes(test_folder, classes, test_classes)
        if split == "train":
            images = train_images
        else:  # a class without a folder in the test split has no test images
            images = {c: _images_below(root, f"{test_folder}/{c}", skipped) if c in test_classes else []
                      for c in classes}
    finally:
        _warn_skipped(spec, skipped)
    prefix = os.path.join(str(root), "")  # joined as strings: a Path per image costs 5x the listing itself
    paths = [prefix + rel for c in classes for rel in images[c]]
    labels = [label for label, c in enumerate(classes) for _ in images[c]]
    return classes, paths, labels


_SUFFIX_TUPLE = tuple(IMAGE_SUFFIXES)  # str.endswith takes a tuple: one C call per name


def _is_image(name: str) -> bool:
    return name.lower().endswith(_SUFFIX_TUPLE)  # as splitext's suffix for every name not hidden


def _is_run_dir(path: str) -> bool:
    """Whether a folder is a run directory of this repo: its outputs (checkpoints, metrics) are not data."""
    return any(os.path.isfile(os.path.join(path, marker)) for marker in RUN_MARKERS)


def _folder_id(folder: Path | os.DirEntry) -> tuple[int, int]:
    info = folder.stat()  # follows links; a DirEntry caches it
    return info.st_dev, info.st_ino


def _class_folders(root: Path, folder: str, skipped: list[str]) -> list[str]:
    """The sorted class folder names of the split folder root/`folder`: its subfolders, less hidden ones
    and run directories (added to `skipped`). An image lying in it directly has no class: an error."""
    names, loose = [], []
    with os.scandir(root / folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):  # .ipynb_checkpoints, .DS_Store, ._name (macOS resource forks)
                continue
            if entry.is_dir() and _is_run_dir(entry.path):
                skipped.append(f"{folder}/{entry.name}")
            elif entry.is_dir():
                names.append(entry.name)
            elif _is_image(entry.name):
                loose.append(entry.name)
    if loose:
        raise UsageError(f"{len(loose)} image(s) lie directly in '{folder}/', outside any class folder "
                         f"(e.g. '{folder}/{min(loose)}'): move each into {folder}/<class>/ "
                         f"(an image's class is the first folder under {folder}/)")
    return sorted(names)


def _images_below(root: Path, folder: str, skipped: list[str], first_only: bool = False) -> list[str]:
    """The images at any depth below root/`folder`, as sorted paths relative to root; hidden entries
    and run directories (added to `skipped`) are passed over. `first_only` stops at the first image found.

    os.scandir tells folders from files without a stat per name. Links to folders are followed, but a
    folder is walked once: a link back to the class folder or above it would list images again, as
    this class, until the path grew too long."""
    found, pending = [], [folder]
    seen = {_folder_id(root), _folder_id(root / folder.split("/")[0]), _folder_id(root / folder)}
    while pending:
        current = pending.pop()
        with os.scandir(root / current) as entries:
            for entry in entries:  # the loop runs once per file: kept to a few C calls each
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir() and _is_run_dir(entry.path):
                    skipped.append(f"{current}/{name}")
                elif entry.is_dir() and _folder_id(entry) not in seen:  # one stat per folder, not per image
                    seen.add(_folder_id(entry))
                    pending.append(f"{current}/{name}")
                elif name.lower().endswith(_SUFFIX_TUPLE):  # _is_image, inlined
                    found.append(f"{current}/{name}")
                    if first_only:
                        return found
    return sorted(found)


def _check_train_classes(spec: str, images: dict[str, list[str]]) -> None:
    """Every class folder of train/ must hold an image: an empty one would be a class never seen."""
    if not any(images.values()):
        raise UsageError(f"no images found in '{spec}/train/<class>/': put each class's images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}) in its own subfolder of train/")
    empty = [c for c, found in images.items() if not found]
    if len(empty) == 1:
        raise UsageError(f"class folder 'train/{empty[0]}' of '{spec}' holds no images at any depth: "
                         f"add its images or remove train/{empty[0]}/")
    if empty:
        raise UsageError(f"class folders {_some(f'train/{c}' for c in empty)} of '{spec}' hold no images at "
                         "any depth: add images to each or remove it")


def _check_test_classes(test_folder: str | None, classes: list[str], test_classes: list[str]) -> None:
    """A class folder of the test split must be one of train's: else its images' labels would be guesses."""
    extra = sorted(set(test_classes) - set(classes))
    if not extra:
        return
    known = f"train classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}"
    if len(extra) == 1:
        raise UsageError(f"class folder '{test_folder}/{extra[0]}' has no counterpart in train/ ({known}): "
                         f"add train/{extra[0]}/ with images or remove {test_folder}/{extra[0]}/")
    raise UsageError(f"class folders {_some(f'{test_folder}/{c}' for c in extra)} have no counterpart in "
                     f"train/ ({known}): add each to train/ with images or remove it from {test_folder}/")


def _some(names: Any, shown: int = 5) -> str:
    """'a', 'b', 'c' and 4 more: a list that keeps an error message to one readable line."""
    names = list(names)
    quoted = ", ".join(f"'{n}'" for n in names[:shown])
    return quoted + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _warn_skipped(spec: str, skipped: list[str]) -> None:
    """One line for a whole listing, however many run directories it passed over (or met twice)."""
    if skipped:
        names = sorted(set(skipped))
        what = "a run directory" if len(names) == 1 else "run directories"
        print(f"warning: not reading {_some(names)} in dataset folder '{spec}' as data: {what} (holds "
              f"{' or '.join(RUN_MARKERS)}); keep run outputs out of the dataset folder", file=sys.stderr, flush=True)
