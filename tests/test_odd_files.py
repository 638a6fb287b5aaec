"""Image folders holding what a folder scan meets on real disks, loaded and streamed: images of 32-bit
float or wide integer pixels (decoded black before), links that loop and names that are not UTF-8
(tracebacks before), and a class folder holding another class's images through a link (two labels
for one image, without a word, before)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import run_script
from PIL import Image

from eval import knn
from mpp.core.errors import UsageError
from mpp.data.decode import rgb_tensor
from mpp.data.sources import load_split

WIDE_MODES = ("F", "I;16", "I")


def wide_image(values: np.ndarray, mode: str) -> Image.Image:
    """Grey levels `values` in [0, 1] as a file in a wide pixel mode would hold them: F as they are, I;16
    holding 8-bit values (saved wider, as astype(np.uint16) does), I (int32) holding 16-bit values."""
    if mode == "F":
        return Image.fromarray(values.astype(np.float32))
    if mode == "I;16":
        return Image.fromarray(np.rint(values * 255).astype(np.uint16))
    return Image.fromarray(np.rint(values * 65535).astype(np.int32))


def odd_folder(root: Path) -> dict[str, np.ndarray]:
    """train/ and test/ of two classes, dark and bright, every image a TIFF in a wide mode; plus a link
    to itself, a link to its class folder's parent and an image whose name is not UTF-8. Returns the
    grey levels in [0, 1] of each image meant to be read, by path."""
    rng, levels = np.random.default_rng(0), {}
    for split, n in (("train", 6), ("test", 3)):
        for cls, level in (("dark", 0.2), ("bright", 0.8)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                values = np.clip(level + rng.uniform(-0.15, 0.15, (8, 8)), 0, 1)
                path = root / split / cls / f"{i}.tif"
                wide_image(values, WIDE_MODES[i % 3]).save(path)
                assert Image.open(path).mode == WIDE_MODES[i % 3]
                levels[str(path)] = values
    os.symlink("loop", root / "train" / "dark" / "loop")  # ln -s loop train/dark/loop
    os.symlink("..", root / "train" / "bright" / "up")  # to its class folder's parent: the classes again
    latin1 = os.fsencode(root / "train" / "dark") + b"/caf\xe9.tif"  # a name from a Latin-1 disk
    shutil.copyfile(root / "train" / "dark" / "0.tif", os.fsdecode(latin1))
    return levels


def items(root: Path, split: str, streaming: bool) -> list:
    dataset, _ = load_split(str(root), split, streaming=streaming)
    return list(dataset) if streaming else [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("streaming", [False, True])
def test_wide_pixel_modes_decode_by_their_range_and_odd_entries_are_passed_over_with_a_warning(
        tmp_path, hf_cache, capfd, streaming):
    levels = odd_folder(tmp_path / "tiffs")
    for split in ("train", "test"):
        capfd.readouterr()
        found = items(tmp_path / "tiffs", split, streaming)
        expected = sorted((int("dark" in p), v.mean()) for p, v in levels.items() if f"/{split}/" in p)
        assert len(found) == len(expected)  # each image once: no loop read twice, the Latin-1 name not read
        # Each image's level within a byte of its own: 8-bit values by 255, 16-bit by their top byte.
        decoded = sorted((label, image.double().mean().item() / 255) for image, label in found)
        assert [label for label, _ in decoded] == [label for label, _ in expected]
        assert np.allclose([m for _, m in decoded], [m for _, m in expected], atol=1.5 / 255)
        if split == "train":  # a test listing looks into train/ only as far as each class's first image
            warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
            assert len(warnings) == 2, warnings  # one line per kind
            assert "'train/bright/up', 'train/dark/loop' in dataset folder" in warnings[0], warnings
            assert "a link that loops" in warnings[0], warnings
            assert r"'train/dark/caf\xe9.tif'" in warnings[1] and "not UTF-8" in warnings[1], warnings


@pytest.mark.parametrize("image, expected", [
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # float in [0, 1]: times 255
    (np.array([[0.0, 100.5, 255.0]], np.float32), [0, 100, 255]),  # float in [0, 255] (PIL's convert("F")): as is
    (np.array([[-1.0, 0.0, 1.0]], np.float32), [0, 128, 255]),  # beyond both: stretched from min to max
    (np.array([[0, 7, 255]], np.uint16), [0, 7, 255]),  # 8-bit values in a 16-bit file: as is
    (np.array([[0, 40000, 65535]], np.uint16), [0, 156, 255]),  # 16-bit: the top byte
    (np.array([[-300, 0, 300]], np.int32), [0, 128, 255]),  # negative counts: stretched
    (np.array([[0, 10**6, 2 * 10**6]], np.int32), [0, 128, 255]),  # beyond 16 bits: stretched
    (np.full((1, 3), -5.0, np.float32), [0, 0, 0]),  # constant beyond 0..255: no range to show
    (np.full((1, 3, 3), 0.5, np.float64), [128, 128, 128]),  # an array column of floats
])
def test_wide_pixels_scale_by_their_range(image, expected):
    source = image if image.ndim == 3 else Image.fromarray(image)
    assert rgb_tensor(source)[0, 0].tolist() == expected


def test_an_image_of_nan_pixels_is_unreadable_not_black(tmp_path, hf_cache, capfd):
    root = tmp_path / "nan"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        wide_image(np.full((4, 4), 0.5), "F").save(root / "train" / cls / "0.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(root / "train" / "a" / "1.tif")
    capfd.readouterr()
    assert [label for _, label in items(root, "train", streaming=True)] == [0, 1]
    assert "skipping unreadable image" in capfd.readouterr().err
    with pytest.raises(UsageError, match="cannot be read .the image holds NaN or infinite pixel values"):
        load_split(str(root), "train", strict=True)[0].raw(1)


def two_classes(root: Path) -> Path:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (4, 4), 9).save(root / split / cls / "0.png")
    return root


LINKS = {  # a link that gives cat's images to dog as well, and what the one line says it is
    "dog is cat": ("train/dog", "cat", "'train/dog' and 'train/cat' are one folder, through a link"),
    "a subfolder": ("train/dog/more", "../cat", "'train/dog/more' and 'train/cat' are one folder, through a link"),
    "an image": ("train/dog/1.png", "../cat/0.png", "'train/dog/1.png' is a link to 'train/cat/0.png'"),
    "in test/": ("test/dog", "cat", "'test/dog' and 'test/cat' are one folder, through a link"),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("link", LINKS)
def test_a_class_folder_holding_another_class_through_a_link_is_refused(tmp_path, link, streaming):
    root = two_classes(tmp_path / "pets")
    where, target, how = LINKS[link]
    if where.endswith("dog"):
        shutil.rmtree(root / where)
    os.symlink(target, root / where)
    split = where.split("/")[0]
    with pytest.raises(UsageError) as refused:
        load_split(str(root), split, streaming=streaming)
    message = str(refused.value)
    assert "\n" not in message and message == (
        f"class folders '{split}/cat' and '{split}/dog' of '{root}' hold the same images ({how}), so each would "
        f"get both labels: remove the link (an image has one class: the first folder under {split}/)")


def test_links_elsewhere_and_within_a_class_are_still_read(tmp_path, hf_cache):
    root = two_classes(tmp_path / "pets")
    os.symlink("0.png", root / "train" / "cat" / "again.png")  # within its class: read, as before
    elsewhere = two_classes(tmp_path / "other")
    os.symlink(elsewhere / "train" / "dog", root / "train" / "dog" / "more")  # another dataset's folder
    for streaming in (False, True):
        assert sorted(label for _, label in items(root, "train", streaming)) == [0, 0, 1, 1]


def test_the_command_lines_read_odd_folders_and_refuse_two_labels(tmp_path, hf_cache, capsys):
    """Loaded (a probe) and streamed (a pretraining run): the images are their grey levels, not black; the
    links and the Latin-1 name are warned about; a class link stops the probe in one line."""
    root = tmp_path / "tiffs"
    odd_folder(root)
    out = tmp_path / "knn.json"
    probed = run_script("eval/knn.py", "--model", "Micro/4", "--random-init", "--image-size", "8", "--dataset",
                        str(root), "--k", "1", "--output", str(out), timeout=120)
    assert probed.returncode == 0 and "Traceback" not in probed.stderr, probed.stderr[-2000:]
    # Dark and bright differ only in level: the raw pixels tell them apart, unless decoded black (50%).
    assert json.loads(out.read_text())["references"]["pixels"]["results"]["1"]["accuracy"] == 1.0
    for done in (probed, run_script("scripts/pretrain_mpp.py", "--dataset", str(root), "--streaming", "--model",
                                    "Micro/4", "--image-size", "8", "--batch-size", "4", "--num-workers", "0",
                                    "--max-steps", "2", "--warmup-steps", "1", "--output-dir", str(tmp_path / "run"),
                                    timeout=120)):
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "a link that loops" in done.stderr and "not UTF-8" in done.stderr
    os.symlink(root / "train" / "dark", root / "train" / "darker")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        knn.main(["--model", "Micro/4", "--random-init", "--dataset", str(root), "--output", str(tmp_path / "x.json")])
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert stopped.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: class folders 'train/dark' and 'train/darker'")
    assert not (tmp_path / "x.json").exists()


def test_an_unreadable_subfolder_is_one_line(tmp_path, monkeypatch):
    # chmod 000 does not stop root (CI runs as root), so the refusal is made by os.scandir itself.
    import mpp.data.folder_walk

    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat" / "locked").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "0.png")
    scandir = os.scandir

    def refusing(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(mpp.data.folder_walk.os, "scandir", refusing)
    with pytest.raises(UsageError, match=r"cannot read the dataset's folder '.*locked' \(Permission denied\)"):
        load_split(str(tmp_path / "data"), "train")
