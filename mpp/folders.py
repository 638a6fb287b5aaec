"""The image-folder convention: which files of a dataset folder are images, and of which class.

A folder is read by its layout, never by guessing (one listing serves loaded and streamed modes, see
mpp.data). Three layouts, told apart by the folder itself:
- **classes**: `train/<class>/...`, and for the test split the first of `test/`, `val/`,
  `validation/` present, laid out the same. An image's class is the FIRST folder under its split,
  whatever lies between: `train/cat/2019/a.png` is a cat. The classes are train's class folders,
  sorted, and label i is the i-th. Each must hold an image; a class folder of the test split must be
  one of them (it may be empty or missing: no test images).
- **unlabelled splits**: `train/` holding its images directly and no subfolder (and the test split,
  if there is one, the same): images without labels.
- **unlabelled**: a folder with no `train/` (nor `test/`, `val/`, `validation/`): every image at any
  depth below it is a training image, without a label; there is no test split. A folder name is
  never a label here: classes need the `train/<class>/` layout.
A split folder holding both images and subfolders says neither, and is refused; so is a test split
laid out unlike train/. Images are files with a suffix in IMAGE_SUFFIXES (any case); other files
(a metadata.csv, notes) are ignored. Never read: hidden entries (names starting with '.') at any
depth, and run directories (a folder holding one of RUN_MARKERS, what training writes), which are
skipped with a warning.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpp.errors import MissingSplit, UsageError
from mpp.rundir import RUN_MARKERS  # even when --output-dir points into a dataset

TEST_FOLDERS = ("test", "val", "validation")  # an image folder's test split: the first of these it has
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
# Folder names that mean a split without being one of ours (Train/, training/, val2017/, test_set/): refused
# in a folder without train/, which would otherwise be read whole, test images and all.
SPLIT_LIKE = re.compile(r"(?i)(train|training|test|testing|val|valid|validation)[\W_]*(set|data|images)?[\W_]*\d*")
LAYOUTS = {  # what the log and the refusals say of each layout
    "classes": "train/<class>/<image>",
    "unlabelled splits": "a train/ folder holding its images without class folders",
    "unlabelled": "a folder without train/: every image at any depth, no class folders",
}


@dataclass(frozen=True)
class Listing:
    """One split of an image folder, listed whole: its images in order and, for the classes layout, their labels."""
    layout: str  # a key of LAYOUTS
    class_names: list[str] | None  # label i is class_names[i]; None: unlabelled
    paths: list[str]  # absolute image paths: class order then sorted relative path (classes), else sorted
    labels: list[int] | None  # one per path; None: unlabelled


def folder_layout(root: Path, spec: str) -> tuple[str | None, str | None]:
    """(train folder or None, test folder or None) of the folder `root`, checked to hold its splits by
    one of the layouts (the module docstring)."""
    found = {p.name for p in root.iterdir() if p.is_dir()}
    test_folder = next((f for f in TEST_FOLDERS if f in found), None)
    if "train" not in found and test_folder:
        raise UsageError(f"dataset folder '{spec}' has {test_folder}/ but no train/: add train/ beside it "
                         f"(train/<class>/<image> for classes), or pass a folder of images without split folders")
    splitlike = sorted(name for name in found if SPLIT_LIKE.fullmatch(name))
    if "train" not in found and splitlike:  # read whole, their test images would be trained on
        raise UsageError(f"dataset folder '{spec}' holds {_some(f'{n}/' for n in splitlike)}, named like split folders "
                         "but not train/, test/ or val/ exactly: rename them so (train/<class>/<image> for classes), "
                         "or pass one split's folder to read its images unlabelled")
    return ("train" if "train" in found else None), test_folder


def folder_listing(root: Path, spec: str, split: str) -> Listing:
    """The `split` ("train" or "test") of the folder `root`, by the convention of the module docstring.

    Train's layout and classes are checked whichever split is asked for (the test split only needs
    to know that each class holds an image), and the test folder is checked against them: a train
    run fails at once, not at its first evaluation. A folder without a test split raises MissingSplit
    for "test"."""
    train_folder, test_folder = folder_layout(root, spec)
    skipped: list[str] = []  # run directories passed over, reported once at the end
    try:
        if train_folder is None:
            return _unlabelled(root, spec, split, skipped)
        if split == "train":
            _warn_beside_splits(root, spec, {"train", test_folder})
        classes, loose = _split_entries(root, "train", skipped)
        if loose and not classes:
            return _unlabelled_splits(root, spec, split, test_folder, skipped)
        if loose:
            raise UsageError(f"{len(loose)} image(s) lie directly in 'train/' of '{spec}' beside its subfolders "
                             f"(e.g. 'train/{loose[0]}'), so its layout says neither classes nor unlabelled: for "
                             "classes move each into train/<class>/ (an image's class is the first folder under "
                             "train/); for unlabelled images keep them all directly in train/ without subfolders, "
                             "or pass a folder without train/ (every image at any depth)")
        return _classes(root, spec, split, test_folder, classes, skipped)
    finally:
        _warn_skipped(spec, skipped)


def _classes(root: Path, spec: str, split: str, test_folder: str | None, classes: list[str],
             skipped: list[str]) -> Listing:
    train_images = {c: _images_below(root, f"train/{c}", skipped, first_only=split != "train") for c in classes}
    _check_train_classes(spec, train_images)
    test_classes = _test_class_folders(root, test_folder, skipped) if test_folder else []
    _check_test_classes(test_folder, classes, test_classes)
    if split == "train":
        images = train_images
    elif test_folder is None:
        raise _no_test(root, spec, "add test/<class>/<image> or val/<class>/<image>")
    else:  # a class without a folder in the test split has no test images
        images = {c: _images_below(root, f"{test_folder}/{c}", skipped) if c in test_classes else []
                  for c in classes}
        if not any(images.values()):
            raise _empty_test(spec, test_folder)
    prefix = os.path.join(str(root), "")  # joined as strings: a Path per image costs 5x the listing itself
    paths = [prefix + rel for c in classes for rel in images[c]]
    labels = [label for label, c in enumerate(classes) for _ in images[c]]
    return Listing("classes", classes, paths, labels)


def _unlabelled_splits(root: Path, spec: str, split: str, test_folder: str | None, skipped: list[str]) -> Listing:
    folder = "train" if split == "train" else test_folder
    if folder is None:
        raise _no_test(root, spec, "add test/ (or val/) holding its images like train/")
    subfolders, loose = _split_entries(root, folder, skipped)
    if subfolders:
        raise UsageError(f"'{spec}/{folder}/' holds subfolders ({_some(f'{folder}/{n}' for n in subfolders)}) while "
                         "train/ holds its images directly: lay every split out the same, images directly in it "
                         "(unlabelled) or in <split>/<class>/ folders (classes)")
    if not loose and split != "train":
        raise _empty_test(spec, folder)
    prefix = os.path.join(str(root), folder, "")
    return Listing("unlabelled splits", None, [prefix + name for name in sorted(loose)], None)


def _unlabelled(root: Path, spec: str, split: str, skipped: list[str]) -> Listing:
    if split != "train":
        raise _no_test(root, spec, "lay it out as train/ and test/ folders to give it one")
    found = _images_below(root, "", skipped)
    if not found:
        raise UsageError(f"no images found in '{spec}' at any depth: put its images in it "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    prefix = os.path.join(str(root), "")
    return Listing("unlabelled", None, [prefix + rel for rel in found], None)


def _warn_beside_splits(root: Path, spec: str, splits: set[str | None]) -> None:
    """One line naming the folders and images beside the split folders, which are never read (an
    `unlabeled/` folder, loose images): nothing a layout leaves out goes unsaid."""
    beside = sorted(f"{e.name}/" if e.is_dir() else e.name for e in os.scandir(root)
                    if not e.name.startswith(".") and e.name not in splits
                    and (_is_image(e.name) or (e.is_dir() and not _is_run_dir(e.path))))
    if beside:
        print(f"warning: not reading {_some(beside)} in dataset folder '{spec}': only its split folders "
              f"({', '.join(f'{s}/' for s in sorted(filter(None, splits)))}) are read", file=sys.stderr, flush=True)


def _empty_test(spec: str, folder: str) -> UsageError:
    return UsageError(f"the test split '{folder}/' of dataset folder '{spec}' holds no images: put its images in "
                      f"it, or remove {folder}/ (pretraining then holds out training images instead)")


def _no_test(root: Path, spec: str, fix: str) -> MissingSplit:
    found = ", ".join(sorted(f"{p.name}/" for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    return MissingSplit(f"dataset folder '{spec}' has no test split (no {', '.join(f'{t}/' for t in TEST_FOLDERS)}; "
                        f"found {found or 'no subfolders'})", fix)


_SUFFIX_TUPLE = tuple(IMAGE_SUFFIXES)  # str.endswith takes a tuple: one C call per name


def _is_image(name: str) -> bool:
    return name.lower().endswith(_SUFFIX_TUPLE)  # as splitext's suffix for every name not hidden


def _is_run_dir(path: str) -> bool:
    """Whether a folder is a run directory of this repo: its outputs (checkpoints, metrics) are not data."""
    return any(os.path.isfile(os.path.join(path, marker)) for marker in RUN_MARKERS)


def _folder_id(folder: Path | os.DirEntry) -> tuple[int, int]:
    info = folder.stat()  # follows links; a DirEntry caches it
    return info.st_dev, info.st_ino


def _split_entries(root: Path, folder: str, skipped: list[str]) -> tuple[list[str], list[str]]:
    """(sorted subfolder names, sorted image names lying directly in it) of root/`folder`, less
    hidden entries and run directories (added to `skipped`)."""
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
    return sorted(names), sorted(loose)


def _test_class_folders(root: Path, folder: str, skipped: list[str]) -> list[str]:
    """The class folders of the test split of a classes layout: an image lying in it directly has no class."""
    names, loose = _split_entries(root, folder, skipped)
    if loose:
        raise UsageError(f"{len(loose)} image(s) lie directly in '{folder}/', outside any class folder "
                         f"(e.g. '{folder}/{loose[0]}'): move each into {folder}/<class>/ "
                         f"(an image's class is the first folder under {folder}/)")
    return names


def _images_below(root: Path, folder: str, skipped: list[str], first_only: bool = False) -> list[str]:
    """The images at any depth below root/`folder` ("": root itself), as sorted paths relative to root;
    hidden entries and run directories (added to `skipped`) are passed over. `first_only` stops at the
    first image found.

    os.scandir tells folders from files without a stat per name. Links to folders are followed, but a
    folder is walked once: a link back to the class folder or above it would list images again, as
    this class, until the path grew too long."""
    found, pending = [], [folder]
    seen = {_folder_id(root), _folder_id(root / folder.split("/")[0]), _folder_id(root / folder)}
    while pending:
        current = pending.pop()
        head = f"{current}/" if current else ""
        with os.scandir(root / current) as entries:
            for entry in entries:  # the loop runs once per file: kept to a few C calls each
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_dir() and _is_run_dir(entry.path):
                    skipped.append(head + name)
                elif entry.is_dir() and _folder_id(entry) not in seen:  # one stat per folder, not per image
                    seen.add(_folder_id(entry))
                    pending.append(head + name)
                elif name.lower().endswith(_SUFFIX_TUPLE):  # _is_image, inlined
                    found.append(head + name)
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
