"""Walking an image folder's tree for mpp.data.folders: which entries are read, and what is passed over.

A folder is read by names alone (os.scandir tells folders from files without a stat per name), so
what the names cannot say is checked here, where it costs a stat per folder or per link, never per
image:
- a link that loops (to itself, to another link back, or to a folder above it) is passed over with
  a warning: reading it would fail, or list the same images again as this class until the path
  grew too long;
- a name that is not UTF-8 (a file copied from an old Latin-1 or Shift-JIS disk) is passed over
  with a warning: Arrow, JSON and most terminals cannot carry it;
- a class folder that holds another class's images through a link (`train/dog -> cat`, or a
  subfolder or image linking into train/cat/) is refused: its images would get two labels.
Links that lead elsewhere are followed, and a folder met twice (two links to it) is walked once.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpp.core.errors import UsageError
from mpp.core.layout import RUN_MARKERS  # even when --output-dir points into a dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
_SUFFIX_TUPLE = tuple(IMAGE_SUFFIXES)  # str.endswith takes a tuple: one C call per name
ABOVE = ""  # the owner of the dataset folder and its split folder: above every class


@dataclass
class Passed:
    """What one listing passed over, each kind said in one warning line at its end (`warn`)."""
    run_dirs: list[str] = field(default_factory=list)  # folders holding a run's outputs (RUN_MARKERS)
    loops: list[str] = field(default_factory=list)  # links that loop, relative to the dataset folder
    undecodable: list[str] = field(default_factory=list)  # names that are not UTF-8

    def warn(self, spec: str) -> None:
        """One line per kind for a whole listing, however many it passed over (or met twice)."""
        if self.run_dirs:
            names = sorted(set(self.run_dirs))
            what = "a run directory" if len(names) == 1 else "run directories"
            _warn(f"not reading {some(names)} in dataset folder '{spec}' as data: {what} (holds "
                  f"{' or '.join(RUN_MARKERS)}); keep run outputs out of the dataset folder")
        if self.loops:
            _warn(f"not reading {some(sorted(set(self.loops)))} in dataset folder '{spec}': a link that loops (to "
                  "itself, or to a folder above it); remove it, or point it elsewhere")
        if self.undecodable:
            _warn(f"not reading {some(sorted(set(self.undecodable)))} in dataset folder '{spec}': a name that is "
                  "not UTF-8; rename it in UTF-8 (e.g. with convmv -r -f latin1 -t utf8 FOLDER)")


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def is_image(name: str) -> bool:
    return name.lower().endswith(_SUFFIX_TUPLE)  # as splitext's suffix for every name not hidden


def is_run_dir(path: str) -> bool:
    """Whether a folder is a run directory of this repo: its outputs (checkpoints, metrics) are not data."""
    return any(os.path.isfile(os.path.join(path, marker)) for marker in RUN_MARKERS)


def utf8(name: str) -> bool:
    """Whether a name os.scandir gave is UTF-8: other bytes come back as lone surrogates (PEP 383)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A name as a message shows it: bytes that are not UTF-8 as \\xff, as Python writes bytes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def some(names: Any, shown_count: int = 5) -> str:
    """'a', 'b', 'c' and 4 more: a list that keeps an error message to one readable line."""
    names = list(names)
    quoted = ", ".join(f"'{shown(n)}'" for n in names[:shown_count])
    return quoted + (f" and {len(names) - shown_count} more" if len(names) > shown_count else "")


def folder_id(folder: Path | os.DirEntry) -> tuple[int, int]:
    info = folder.stat()  # follows links; a DirEntry caches it
    return info.st_dev, info.st_ino


def split_entries(root: Path, folder: str, passed: Passed) -> tuple[list[str], list[str]]:
    """(sorted subfolder names, sorted image names lying directly in it) of root/`folder`, less
    hidden entries and what `passed` takes: run directories, looping links, names not UTF-8."""
    names, loose = [], []
    with scan(root / folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):  # .ipynb_checkpoints, .DS_Store, ._name (macOS resource forks)
                continue
            is_dir = _is_dir(entry, f"{folder}/", passed)
            if is_dir and is_run_dir(entry.path):
                passed.run_dirs.append(f"{folder}/{entry.name}")
            elif is_dir:
                names.append(entry.name)
            elif is_dir is False and is_image(entry.name):
                loose.append(entry.name)
    return sorted(names), sorted(loose)


def scan(folder: Path):
    """os.scandir(folder), or a one-line error when the folder cannot be read (its permissions)."""
    try:
        return os.scandir(folder)
    except OSError as e:
        raise UsageError(f"cannot read the dataset's folder '{folder}' ({e.strerror or e}): make it readable "
                         "(chmod u+rx), or move it out of the dataset") from e


def _is_dir(entry: os.DirEntry, head: str, passed: Passed) -> bool | None:
    """Whether an entry is a folder (a link to one included); None when it is passed over: a name
    not UTF-8, or a link that loops (its stat fails: ELOOP)."""
    if not utf8(entry.name):
        passed.undecodable.append(head + entry.name)
        return None
    try:
        return entry.is_dir()
    except OSError:
        passed.loops.append(head + entry.name)
        return None


