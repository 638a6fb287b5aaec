"""Tests for mpp.data.sources: the digits default, image folders, transforms, errors, and a slice of real CIFAR-10."""
from __future__ import annotations

import copy
import json
import multiprocessing
import pickle
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import run_script
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

import mpp.data.table_readers
from mpp.core.errors import UsageError, one_line
from mpp.data.decode import rgb_tensor
from mpp.data.sources import (
    DEFAULT_DATASET,
    MEAN,
    STD,
    build_dataset,
    eval_transform,
    load_split,
    normalize,
    train_transform,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def assert_usage_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    """The message is one line and names the problem and the fix (each of `needles`)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---- digits


def test_digits_splits_are_fixed_stratified_and_three_channel() -> None:
    assert DEFAULT_DATASET == "digits"
    train, info = load_split("digits", "train")
    test, test_info = load_split("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert info.spec == "digits" and info.num_classes == 10 and list(info.class_names) == [str(d) for d in range(10)]
    assert test_info.class_names == info.class_names and (info.split, test_info.split) == ("train", "test")
    images = torch.stack([train[i][0] for i in range(len(train))])  # uint8 [1437, 3, 8, 8]
    assert images.dtype == torch.uint8 and images.shape == (1437, 3, 8, 8)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert images.min() == 0 and images.max() == 255  # 0..16 scaled to the full byte range
    label_counts = Counter(train[i][1] for i in range(len(train)))
    test_counts = Counter(test[i][1] for i in range(len(test)))
    assert info.class_counts == tuple(label_counts[d] for d in range(10)) and info.unlabelled_items == 0
    assert test_info.class_counts == tuple(test_counts[d] for d in range(10))
    assert all(isinstance(train[i][1], int) for i in range(5))
    for digit in range(10):  # stratified: every class splits 80/20 (within one image)
        total = label_counts[digit] + test_counts[digit]
        assert abs(test_counts[digit] - 0.2 * total) <= 1


def test_digits_are_sklearns_images_and_split_read_without_importing_sklearn() -> None:
    """mpp.data.digits reads sklearn's file and redraws its split: both must be sklearn's own, bitwise (the
    README's tables were made on that split), and loading the digits must not import sklearn."""
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    from mpp.data.digits import load_digits, stratified_split

    images, target = load_digits()
    expected = sklearn_digits()
    assert np.array_equal(images, expected.images) and np.array_equal(target, expected.target)
    train, test = stratified_split(target)
    want_train, want_test = train_test_split(np.arange(len(target)), test_size=0.2, stratify=target, random_state=0)
    assert np.array_equal(train, want_train) and np.array_equal(test, want_test)
    for seed in (1, 7):  # the draws themselves, not one lucky seed
        got = stratified_split(target, 0.3, seed)
        want = train_test_split(np.arange(len(target)), test_size=0.3, stratify=target, random_state=seed)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    code = ("import sys; from mpp.data.sources import load_split; load_split('digits', 'train'); "
            "print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "False", done.stderr[-2000:]


def test_digits_are_deterministic_across_loads() -> None:
    first, _ = load_split("digits", "test")
    second, _ = load_split("digits", "test")
    assert all(torch.equal(first[i][0], second[i][0]) and first[i][1] == second[i][1] for i in range(len(first)))


def test_build_dataset_digits_train_items() -> None:
    dataset, info = build_dataset("digits", "train", 32, train=True)
    assert len(dataset) == 1437 and info.num_classes == 10
    for i in range(0, 1437, 300):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert label in range(10)
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    restored = pickle.loads(pickle.dumps(dataset))  # what DataLoader workers get under spawn
    assert len(restored) == 1437 and restored[0][0].shape == (3, 32, 32)


def test_streamed_digits_shuffle_by_seed_and_epoch() -> None:
    stream, info = build_dataset("digits", "train", 16, train=False, streaming=False)
    map_labels = Counter(stream[i][1] for i in range(len(stream)))
    stream, info = build_dataset("digits", "train", 16, train=True, streaming=True, shuffle_buffer=500, seed=1)
    assert isinstance(stream, IterableDataset) and not hasattr(stream, "__len__")
    items = list(stream)
    assert len(items) == 1437 and Counter(label for _, label in items) == map_labels
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 for image, _ in items[:20])
    again, _ = build_dataset("digits", "train", 16, train=True, streaming=True, shuffle_buffer=500, seed=1)
    order = [label for _, label in items[:100]]
    assert [label for _, label in islice(again, 100)] == order  # same seed, same order
    again.set_epoch(1)
    assert [label for _, label in islice(again, 100)] != order  # a new epoch reshuffles


# ---- transforms


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 20, 37)])
def test_transforms_give_float_square_images_in_unit_range(size: int, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, shape, dtype=torch.uint8)
    for transform in (train_transform(size), train_transform(size, (0.5, 1.0), hflip=False), eval_transform(size)):
        out = transform(image)
        assert out.dtype == torch.float32 and out.shape == (3, size, size)
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_eval_transform_is_deterministic_and_exact_at_its_own_size() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8)
    transform = eval_transform(16)
    assert torch.equal(transform(image), transform(image))
    square = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(transform(square), square.float() / 255)
    # Non-square: the shorter side goes to S and the centre survives, so a centred stripe stays centred.
    stripe = torch.zeros(3, 20, 60, dtype=torch.uint8)
    stripe[:, :, 25:35] = 255
    out = eval_transform(20)(stripe)  # [3, 20, 20]
    assert out[:, :, 8:12].min() > 0.99 and out[:, :, :3].max() < 0.01 and out[:, :, -3:].max() < 0.01


