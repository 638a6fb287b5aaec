"""An unlabelled view of a labelled image folder: the same images, without their classes.

`<folder>-unlabelled`, beside the labelled `<folder>`, holds `train/` and the folder's held-out split
(`test/` or `val/`, as it names it) with every image of that split directly inside: the "unlabelled
splits" layout of mpp.data.folders, so a run reads it as images without labels, its held-out split
being the labelled folder's. Nothing in the view says an image's class: each file is named by a hash of
its path in the labelled folder (which holds the class folder) plus its own suffix, so neither a name
nor the sorted order of the names follows the classes. Files are hard links where the file system
allows (no space taken), else copies.

The view is built whole or not at all (mpp.core.files.replace_folder: a temporary sibling renamed into
place; one that a killed build left is removed by the next), its manifest (MANIFEST: the images per
split) written last. An existing view is trusted only when its manifest and its split folders hold as
many images as the labelled folder's splits; otherwise it is refused, never rebuilt over.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mpp.core.errors import MissingSplit, UsageError
from mpp.core.files import link_or_copy, replace_folder
from mpp.data.folders import folder_layout, folder_listing
from mpp.data.shards import PREFIX as SHARDS_PREFIX

SUFFIX = "-unlabelled"  # data/imagenette → data/imagenette-unlabelled
MANIFEST = "view.json"  # not an image: the folder reader passes over it
HASH_DIGITS = 32  # 128 bits of sha256: names of distinct paths never meet (and are checked not to)
NOT_LABELLED_FIX = ("an unlabelled view is made of a labelled image folder: pass a folder laid out as "
                    "train/<class>/<image> (with test/ or val/ the same), or pretrain on unlabelled data directly")


def view_spec(spec: str) -> str:
    """The view's folder beside the labelled folder `spec`, as a spec of the same kind (relative stays relative)."""
    path = Path(spec).expanduser()
    if path.name in ("", ".", ".."):  # a folder named by "." has no name to suffix: name it
        path = path.resolve()
    return str(path.with_name(path.name + SUFFIX))


def labelled_splits(spec: str) -> dict[str, list[str]]:
    """{split folder ("train", then "test" or "val" if the folder has one): the absolute paths of its
    images} of the labelled image folder `spec`; anything else (digits, hf:, shards:, an unlabelled
    folder) is refused in one line before anything is written."""
    if spec == "digits" or spec.startswith(("hf:", SHARDS_PREFIX)):
        raise UsageError(f"dataset '{spec}' is not a local image folder: {NOT_LABELLED_FIX}")
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UsageError(f"dataset folder '{spec}' {'is not a folder' if root.exists() else 'does not exist'}: "
                         f"{NOT_LABELLED_FIX}")
    train = folder_listing(root, spec, "train")
    if train.labels is None:
        raise UsageError(f"dataset folder '{spec}' has no labels (its layout: {train.layout}): {NOT_LABELLED_FIX}")
    splits = {"train": train.paths}
    test_folder = folder_layout(root, spec)[1]
    try:
        splits[test_folder] = folder_listing(root, spec, "test").paths
    except MissingSplit:
        pass  # no held-out split: the view has none either, and pretraining carves one from train/
    return splits


def view_name(relative: str) -> str:
    """The view's name of the image at `relative` (to the labelled folder, its class folder in it)."""
    digest = hashlib.sha256(relative.replace(os.sep, "/").encode("utf-8", "surrogateescape")).hexdigest()
    return digest[:HASH_DIGITS] + os.path.splitext(relative)[1]


def unlabelled_view(spec: str, build: bool = True) -> str:
    """The spec of the unlabelled view of the labelled image folder `spec`, built if it is not there
    (unless not `build`: a dry run checks what is there and writes nothing)."""
    splits = labelled_splits(spec)
    view = view_spec(spec)
    counts = {split: len(paths) for split, paths in splits.items()}
    if not check_view(Path(view), spec, counts) and build:
        root = os.path.join(str(Path(spec).expanduser()), "")
        replace_folder(Path(view), lambda tmp: fill(tmp, root, splits, spec))
    return view


def check_view(view: Path, spec: str, counts: dict[str, int]) -> bool:
    """True when `view` is a complete view of a folder with `counts` images per split, False when there is
    none; a view that is neither (built by other means, edited, of other images) is refused."""
    if not os.path.lexists(view):
        return False
    fix = f"remove '{view}' and rerun to build it again from '{spec}'"
    try:
        recorded = json.loads((view / MANIFEST).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"'{view}' is no complete unlabelled view of '{spec}' (its {MANIFEST} cannot be read: "
                         f"{type(e).__name__}): {fix}") from e
    found = {split: sum(1 for e in os.scandir(view / split) if not e.name.startswith(".")) if (view / split).is_dir()
             else 0 for split in set(recorded) | set(counts)}
    if recorded != counts or found != counts:
        said = ", ".join(f"{split} {counts.get(split, 0):,}/{recorded.get(split, 0):,}/{found[split]:,}"
                         for split in sorted(found))
        raise UsageError(f"'{view}' does not match '{spec}' (images per split, labelled/recorded/in the view: "
                         f"{said}): {fix}")
    return True


def fill(folder: Path, root: str, splits: dict[str, list[str]], spec: str) -> None:
    """The view's files in `folder`: every image of each split directly in its split folder, then the manifest."""
    for split, paths in splits.items():
        (folder / split).mkdir()
        names: dict[str, str] = {}
        for path in paths:
            relative = path[len(root):]
            name = view_name(relative)
            if name in names:  # 128 bits make it unheard of; were it to happen, one image would be lost
                raise UsageError(f"images '{names[name]}' and '{relative}' of '{spec}' hash to one name in its "
                                 "unlabelled view: rename one of them")
            names[name] = relative
            link_or_copy(path, folder / split / name)
    manifest = {"source": spec, "images": {split: len(paths) for split, paths in splits.items()},
                "names": f"the first {HASH_DIGITS} hex digits of sha256 of the image's path in the source, "
                         "then its suffix"}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence means complete