@dataclass
class Walker:
    """The walks below the class folders of one split (or below an unlabelled folder): each folder is
    walked once, by the first class to meet it, and a class meeting another's folder or image through
    a link is refused. `classes`: the split's class names; empty for unlabelled images."""
    root: Path
    spec: str
    split: str  # "train", the test folder, or "" (a folder without splits)
    passed: Passed
    classes: list[str] = field(default_factory=list)
    # folder id → the path (relative to root) whose walk took it; ABOVE for the dataset and split folders
    owners: dict[tuple[int, int], str] = field(init=False, default_factory=dict)
    # each class folder's absolute path, as given and resolved → the class folder ("train/cat")
    class_paths: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.owners[folder_id(self.root)] = ABOVE
        if self.split:
            self.owners.setdefault(folder_id(self.root / self.split), ABOVE)
        for c in self.classes:
            for path in {os.path.abspath(self.root / self.split / c), os.path.realpath(self.root / self.split / c)}:
                self.class_paths[path] = f"{self.split}/{c}"

    def images(self, folder: str, first_only: bool = False) -> list[str]:
        """The images at any depth below root/`folder` (a class folder, or "" for root itself), as
        sorted paths relative to root. `first_only` stops at the first image found."""
        self._claim(folder)
        found, pending = [], [folder]
        while pending:
            current = pending.pop()
            head, real = (f"{current}/" if current else ""), None  # real: the folder resolved, for its links
            with scan(self.root / current) as entries:
                for entry in entries:  # the loop runs once per file: kept to a few C calls each
                    name = entry.name
                    if name.startswith("."):
                        continue
                    is_dir = _is_dir(entry, head, self.passed)
                    if is_dir and is_run_dir(entry.path):
                        self.passed.run_dirs.append(head + name)
                    elif is_dir and self._enter(entry, head + name, current, folder):
                        pending.append(head + name)
                    elif is_dir is False and name.lower().endswith(_SUFFIX_TUPLE):  # is_image, inlined
                        if self.classes and entry.is_symlink():  # no stat: the scan's file type says
                            real = real or os.path.realpath(self.root / current)
                            self._check_file_link(entry, head + name, real, folder)
                        found.append(head + name)
                        if first_only:
                            return found
        return sorted(found)

    def _claim(self, folder: str) -> None:
        """Start a class folder's walk: refused when another class has walked it (one is a link to the other)."""
        fid = folder_id(self.root / folder)
        owner = self.owners.get(fid)
        if owner == ABOVE and folder != self.split and folder:
            raise UsageError(f"class folder '{folder}' of '{self.spec}' is a link to the dataset folder or its "
                             f"{self.split}/ folder, so it would hold every class's images: remove the link")
        if owner:
            raise self._two_labels(owner, folder)
        self.owners.setdefault(fid, folder)

    def _enter(self, entry: os.DirEntry, rel: str, current: str, folder: str) -> bool:
        """Whether to walk the subfolder `entry` (at `rel`): not when it was walked already, nor when
        it is a link to a folder above it (a loop: warned); refused when another class walked it."""
        fid = folder_id(entry)  # one stat per folder, not per image
        if entry.is_symlink() and _above(entry.path, self.root / current):
            self.passed.loops.append(rel)
            return False
        owner = self.owners.setdefault(fid, rel)
        if owner == rel:
            return True
        if owner and self.classes and _class_folder(owner) != folder:
            raise self._two_labels(owner, rel)
        return False  # a second link to a folder this walk has read: listed once

    def _check_file_link(self, entry: os.DirEntry, rel: str, real: str, folder: str) -> None:
        """Refuse an image linking into another class folder: it would be an image of both classes."""
        try:
            target = os.path.normpath(os.path.join(real, os.readlink(entry.path)))
        except OSError:  # gone since the scan: reading it will say so
            return
        path = target
        while (parent := os.path.dirname(path)) != path:  # a few dict lookups: links only, and no stat
            other = self.class_paths.get(parent)
            if other is not None and other != folder:
                into = f"{other}/{os.path.relpath(target, parent)}"
                raise self._two_labels(other, rel, f"'{shown(rel)}' is a link to '{shown(into)}'")
            path = parent

    def _two_labels(self, first: str, second: str, how: str = "") -> UsageError:
        """The refusal of two class folders holding one image: `first` met first, then `second`; `how`:
        the link that makes them share it (default: the two are one folder)."""
        how = how or f"'{shown(second)}' and '{shown(first)}' are one folder, through a link"
        a, b = sorted({_class_folder(first), _class_folder(second)})
        return UsageError(f"class folders '{shown(a)}' and '{shown(b)}' of '{self.spec}' hold the same images ({how}), "
                          f"so each would get both labels: remove the link (an image has one class: the first "
                          f"folder under {self.split}/)")


def _class_folder(rel: str) -> str:
    """The class folder ("train/cat") of a path relative to the dataset folder ("train/cat/2019/a.png")."""
    return "/".join(rel.split("/")[:2])


def _above(link: str, here: Path) -> bool:
    """Whether the folder a link resolves to is `here` (the folder holding the link) or above it."""
    target, real = os.path.realpath(link), os.path.realpath(here)
    return real == target or real.startswith(target.rstrip(os.sep) + os.sep)
