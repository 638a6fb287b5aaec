"""Tar shards in the webdataset layout as a dataset source: `shards:LOCATION`.

A shard is a plain tar whose samples are runs of members sharing a key: `<key>.jpg` (or any image
suffix `datasets` knows: png, webp, ...) and `<key>.cls` (the label as decimal text), the layout
timm, webdataset and most clusters use. They are read through `datasets`' webdataset builder, so a
stream's shards are the tar files: shuffled by seed + epoch, then mixed through the buffer, and
split between DataLoader workers (mpp.data.table_readers.HubImageStream); without `--streaming` they are
loaded whole into an Arrow cache and read by index (mpp.data.table_readers.HubImages).

LOCATION is
- a folder: its `train-*.tar` are the train split, and the first of `test-*.tar`, `val-*.tar`,
  `validation-*.tar` present the test split;
- or a pattern naming the train shards: `{000000..000099}` ranges (zero-padded like their first
  bound), `{a,b}` lists and `*` / `?` globs, e.g. `shards:/data/in1k/train-{000000..001281}.tar`.
  Every shard a brace names must exist. The test split is the folder's shards named like the
  pattern with `train` replaced by test, val or validation (any numbers: `test-*.tar`).

Labels: shards whose samples have `cls` members are labelled; shards whose samples have only an
image are unlabelled (for self-supervised pretraining). The first sample of every shard says which,
and every shard must say the same. Classes of labelled shards: `classes.txt` (one name per line,
line i is label i) or `classes.json` (a list of names) beside the shards. Without one, the classes
are 0..max label of the train split, read from the loaded labels, the largest below the number of
train samples (mpp.data.labels); a stream cannot list its labels without reading every shard, so
`--streaming` needs the file (scripts/make_shards.py writes it). A class file beside shards without
`cls` members is refused: the labels it names are missing. A label is a class number: decimal text
of 0..K-1 (webdataset has no "no label" value: negative is refused). Each shard's first sample is
checked when the data set is built (a readable tar, an image member, a class number when
labelled); a later sample without its members, or whose label is not a class number or outside
the classes (named by shard and key) stops the run with one line: when loaded, at the start; when
streamed, as it is read, also inside DataLoader workers.
"""
from __future__ import annotations

import functools
import glob
import io
import itertools
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable

from mpp.core.errors import MissingSplit, UsageError, first_line
from mpp.core.files import atomic_write
from mpp.data.datasets import DatasetInfo, ImageDataset
from mpp.data.labels import class_counts, inferred_classes
from mpp.data.table_readers import HubImages, HubImageStream