def test_train_transform_flips_only_when_asked() -> None:
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain, flipped = image.float() / 255, image.flip(-1).float() / 255
    # scale (1, 1) keeps the whole square image, so each output is the image or its mirror.
    torch.manual_seed(0)
    with_flip = [train_transform(16, (1.0, 1.0), hflip=True)(image) for _ in range(20)]
    assert all(torch.allclose(out, plain) or torch.allclose(out, flipped) for out in with_flip)
    assert any(torch.allclose(out, flipped) for out in with_flip)
    assert any(torch.allclose(out, plain) for out in with_flip)
    without_flip = [train_transform(16, (1.0, 1.0), hflip=False)(image) for _ in range(20)]
    assert all(torch.allclose(out, plain) for out in without_flip)


def test_train_transform_crops_randomly_and_transforms_pickle() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    transform = train_transform(16)
    assert not torch.equal(transform(image), transform(image))
    for made in (train_transform(16), eval_transform(16)):
        restored = pickle.loads(pickle.dumps(made))
        assert restored(image).shape == (3, 16, 16)
    assert torch.equal(pickle.loads(pickle.dumps(eval_transform(16)))(image), eval_transform(16)(image))


def test_normalize_maps_unit_range_to_minus_one_one() -> None:
    assert MEAN == (0.5, 0.5, 0.5) and STD == (0.5, 0.5, 0.5)
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)  # [2, 3, 4, 4]
    out = normalize(images)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    half = normalize(images.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half[1, 2, 3, 3] == 1.0


# ---- decoding any image mode


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (5, 3), 100), (100, 100, 100)),
        (Image.new("1", (5, 3), 1), (255, 255, 255)),
        (Image.new("LA", (5, 3), (70, 0)), (70, 70, 70)),
        (Image.new("RGB", (5, 3), (10, 20, 30)), (10, 20, 30)),
        (Image.new("RGBA", (5, 3), (10, 20, 30, 0)), (10, 20, 30)),
        (Image.new("CMYK", (5, 3), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.fromarray(np.full((3, 5), 40000, dtype=np.uint16)), (156, 156, 156)),  # 16-bit: top byte
        (np.full((3, 5, 3), 7, dtype=np.uint8), (7, 7, 7)),  # an array column
    ],
)
def test_rgb_tensor_converts_every_mode(image: object, expected: tuple[int, int, int]) -> None:
    out = rgb_tensor(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 5)
    assert out[:, 1, 2].tolist() == list(expected)


