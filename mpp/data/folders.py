"""The image-folder convention: which files of a dataset folder are images, and of which class.

A folder is read by its layout, never by guessing (one listing serves loaded and streamed modes, see
mpp.data.sources). Three layouts, told apart by the folder itself:
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
depth; skipped with a warning: run directories (a folder holding one of RUN_MARKERS, what training
writes), links that loop and names that are not UTF-8. Links elsewhere are followed; a class folder
holding another class's images through a link is refused (mpp.data.folder_walk).
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mpp.core.errors import MissingSplit, UsageError
from mpp.data.folder_walk import IMAGE_SUFFIXES, Passed, Walker, is_image, is_run_dir, some, split_entries

TEST_FOLDERS = ("test", "val", "validation")  # an image folder's test split: the first of these it has
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
        raise UsageError(f"dataset folder '{spec}' holds {some(f'{n}/' for n in splitlike)}, named like split folders "
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
    passed = Passed()  # what the listing passes over, reported once at the end
    try:
        if train_folder is None:
            return _unlabelled(root, spec, split, passed)
        if split == "train":
            _warn_beside_splits(root, spec, {"train", test_folder})
        classes, loose = split_entries(root, "train", passed)
        if loose and not classes:
            return _unlabelled_splits(root, spec, split, test_folder, passed)
        if loose:
            raise UsageError(f"{len(loose)} image(s) lie directly in 'train/' of '{spec}' beside its subfolders "
                             f"(e.g. 'train/{loose[0]}'), so its layout says neither classes nor unlabelled: for "
                             "classes move each into train/<class>/ (an image's class is the first folder under "
                             "train/); for unlabelled images keep them all directly in train/ without subfolders, "
                             "or pass a folder without train/ (every image at any depth)")
        return _classes(root, spec, split, test_folder, classes, passed)
    finally:
        passed.warn(spec)


def _classes(root: Path, spec: str, split: str, test_folder: str | None, classes: list[str],
             passed: Passed) -> Listing:
    train = Walker(root, spec, "train", passed, classes)
    train_images = {c: train.images(f"train/{c}", first_only=split != "train") for c in classes}
    _check_train_classes(spec, train_images)
    test_classes = _test_class_folders(root, test_folder, passed) if test_folder else []
    _check_test_classes(test_folder, classes, test_classes)
    if split == "train":
        images = train_images
    elif test_folder is None:
        raise _no_test(root, spec, "add test/<class>/<image> or val/<class>/<image>")
    else:  # a class without a folder in the test split has no test images
        test = Walker(root, spec, test_folder, passed, classes)
        images = {c: test.images(f"{test_folder}/{c}") if c in test_classes else [] for c in classes}
        if not any(images.values()):
            raise _empty_test(spec, test_folder)
    prefix = os.path.join(str(root), "")  # joined as strings: a Path per image costs 5x the listing itself
    paths = [prefix + rel for c in classes for rel in images[c]]
    labels = [label for label, c in enumerate(classes) for _ in images[c]]
    return Listing("classes", classes, paths, labels)


def _unlabelled_splits(root: Path, spec: str, split: str, test_folder: str | None, passed: Passed) -> Listing:
    folder = "train" if split == "train" else test_folder
    if folder is None:
        raise _no_test(root, spec, "add test/ (or val/) holding its images like train/")
    subfolders, loose = split_entries(root, folder, passed)
    if subfolders:
        raise UsageError(f"'{spec}/{folder}/' holds subfolders ({some(f'{folder}/{n}' for n in subfolders)}) while "
                         "train/ holds its images directly: lay every split out the same, images directly in it "
                         "(unlabelled) or in <split>/<class>/ folders (classes)")
    if not loose and split != "train":
        raise _empty_test(spec, folder)
    prefix = os.path.join(str(root), folder, "")
    return Listing("unlabelled splits", None, [prefix + name for name in sorted(loose)], None)


def _unlabelled(root: Path, spec: str, split: str, passed: Passed) -> Listing:
    if split != "train":
        raise _no_test(root, spec, "lay it out as train/ and test/ folders to give it one")
    found = Walker(root, spec, "", passed).images("")
    if not found:
        raise UsageError(f"no images found in '{spec}' at any depth: put its images in it "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    prefix = os.path.join(str(root), "")
    return Listing("unlabelled", None, [prefix + rel for rel in found], None)


def _warn_beside_splits(root: Path, spec: str, splits: set[str | None]) -> None:
    """One line naming the folders and images beside the split folders, which are never read (an
    `unlabeled/` folder, loose images): nothing a layout leaves out goes unsaid."""
    beside = sorted(f"{e.name}/" if _folder(e) else e.name for e in os.scandir(root)
                    if not e.name.startswith(".") and e.name not in splits
                    and (is_image(e.name) or (_folder(e) and not is_run_dir(e.path))))
    if beside:
        print(f"warning: not reading {some(beside)} in dataset folder '{spec}': only its split folders "
              f"({', '.join(f'{s}/' for s in sorted(filter(None, splits)))}) are read", file=sys.stderr, flush=True)


def _folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that loops, beside the splits: never read, so not worth a word
        return False


def _empty_test(spec: str, folder: str) -> UsageError:
    return UsageError(f"the test split '{folder}/' of dataset folder '{spec}' holds no images: put its images in "
                      f"it, or remove {folder}/ (pretraining then holds out training images instead)")


def _no_test(root: Path, spec: str, fix: str) -> MissingSplit:
    found = ", ".join(sorted(f"{p.name}/" for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    return MissingSplit(f"dataset folder '{spec}' has no test split (no {', '.join(f'{t}/' for t in TEST_FOLDERS)}; "
                        f"found {found or 'no subfolders'})", fix)


def _test_class_folders(root: Path, folder: str, passed: Passed) -> list[str]:
    """The class folders of the test split of a classes layout: an image lying in it directly has no class."""
    names, loose = split_entries(root, folder, passed)
    if loose:
        raise UsageError(f"{len(loose)} image(s) lie directly in '{folder}/', outside any class folder "
                         f"(e.g. '{folder}/{loose[0]}'): move each into {folder}/<class>/ "
                         f"(an image's class is the first folder under {folder}/)")
    return names


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
        raise UsageError(f"class folders {some(f'train/{c}' for c in empty)} of '{spec}' hold no images at "
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
    raise UsageError(f"class folders {some(f'{test_folder}/{c}' for c in extra)} have no counterpart in "
                     f"train/ ({known}): add each to train/ with images or remove it from {test_folder}/")