PREFIX = "shards:"
CLASS_FILES = ("classes.txt", "classes.json")
TEST_WORDS = ("test", "val", "validation")  # a test split's shards: the first of these names present
LABEL = "cls"  # the label member's suffix (webdataset's; datasets decodes it with int())
FORM = "pass shards:FOLDER (holding train-*.tar) or shards:/path/train-{000000..000099}.tar"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{00..02}.tar` → a-00.tar, a-01.tar, a-02.tar; `{x,y}` lists; several groups multiply, in order."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        if int(last) < int(first):
            raise UsageError(f"shard range {{{body}}} runs backwards: write {{{last}..{first}}}")
        words = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        words = body.split(",")
    else:
        raise UsageError(f"'{{{body}}}' in shard pattern '{pattern}' is neither a range nor a list: "
                         "write {000000..000099} or {a,b}")
    return [head + word + rest for word in words for rest in expand_braces(tail)]


def shard_files(location: str, split: str) -> list[Path]:
    """The tar files of `split` ("train" or "test") named by LOCATION (the module docstring)."""
    path = Path(location).expanduser()
    if path.is_dir():
        folder, name = path, "train-*.tar"
    else:
        folder, name = path.parent, path.name
    if not path.is_dir() and not any(c in path.name for c in "*?{") and not path.name.endswith(".tar"):
        folder = path  # named as a folder, not a pattern or a shard
    if not folder.is_dir():
        raise UsageError(f"shard folder '{folder}' does not exist: {FORM}")
    if split == "train":
        return _train_files(folder, name)
    if "train" not in _BRACE.sub("", name):
        raise UsageError(f"shard pattern '{location}' has no 'train' in its file name, so its test shards cannot "
                         "be named: call the shards train-*.tar and test-*.tar (or val-*.tar)")
    globbed = _BRACE.sub("*", name)
    for word in TEST_WORDS:
        found = sorted(folder.glob(globbed.replace("train", word, 1)))
        if found:
            return found
    tried = ", ".join(globbed.replace("train", w, 1) for w in TEST_WORDS)
    raise MissingSplit(f"shard folder '{folder}' has no test split (no {tried})",
                       "add test shards beside the train ones")


def _train_files(folder: Path, name: str) -> list[Path]:
    if _BRACE.search(name):
        files = [folder / n for n in expand_braces(name)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UsageError(f"{len(missing)} of the {len(files)} shards named are missing from '{folder}' ({shown}): "
                             "fix the range or copy the shards")
        return files
    files = sorted(Path(p) for p in glob.glob(str(folder / name)) if Path(p).is_file())
    if not files:
        raise UsageError(f"no shard matches '{folder / name}': {FORM}")
    return files


def check_first_sample(path: Path) -> bool:
    """A readable tar whose first sample has an image member, and a `cls` member holding an integer
    when it has one: a few header reads per shard, so every shard is checked when the data set is
    built. Whether that sample is labelled (has a `cls` member)."""
    from datasets.packaged_modules.webdataset.webdataset import (
        IMAGE_EXTENSIONS,
        base_plus_ext,
    )

    try:
        with tarfile.open(path, "r:") as tar:  # a plain tar (not compressed): one reason when it is not
            fields, key = {}, None
            for member in tar:
                member_key, field = base_plus_ext(member.name)
                if member_key is None or not member.isfile():
                    continue
                if key is not None and member_key != key:
                    break
                key = member_key
                fields[field] = tar.extractfile(member).read() if field == LABEL else b""
    except (tarfile.TarError, OSError) as e:
        raise UsageError(f"shard '{path}' is not a readable tar file ({first_line(e)}): replace it") from e
    found = ", ".join(sorted(fields)) or "no members"
    if key is None:
        raise UsageError(f"shard '{path}' holds no samples: remove it or write <key>.jpg and <key>.cls members")
    if not any(f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for f in fields):
        raise UsageError(f"shard '{path}': sample '{key}' has {found}, no image member: write shards with "
                         "<key>.jpg members, and <key>.cls for labels (scripts/make_shards.py)")
    if LABEL in fields and (problem := label_problem(fields[LABEL])):
        raise UsageError(label_line(path, key, fields[LABEL], problem))
    return LABEL in fields


def labelled_shards(files: list[Path]) -> bool:
    """Whether the shards are labelled: their first samples, each checked, all have a `cls` member or none has."""
    found = {path: check_first_sample(path) for path in files}
    with_label = [p.name for p, labelled in found.items() if labelled]
    if with_label and len(with_label) < len(found):
        without = [p.name for p, labelled in found.items() if not labelled]
        raise UsageError(f"shards {with_label[0]} and {without[0]} disagree: the first has cls members (labels) and "
                         "the second has none: write every shard with <key>.cls members, or none of them")
    return bool(with_label)


def label_problem(text: bytes) -> str | None:
    """What is wrong with a `cls` member's bytes as a class number, or None: datasets decodes it with
    int() (so "1.5", "nan", "True" fail there) into Arrow's int64, and a class number is 0 or more."""
    try:
        label = int(text)
    except ValueError:
        return "not an integer"
    if label < 0:
        return "a negative number"
    return "too large for a class number (over 64 bits)" if label >= 2**63 else None


def label_line(path: Path, key: str, text: bytes, problem: str) -> str:
    return (f"shard '{path}': sample '{key}' has the label {text[:20]!r}, {problem}: "
            "write each <key>.cls as the class index in decimal (0 or more)")


def read_class_names(folder: Path) -> list[str] | None:
    """The class names in `folder`'s classes.txt or classes.json, or None when it has neither."""
    for name in CLASS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        try:
            names = json.loads(text) if name.endswith(".json") else [line.strip() for line in text.splitlines()]
        except json.JSONDecodeError as e:
            raise UsageError(f"'{path}' is not JSON ({e.msg}): write a list of class names") from e
        names = [str(n) for n in names if str(n)] if isinstance(names, list) else []
        if not names:
            raise UsageError(f"'{path}' lists no class names: write one name per line (label i on line i + 1)")
        return names
    return None


def check_row(row: dict, *, spec: str, num_classes: int | None, image_column: str, whose: str = "listed",
              others: int = 0) -> dict:
    """A sample (a streamed one as it is read): it has its image and, labelled, a class number below
    num_classes (the classes `whose`, e.g. "listed"), or the run stops with one line (saying that
    `others` samples more are bad). num_classes 0: unlabelled shards; None: labelled shards whose
    classes are not known yet (any class number passes)."""
    where = f"sample '{row['__key__']}' of shard '{row['__url__']}'"
    if num_classes == 0:  # unlabelled: its image is all it must have
        if row[image_column] is None:
            raise UsageError(f"{where} lacks its image member: fix or remove the shard of dataset '{spec}'")
        return row
    if row[image_column] is None or row[LABEL] is None:
        raise UsageError(f"{where} lacks its {'image' if row[image_column] is None else 'cls'} member: "
                         f"fix or remove the shard of dataset '{spec}'")
    also = f" (as do {others:,} more samples)" if others else ""
    if row[LABEL] < 0:
        raise UsageError(f"{where} has label {row[LABEL]}, not a class number (0 or more){also}: write each "
                         "<key>.cls as the class index in decimal")
    if num_classes is not None and row[LABEL] >= num_classes:
        raise UsageError(f"{where} has label {row[LABEL]}, outside the {num_classes} classes {whose} "
                         f"(0..{num_classes - 1}){also}: fix the label or list every class in classes.txt beside "
                         "the shards")
    return row


def load_shards(spec: str, split: str, streaming: bool) -> tuple[Callable[..., ImageDataset], DatasetInfo]:
    """The split of `shards:LOCATION` as a constructor (taking the contract's info, transform, seed, ...)
    and the split's DatasetInfo, as mpp.data.sources.load_split's other sources."""
    location = spec.removeprefix(PREFIX)
    if not location:
        raise UsageError(f"'{spec}' names no shards: {FORM}")
    files = shard_files(location, split)
    labelled = labelled_shards(files)
    class_names = read_class_names(files[0].parent)
    if not labelled and class_names is not None:
        raise UsageError(f"the shards of '{location}' have no cls members, yet classes are listed beside them "
                         f"({', '.join(CLASS_FILES)}): write the labels as <key>.cls members, or remove the "
                         "class file to read them unlabelled")
    if labelled and class_names is None and streaming:
        raise UsageError(f"streamed shards '{location}' do not list their classes: put classes.txt beside them "
                         "(one class name per line, label i on line i + 1), or drop --streaming")
    import datasets

    table = _load(spec, files, split, streaming)
    whose = "listed" if class_names is not None else "the train split's labels give"
    if labelled and class_names is None:  # map-style: the classes are 0..max of train's labels, checked first
        train = table if split == "train" else _load(spec, shard_files(location, "train"), "train", False)
        class_names = _inferred_classes(spec, train)
    layout = f"tar shards {'with' if labelled else 'without'} cls members"
    label_column = LABEL if labelled else None
    # The first sample's members have been checked, so datasets has inferred an image column.
    image_column = _image_column(table)
    # Undecoded from here: the check below must not decode images, and mpp.data.table_readers decodes them itself.
    table = table.select_columns(["__key__", "__url__", image_column, *([LABEL] if labelled else [])]).cast_column(
        image_column, datasets.Image(decode=False))
    num_classes = len(class_names) if labelled else 0
    checker = functools.partial(check_row, spec=spec, num_classes=num_classes, image_column=image_column, whose=whose)
    if streaming:
        table = table.map(checker, features=table.features)  # checked as read: a stream is not scanned
        read_error = functools.partial(stream_error, spec, files)
        info = DatasetInfo(spec, class_names, layout, split)
        return functools.partial(HubImageStream, table, image_column, label_column, read_error=read_error), info
    _check_table(table, checker, image_column)
    counts = class_counts(table.data.table.column(LABEL).to_numpy(), num_classes) if labelled else (None, 0)
    return functools.partial(HubImages, table, image_column, label_column), DatasetInfo(spec, class_names, layout,
                                                                                        split, *counts)


def _image_column(table: Any) -> str:
    import datasets

    return next(c for c, f in table.features.items() if isinstance(f, datasets.Image))


def _inferred_classes(spec: str, train: Any) -> list[str]:
    """The classes of loaded labelled shards without a class file: 0..the largest label of the train
    split, once every train sample has its members and a class number, and the largest is plausible
    (mpp.data.labels.inferred_classes)."""
    _check_table(train, functools.partial(check_row, spec=spec, num_classes=None, image_column=_image_column(train)),
                 _image_column(train))
    data = train.data.table

    def name_row(index: int) -> str:
        row = data.slice(index, 1).select(["__key__", "__url__"]).to_pylist()[0]
        return f"sample '{row['__key__']}' of shard '{row['__url__']}'"

    return inferred_classes(data.column(LABEL).to_numpy(), name_row, "fix the label, or list the classes in "
                            "classes.txt beside the shards (one name per line, label i on line i + 1)")


def _load(spec: str, files: list[Path], split: str, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset("webdataset", data_files={split: [str(f) for f in files]},
                                     streaming=streaming, split=split)
    except (ValueError, OSError, OverflowError, tarfile.TarError, datasets.exceptions.DatasetGenerationError) as e:
        # members not shared by every sample, a torn tar, a label not a number (datasets' int()) or over 64 bits ...
        cause = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise UsageError(bad_label(files) or f"the shards of '{spec}' cannot be loaded ({first_line(cause)}): "
                         "write every sample with the same members (<key>.jpg and <key>.cls)") from e


def stream_error(spec: str, files: list[Path], error: BaseException) -> str:
    """The one line for a streamed shard that datasets failed to read (mpp.data.table_readers.HubImageStream)."""
    return bad_label(files) or (f"the shards of '{spec}' could not be read ({first_line(error)}): "
                                "fix or remove the shard")


def bad_label(files: list[Path]) -> str | None:
    """The one line for the first `cls` member of `files` that is not a class number (label_problem), or None
    (a scan of the tar headers and the tiny label members, run once something failed to load)."""
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    for path in files:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    key, field = base_plus_ext(member.name)
                    if field != LABEL or not member.isfile():
                        continue
                    text = tar.extractfile(member).read()
                    if problem := label_problem(text):
                        return label_line(path, key, text, problem)
        except (tarfile.TarError, OSError):
            continue  # a torn shard: the caller's own message says what datasets met
    return None


def _check_table(table: Any, checker: Callable[..., dict], image_column: str) -> None:
    """A loaded split's samples all have their image and a label in range (check_row's num_classes):
    read from the Arrow columns (no image decoded); the first bad sample is then checked row-wise
    for its message."""
    import pyarrow.compute as pc

    data = table.data.table
    images, num_classes = data.column(image_column), checker.keywords["num_classes"]
    bad = pc.is_null(images)
    if num_classes != 0:  # labelled: every label present and a class number (below num_classes when known)
        labels = data.column(LABEL)
        outside = pc.less(labels, 0) if num_classes is None else \
            pc.or_(pc.less(labels, 0), pc.greater_equal(labels, num_classes))
        bad = pc.or_(pc.or_(pc.is_null(labels), bad), outside)
    bad = pc.fill_null(bad, True)
    if pc.any(bad).as_py():
        index = pc.index(bad, True).as_py()
        row = data.slice(index, 1).select(["__key__", "__url__", image_column, *([LABEL] if num_classes != 0 else [])])
        checker(row.to_pylist()[0], others=pc.sum(bad).as_py() - 1)


def write_shards(samples: Iterable[tuple[bytes, str, int | None]], out: Path, split: str, per_shard: int) -> list[Path]:
    """Write `samples` (image file bytes, its suffix such as "jpg", label or None: no cls member), read
    lazily in order, as out/<split>-000000.tar, ...: `per_shard` samples each, keyed <split>-<index>;
    each tar written whole."""
    out.mkdir(parents=True, exist_ok=True)
    paths, samples = [], iter(samples)
    while chunk := list(itertools.islice(samples, per_shard)):
        path = out / f"{split}-{len(paths):06d}.tar"
        first = len(paths) * per_shard
        atomic_write(path, functools.partial(_write_tar, chunk, split, first))
        paths.append(path)
    return paths


def _write_tar(chunk: list[tuple[bytes, str, int | None]], split: str, first: int, f: Any) -> None:
    with tarfile.open(fileobj=f, mode="w") as tar:
        for index, (data, suffix, label) in enumerate(chunk, first):
            key = f"{split}-{index:08d}"
            members = [(f"{key}.{suffix}", data)]
            if label is not None:
                members.append((f"{key}.{LABEL}", str(label).encode()))
            for name, payload in members:
                member = tarfile.TarInfo(name)
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