def test_rgb_tensor_palette_with_transparency() -> None:
    image = Image.new("P", (4, 2), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.info["transparency"] = 0
    with_transparency = rgb_tensor(image)
    assert with_transparency.shape == (3, 2, 4) and with_transparency[:, 0, 0].tolist() == [200, 100, 50]


# ---- image folders


def save_image(path: Path, mode: str, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("P", size, 1)
        image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    else:
        image = Image.new(mode, size, {"L": 90, "RGB": (1, 2, 3), "RGBA": (9, 8, 7, 6), "CMYK": (0, 50, 0, 0)}[mode])
    image.save(path)


def make_folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.<ext>, cycling through image modes, formats and sizes."""
    kinds = [("L", "png"), ("RGBA", "png"), ("RGB", "jpg"), ("P", "png"), ("CMYK", "jpg")]
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            for i in range(n):
                mode, ext = kinds[i % len(kinds)]
                save_image(root / split / cls / f"{i}.{ext}", mode, (6 + 3 * i, 5 + 2 * (i % 3)))
    return root


def test_image_folder_mixed_modes_and_val_fallback(tmp_path: Path, hf_cache: Path) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 5, "dog": 3}, "val": {"cat": 2, "dog": 1}})
    train, info = load_split(str(root), "train")
    test, test_info = load_split(str(root), "test")  # no test/: falls back to val/
    assert (len(train), len(test)) == (8, 3)
    assert info.class_names == test_info.class_names == ["cat", "dog"] and info.num_classes == 2
    assert info.spec == str(root)
    items = [train[i] for i in range(len(train))]
    for image, _ in items:
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    assert {tuple(image.shape[1:]) for image, _ in items} == {(5, 6), (7, 9), (9, 12), (5, 15), (7, 18)}
    assert Counter(label for _, label in items) == {0: 5, 1: 3}  # labels follow the folder names
    assert Counter(test[i][1] for i in range(len(test))) == {0: 2, 1: 1}
    assert not hf_cache.exists()  # listed into memory: no Arrow copy of the folder is written
    dataset, _ = build_dataset(str(root), "train", 16, train=True)
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))  # mixed sizes collate once transformed
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 3


def test_image_folder_labels_agree_across_splits(tmp_path: Path, hf_cache: Path) -> None:
    # test/ has only "dog" (and val/ exists too): its labels must still use train's numbering.
    counts = {"train": {"ant": 2, "bee": 2, "dog": 2}, "test": {"dog": 3}, "val": {"ant": 1}}
    root = make_folder(tmp_path / "bugs", counts)
    test, info = load_split(str(root), "test")  # test/ wins over val/
    assert info.class_names == ["ant", "bee", "dog"] and len(test) == 3
    assert {test[i][1] for i in range(len(test))} == {2}


def test_image_folder_streams(tmp_path: Path, hf_cache: Path) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 4, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    stream, info = build_dataset(str(root), "train", 16, train=True, streaming=True, shuffle_buffer=4)
    assert not hasattr(stream, "__len__") and info.class_names == ["cat", "dog"]
    items = list(stream)
    assert Counter(label for _, label in items) == {0: 4, 1: 2}
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 for image, _ in items)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_streamed_folder_yields_what_the_loaded_one_holds(tmp_path: Path, hf_cache: Path, split: str) -> None:
    # Both modes are built from one listing: same classes, labels and images.
    counts = {"train": {"ant": 3, "bee": 2, "cat": 1, "dog": 2}, "test": {"dog": 2, "cat": 1}, "val": {"ant": 1}}
    root = make_folder(tmp_path / "bugs", counts)
    loaded, info = load_split(str(root), split)
    stream, stream_info = load_split(str(root), split, streaming=True)
    assert stream_info.class_names == info.class_names == ["ant", "bee", "cat", "dog"]

    def key(item):
        image, label = item
        return label, tuple(image.shape), image.sum().item()

    assert sorted(map(key, stream)) == sorted(key(loaded[i]) for i in range(len(loaded)))


# ---- the image-folder convention: the class is the first folder under the split, in both modes


def listed(dataset) -> list[tuple[str, int]]:
    """(path, label) of every image a loaded or streamed folder dataset holds, in its order, unread."""
    return [(row["image"]["path"], row["label"]) for row in dataset.table]


def class_of(path: str, root: Path, split: str) -> str:
    return Path(path).relative_to(root / split).parts[0]


def both_modes(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names and (path, label) list of `split`, asserted equal loaded and streamed."""
    loaded, info = load_split(str(root), split)
    stream, stream_info = load_split(str(root), split, streaming=True)
    assert stream_info == info and len(loaded) == len(listed(stream))
    assert listed(loaded) == listed(stream)  # same images, labels and order, by construction
    return info.class_names, listed(loaded)


def test_nested_class_folders_label_by_the_first_folder(tmp_path: Path, hf_cache: Path) -> None:
    # Before: loaded gave classes ['2019', 'cat'] (imagefolder labels by the parent folder) and the
    # stream ignored the nested images.
    root = tmp_path / "pets"
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            save_image(root / "train" / cls / "2019" / f"{i}.png", "RGB", (6, 5))
        save_image(root / "test" / cls / "0.png", "L", (6, 5))
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("test", {"cat": 1, "dog": 1})):
        names, items = both_modes(root, split)
        assert names == ["cat", "dog"]
        assert all(class_of(path, root, split) == names[label] for path, label in items)
        assert Counter(names[label] for _, label in items) == counts
    loaded, _ = load_split(str(root), "train")
    assert sorted(loaded[i][1] for i in range(len(loaded))) == [0, 0, 0, 1, 1]  # the items, decoded


def test_images_at_any_depth_in_sorted_order_and_other_files_ignored(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "deep"
    rel = ["cat/a/b/c/d/1.png", "cat/a/b/2.JPEG", "cat/z.Png", "dog/0.jpg", "dog/x/y/1.PNG"]
    for r in rel:
        save_image(root / "train" / r, "RGB", (5, 4))
    save_image(root / "test" / "dog" / "deeper" / "still" / "0.png", "RGB", (5, 4))
    (root / "train" / "cat" / "a" / "notes.txt").write_text("not an image")
    # A metadata.csv (imagefolder would read its labels) changes nothing: the folders decide.
    for folder in (root, root / "train", root / "train" / "cat"):
        (folder / "metadata.csv").write_text("file_name,label\ncat/z.Png,dog\n")
    names, items = both_modes(root, "train")
    assert names == ["cat", "dog"]
    assert items == [(str(root / "train" / r), 0 if r.startswith("cat") else 1) for r in sorted(rel)]
    _, test_items = both_modes(root, "test")
    assert test_items == [(str(root / "test" / "dog" / "deeper" / "still" / "0.png"), 1)]


def test_an_empty_or_missing_class_folder_in_test_is_fine(tmp_path: Path, hf_cache: Path) -> None:
    root = make_folder(tmp_path / "zoo", {"train": {"cat": 1, "dog": 1, "emu": 1}, "test": {"cat": 2}})
    (root / "test" / "dog" / "empty").mkdir(parents=True)  # no images: dog has no test images; emu no folder
    names, items = both_modes(root, "test")
    assert names == ["cat", "dog", "emu"] and [label for _, label in items] == [0, 0]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_class_only_in_test_is_a_usage_error(tmp_path: Path, split: str, streaming: bool) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 1, "dog": 1}, "test": {"bird": 1, "cat": 1}})
    with pytest.raises(UsageError) as excinfo:  # the train split too: a run fails before it trains
        load_split(str(root), split, streaming=streaming)
    assert_usage_error(excinfo, "class folder 'test/bird' has no counterpart in train/ (train classes: cat, dog)",
                       "add train/bird/ with images or remove test/bird/")


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_class_folder_in_train_is_a_usage_error(tmp_path: Path, split: str, streaming: bool) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    (root / "train" / "emu" / "2019").mkdir(parents=True)
    (root / "train" / "emu" / "2019" / "notes.txt").write_text("images to come")
    save_image(root / "train" / "emu" / ".hidden" / "0.png", "RGB", (5, 4))  # not read: still empty
    with pytest.raises(UsageError) as excinfo:
        load_split(str(root), split, streaming=streaming)
    assert_usage_error(excinfo, "class folder 'train/emu'", "no images at any depth", "remove train/emu/")


@pytest.mark.parametrize("streaming", [False, True])
def test_an_image_directly_in_a_split_folder_is_a_usage_error(tmp_path: Path, streaming: bool) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    save_image(root / "train" / "stray.png", "RGB", (5, 4))
    with pytest.raises(UsageError) as excinfo:
        load_split(str(root), "train", streaming=streaming)
    assert_usage_error(excinfo, "directly in 'train/'", "'train/stray.png'", "move each into train/<class>/")


def test_hidden_entries_and_run_directories_are_not_read(tmp_path: Path, hf_cache: Path, capfd) -> None:
    root = make_folder(tmp_path / "pets", {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    cat = root / "train" / "cat"
    save_image(cat / ".ipynb_checkpoints" / "0.png", "RGB", (5, 4))
    save_image(cat / "._0.png", "RGB", (5, 4))  # a macOS resource fork beside 0.png
    run = cat / "run"  # --output-dir pointed into the data: what pretraining wrote, plus an image
    save_image(run / "samples" / "0.png", "RGB", (5, 4))
    (run / "config.json").write_text("{}")
    save_image(root / "train" / "probe" / "0.png", "RGB", (5, 4))  # a run directory where a class would be
    (root / "train" / "probe" / "metrics.jsonl").write_text("")
    (root / "train" / ".trash" / "bird").mkdir(parents=True)
    capfd.readouterr()
    names, items = both_modes(root, "train")
    assert names == ["cat", "dog"] and len(items) == 3
    relative = sorted(str(Path(path).relative_to(root / "train")) for path, _ in items)
    assert relative == ["cat/0.png", "cat/1.png", "dog/0.png"]
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, warnings  # one line per listing: loaded, then streamed
    assert all("'train/cat/run'" in w and "'train/probe'" in w and "config.json" in w for w in warnings)


def test_linked_folders_are_followed_but_walked_once(tmp_path: Path, hf_cache: Path) -> None:
    elsewhere = make_folder(tmp_path / "elsewhere", {"train": {"dog": 2}})
    root = make_folder(tmp_path / "pets", {"train": {"cat": 1}, "test": {"cat": 1}})
    (root / "train" / "dog").symlink_to(elsewhere / "train" / "dog")  # a linked class folder is read
    (root / "train" / "cat" / "up").symlink_to(root / "train")  # a loop: would read dog as cat, ~40 times
    names, items = both_modes(root, "train")
    assert names == ["cat", "dog"] and [label for _, label in items] == [0, 1, 1]


@pytest.fixture
def nested_folder(tmp_path: Path) -> Path:
    """train/{cat,dog}/2019/*.png and test/{cat,dog}/*.png: 8 px noise images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "nested"
    for split, folder, n in (("train", "2019", 8), ("test", "", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / folder / f"{i}.png")
    return root


PRETRAIN = ["scripts/pretrain_supervised.py", "--max-steps", "2", "--batch-size", "8", "--num-workers", "0",
            "--log-every", "1", "--warmup-steps", "1"]


def test_a_run_on_a_nested_folder_trains_on_its_class_folders(nested_folder: Path, tmp_path: Path, hf_cache) -> None:
    done = run_script(*PRETRAIN, "--dataset", str(nested_folder), "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["class_names"] == ["cat", "dog"] and config["data"]["num_classes"] == 2


def test_a_run_on_a_folder_with_a_test_only_class_stops_with_one_line(nested_folder: Path, tmp_path: Path,
                                                                       hf_cache) -> None:
    save_image(nested_folder / "test" / "bird" / "0.png", "RGB", (8, 8))
    done = run_script(*PRETRAIN, "--dataset", str(nested_folder), "--output-dir", str(tmp_path / "run"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "'test/bird' has no counterpart in train/" in errors[0], done.stderr[-2000:]


def test_hub_format_columns_and_unlabelled_test_split(tmp_path: Path, hf_cache: Path) -> None:
    """`hf:` on a local copy in the hub's parquet layout: the same code path as a downloaded dataset."""
    import datasets

    features = datasets.Features(
        {"note": datasets.Value("string"), "img": datasets.Image(),
         "fine_label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    for split, labels in {"train": [0, 1, 2, 2], "test": [-1, -1], "validation": [2, 0, 1]}.items():
        rows = {"note": ["x"] * len(labels), "img": [Image.new("L", (6, 4), 50)] * len(labels), "fine_label": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet")
    spec = f"hf:{tmp_path / 'hub'}"
    train, info = load_split(spec, "train")
    assert len(train) == 4 and info.class_names == ["a", "b", "c"] and info.num_classes == 3
    image, label = train[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 6) and label == 2
    test, _ = load_split(spec, "test")  # test's labels are all -1: use validation instead
    assert [test[i][1] for i in range(len(test))] == [2, 0, 1]
    stream, _ = build_dataset(spec, "test", 8, train=False, streaming=True)
    assert [label for _, label in stream] == [2, 0, 1]


# ---- errors


def test_missing_or_malformed_folders_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_split(str(tmp_path / "nowhere"), "train")
    assert_usage_error(excinfo, "does not exist", "--dataset digits", "hf:NAME")
    with pytest.raises(UsageError) as excinfo:
        load_split("./no/such/folder", "train")
    assert_usage_error(excinfo, "'./no/such/folder' does not exist")

    (tmp_path / "flat" / "images").mkdir(parents=True)  # no train/: read whole, unlabelled, and it holds nothing
    with pytest.raises(UsageError) as excinfo:
        load_split(str(tmp_path / "flat"), "train")
    assert_usage_error(excinfo, "no images found in", "at any depth")

    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError) as excinfo:
        load_split(str(tmp_path / "empty"), "train")
    assert_usage_error(excinfo, "no images found", "subfolder")


def test_folder_without_test_split_is_a_usage_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "only-train", {"train": {"cat": 1, "dog": 1}})
    (root / "extra").mkdir()
    with pytest.raises(UsageError) as excinfo:
        load_split(str(root), "test")
    assert_usage_error(excinfo, "no test split", "extra/, train/", "val/<class>/<image>")


def test_unknown_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as excinfo:
        load_split("dgits", "train")
    assert_usage_error(excinfo, "unknown dataset 'dgits'", "digits", "train/<class>/<image>", "hf:NAME")
    with pytest.raises(UsageError) as excinfo:
        load_split("hf:", "train")
    assert_usage_error(excinfo, "hf:NAME")
    with pytest.raises(ValueError):
        load_split("digits", "validation")


def test_unknown_hub_dataset_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # The flag is read at import time, so set the imported copies as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as excinfo:
        load_split("hf:no-such-user/no-such-dataset", "train")
    assert_usage_error(excinfo, "could not load hub dataset 'no-such-user/no-such-dataset'", "network",
                       "local image folder")


# ---- real data (skipped without ../shared/data)


def test_cifar10_slice_builds_with_class_names(cifar10_slice: Path, hf_cache: Path) -> None:
    train, info = build_dataset(str(cifar10_slice), "train", 32, train=True)
    assert len(train) == 200 and info.num_classes == 10 and info.class_names == CIFAR10_CLASSES
    images, labels = next(iter(DataLoader(train, batch_size=200)))
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1  # real, varied pixels
    assert Counter(labels.tolist()) == {c: 20 for c in range(10)}
    test, test_info = build_dataset(str(cifar10_slice), "test", 32, train=False)
    assert len(test) == 100 and test_info.class_names == CIFAR10_CLASSES


def test_imagenette_slice_falls_back_to_val(imagenette_slice: Path, hf_cache: Path) -> None:
    test, info = load_split(str(imagenette_slice), "test")  # .JPEG files under val/<wnid>/
    assert len(test) == 20 and info.num_classes == 10 and info.class_names[0] == "n01440764"
    image, label = test[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128) and label in range(10)


# ---- unreadable images


def folder_with_bad_images(root: Path, bad: dict[str, bytes]) -> Path:
    """make_folder's 4 cats and 2 dogs, plus files that are not readable images, in train/cat/."""
    make_folder(root, {"train": {"cat": 4, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    good = (root / "train" / "cat" / "2.jpg").read_bytes()
    for name, data in bad.items():
        (root / "train" / "cat" / name).write_bytes(data if data != b"HALF" else good[: len(good) // 2])
    return root


BAD_FILES = {"empty.png": b"", "text.jpg": b"not an image at all", "torn.jpg": b"HALF"}


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_with_a_warning_and_counted(tmp_path, hf_cache, capfd, workers):
    root = folder_with_bad_images(tmp_path / "pets", BAD_FILES)
    dataset, _ = build_dataset(str(root), "train", 8, train=False)
    assert len(dataset) == 9  # listed: nothing is read before it is needed
    labels = [int(y) for _, ys in DataLoader(dataset, batch_size=3, num_workers=workers) for y in ys]
    assert len(labels) == 9  # each unreadable file replaced by the next readable image
    assert dataset.skipped_images() == 3  # counted across the worker processes too
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 3 and all("--strict-images" in w for w in warnings)
    assert {name for name in BAD_FILES if any(name in w for w in warnings)} == set(BAD_FILES)


def test_a_stream_warns_about_an_unreadable_image_once_and_counts_it_once(tmp_path, hf_cache, capfd):
    # A stream has no index to mark: each process remembers the names it skipped, so a second epoch
    # over the same shards neither warns nor counts the same images again (as the map-style set).
    root = folder_with_bad_images(tmp_path / "pets", BAD_FILES)
    stream, _ = build_dataset(str(root), "train", 8, train=False, streaming=True, shuffle_buffer=4, seed=0)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        assert len([y for _, y in stream]) == 6  # the 6 readable images: the 3 others are skipped
    assert stream.skipped_images() == 3
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 3 and {name for name in BAD_FILES if any(name in w for w in warnings)} == set(BAD_FILES)


def _read_into(dataset, index: int, out) -> None:
    out.put(dataset.raw(index)[1])


def test_an_unreadable_image_another_worker_met_first_is_neither_warned_nor_counted_again(tmp_path, hf_cache, capfd,
                                                                                          monkeypatch):
    # Two workers meet one bad file at once when one reads it and the other falls back on it: the
    # one that marks it first reports it, the other passes on to the next image in silence.
    root = folder_with_bad_images(tmp_path / "pets", {"torn.jpg": b"HALF"})
    dataset, _ = build_dataset(str(root), "train", 8, train=False)
    bad = next(i for i in range(len(dataset)) if "torn" in str(dataset.table[i]["image"]["path"]))
    context = multiprocessing.get_context("spawn")  # pickled like a spawned loader worker, lock included
    out = context.Queue()
    worker = context.Process(target=_read_into, args=(dataset, bad, out))
    worker.start()
    label = out.get(timeout=60)
    worker.join(timeout=60)
    assert worker.exitcode == 0 and dataset.skipped_images() == 1  # the worker's mark is seen here
    capfd.readouterr()
    assert dataset.raw(bad)[1] == label and "warning" not in capfd.readouterr().err

    # The race itself: the mark appears while this process decodes the file.
    dataset.unreadable[bad] = False
    decode = mpp.data.table_readers.open_image

    def decode_while_another_worker_marks(cell):
        if "torn" not in cell["path"]:
            return decode(cell)
        dataset.unreadable[bad] = True
        raise OSError("truncated")
    monkeypatch.setattr(mpp.data.table_readers, "open_image", decode_while_another_worker_marks)
    dataset.raw(bad)
    assert dataset.skipped_images() == 1 and "warning" not in capfd.readouterr().err
    assert copy.deepcopy(dataset).skipped_images() == 1  # a copy in this process gets a lock of its own


def test_unreadable_images_are_dropped_from_a_stream(tmp_path, hf_cache, capfd):
    root = folder_with_bad_images(tmp_path / "pets", BAD_FILES)
    stream, _ = load_split(str(root), "train", streaming=True)
    assert len(list(stream)) == 6 and stream.skipped_images() == 3


def test_strict_images_stop_at_the_first_unreadable_one(tmp_path, hf_cache):
    root = folder_with_bad_images(tmp_path / "pets", {"torn.jpg": b"HALF"})
    dataset, _ = build_dataset(str(root), "train", 8, train=False, strict=True)
    with pytest.raises(UsageError, match=r"image '.*torn\.jpg' cannot be read .*drop --strict-images"):
        [dataset[i] for i in range(len(dataset))]
    # Raised in a DataLoader worker, PyTorch wraps it in the worker's traceback; the CLI shows one line.
    with pytest.raises(UsageError) as caught:
        list(DataLoader(dataset, batch_size=9, num_workers=1))
    assert "\n" in str(caught.value)
    assert one_line(caught.value).startswith("image '") and "\n" not in one_line(caught.value)


def test_a_split_of_only_unreadable_images_is_an_error_not_a_hang(tmp_path, hf_cache):
    root = tmp_path / "broken"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "0.png").write_bytes(b"junk")
    dataset, _ = load_split(str(root), "train")
    with pytest.raises(UsageError, match="no image of the dataset can be read"):
        dataset[0]
