"""Unlabelled data: every source that can be unlabelled (a flat folder, nested folders, a train/-only
folder, an image-only Hugging Face dataset saved to disk, tar shards without cls members), loaded
and streamed, through the data layer and through the command line: MPP trains on each with the
in-run probe on a labelled set and resumes bitwise, its held-out split is carved from the training
images, and whatever needs labels refuses each in one line, writing nothing."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers.refusals import label_needing, run_in_process
from helpers.runs import ENV, REPO, final_weights, run_script, threads_kept
from helpers.shard_files import png

from mpp.core.errors import UsageError
from mpp.data.folders import folder_listing
from mpp.data.holdout import pretraining_splits
from mpp.data.labels import NO_LABEL
from mpp.data.shards import write_shards
from mpp.data.sources import load_split
from mpp.data.table_readers import image_identity
from mpp.run.rundir import check_resume, check_run_dir
from mpp.train.pretrain import TrainConfig, main

IMAGES = 48  # per source: a tenth (4) is held out, 44 train, 5 steps of 8 per epoch
SOURCES = ("flat", "nested", "train-only", "hf-disk", "shards")


# 6 steps of 8 images cross an epoch of 44; the probe (on a labelled folder) at steps 0 and 6.
TINY = ["--model", "Micro/4", "--image-size", "8", "--batch-size", "8", "--num-workers", "0", "--log-every", "3",
        "--warmup-steps", "2", "--max-steps", "6", "--shuffle-buffer", "16", "--save-every", "100"]


def noise(rng) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Each unlabelled source as a --dataset spec, 48 distinct 8×8 images each."""
    root, rng = tmp_path_factory.mktemp("unlabelled"), np.random.default_rng(0)
    specs = {}
    flat = root / "flat"
    flat.mkdir()
    for i in range(IMAGES):
        noise(rng).save(flat / f"{i:03d}.png")
    specs["flat"] = str(flat)
    nested = root / "nested"  # images at three depths, with folder names that are not classes
    for i in range(IMAGES):
        folder = nested / ("" if i < 16 else "2019" if i < 32 else "2020/trip")
        folder.mkdir(parents=True, exist_ok=True)
        noise(rng).save(folder / f"{i:03d}.jpg")
    (nested / "notes.txt").write_text("not an image")
    (nested / ".hidden").mkdir()
    noise(rng).save(nested / ".hidden" / "skipped.png")  # hidden: never read
    specs["nested"] = str(nested)
    only = root / "train-only" / "train"
    only.mkdir(parents=True)
    for i in range(IMAGES):
        noise(rng).save(only / f"{i:03d}.png")
    specs["train-only"] = str(root / "train-only")
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [noise(rng) for _ in range(IMAGES)]}, features=features).save_to_disk(
        str(root / "hf-disk"))
    specs["hf-disk"] = f"hf:{root / 'hf-disk'}"
    write_shards(((png(rng), "png", None) for _ in range(IMAGES)), root / "shards", "train", per_shard=16)
    specs["shards"] = f"shards:{root / 'shards'}"
    return specs


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """A tiny labelled folder for the in-run probe: 2 classes × 25 training images, 3 test images each."""
    root, rng = tmp_path_factory.mktemp("labelled") / "pets", np.random.default_rng(1)
    for split, n in (("train", 25), ("test", 3)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                noise(rng).save(root / split / c / f"{i}.png")
    return str(root)


# ---------------------------------------------------------------- the data layer

@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_reads_unlabelled(sources, hf_cache, source, streaming):
    data, info = load_split(sources[source], "train", streaming=streaming)
    items = list(data)
    assert not info.labelled and info.class_names is None and info.num_classes == 0 and info.layout
    assert len(items) == IMAGES and {label for _, label in items} == {NO_LABEL}
    assert all(image.shape == (3, 8, 8) and image.dtype == torch.uint8 for image, _ in items)
    if not streaming:
        with pytest.raises(UsageError, match="has no labels"):
            data.labels()


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("source", SOURCES)
def test_the_held_out_split_is_a_fixed_tenth_never_trained_on(sources, hf_cache, source, streaming):
    def identities(splits) -> tuple[set, set]:
        if streaming:  # the rows as they come, undecoded: what the training stream reads and what it skips
            train = {image_identity(r[splits.train.image_column]) for r in splits.train.undecoded_rows()}
            held = {image_identity(r[splits.eval.image_column]) for r in splits.eval.table}
        else:  # both are subsets of one base set
            train, held = set(splits.train.indices.tolist()), set(splits.eval.indices.tolist())
        return train, held

    splits = pretraining_splits(sources[source], 8, holdout_images=1000, streaming=streaming, shuffle_buffer=16, seed=3)
    train, held = identities(splits)
    assert len(held) == len(splits.eval) == IMAGES // 10 and len(train) == IMAGES - len(held) and not train & held
    assert splits.holdout["images"] == IMAGES // 10 and "has no test split" in splits.holdout["why"]
    # The carve depends on the data alone: not on the run's seed, the global generators or the process.
    torch.manual_seed(123)
    np.random.seed(123)
    again = pretraining_splits(sources[source], 8, holdout_images=1000, streaming=streaming, shuffle_buffer=16, seed=9)
    assert identities(again) == (train, held) and again.holdout == splits.holdout
    fewer = pretraining_splits(sources[source], 8, holdout_images=2, streaming=streaming, shuffle_buffer=16)
    assert len(fewer.eval) == 2
    # More than a tenth asked: a tenth of the images (a stream is counted on to know it has fewer than 10 × 10)
    tenth = pretraining_splits(sources[source], 8, holdout_images=10, streaming=streaming, shuffle_buffer=16)
    assert len(tenth.eval) == IMAGES // 10 and tenth.holdout["of"] == IMAGES


def test_a_labelled_folder_keeps_its_classes_and_labels(tmp_path):
    """The classes layout reads as it always has: an image's class is the first folder under train/, at
    any depth, checked against an independent walk of the folder."""
    rng = np.random.default_rng(0)
    for path in ("train/cat/a.png", "train/cat/2019/b.png", "train/dog/c.png", "train/dog/x/y/d.png", "test/dog/e.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        noise(rng).save(tmp_path / path)
    listing = folder_listing(tmp_path, str(tmp_path), "train")
    walked = sorted((Path(d).relative_to(tmp_path / "train").parts[0], os.path.join(d, f))
                    for d, _, files in os.walk(tmp_path / "train") for f in files)
    assert listing.layout == "classes" and listing.class_names == ["cat", "dog"]
    assert list(zip(listing.labels, listing.paths, strict=True)) == [(["cat", "dog"].index(c), p) for c, p in walked]
    _, info = load_split(str(tmp_path), "test")
    assert info.labelled and info.class_names == ["cat", "dog"]


def test_ambiguous_layouts_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for path in ("mixed/train/a.png", "mixed/train/cat/b.png", "split/train/a.png", "split/test/cat/b.png",
                 "valonly/val/a.png", "valonly/more/b.png", "caps/Train/cat/a.png", "caps/Test/cat/b.png",
                 "coco/train2017/a.png", "coco/val2017/b.png", "emptytest/train/a.png", "emptytest/test/notes.txt",
                 "emptyclasses/train/cat/a.png", "emptyclasses/val/cat/notes.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        noise(rng).save(tmp_path / path) if path.endswith(".png") else (tmp_path / path).write_text("x")
    for folder, needle in (("mixed", "beside its subfolders"), ("split", "lay every split out the same"),
                           ("valonly", "has val/ but no train/"), ("caps", "'Test/', 'Train/', named like split"),
                           ("coco", "'train2017/', 'val2017/', named like split"),
                           ("emptytest", "test split 'test/' of .* holds no images: put its images in it, or remove"),
                           ("emptyclasses", "test split 'val/' of .* holds no images")):
        with pytest.raises(UsageError, match=needle) as e:
            load_split(str(tmp_path / folder), "test" if folder in ("split", "emptytest", "emptyclasses") else "train")
        assert "\n" not in str(e.value)


def test_what_lies_beside_the_split_folders_is_named_not_read(tmp_path, capfd):
    """An STL-10-like folder: train/ and test/ with classes, an unlabeled/ folder and loose images beside them."""
    rng = np.random.default_rng(0)
    for path in ("train/a/0.png", "train/b/1.png", "test/a/2.png", "unlabeled/3.png", "4.png", "notes.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        noise(rng).save(tmp_path / path) if path.endswith(".png") else (tmp_path / path).write_text("x")
    data, info = load_split(str(tmp_path), "train")
    assert info.class_names == ["a", "b"] and len(data) == 2
    warned = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: not reading '4.png', 'unlabeled/' in dataset folder '{tmp_path}': only its split "
                      "folders (test/, train/) are read"]


def test_an_unreadable_images_stand_in_comes_from_its_own_side_of_the_carve(tmp_path, capfd):
    rng = np.random.default_rng(0)
    for i in range(20):
        noise(rng).save(tmp_path / f"{i:02d}.png")
    held = pretraining_splits(str(tmp_path), 8, holdout_images=2).eval.indices.tolist()  # 2 of 20
    # One unreadable image on each side, each just before an image of the other side: the next image
    # of the whole folder would cross the carve.
    held_index = next(h for h in held if h + 1 < 20 and h + 1 not in held)
    train_index = next(h - 1 for h in held if h >= 1 and h - 1 not in held)
    for i in (held_index, train_index):
        (tmp_path / f"{i:02d}.png").write_bytes(b"not an image")
    splits = pretraining_splits(str(tmp_path), 8, holdout_images=2)
    held_images = [splits.eval.raw(i)[0] for i in range(len(splits.eval))]  # the readable held image, twice
    assert all(torch.equal(image, held_images[1]) for image in held_images)
    for j in range(len(splits.train)):
        assert not any(torch.equal(splits.train.raw(j)[0], image) for image in held_images), j
    assert splits.train.skipped_images() == 2 and "skipping unreadable image" in capfd.readouterr().err


def test_shards_say_their_labels_with_one_voice(tmp_path, hf_cache):
    rng = np.random.default_rng(0)
    write_shards(((png(rng), "png", None) for _ in range(4)), tmp_path / "a", "train", per_shard=2)
    (tmp_path / "a" / "classes.txt").write_text("x\ny\n")
    with pytest.raises(UsageError, match="have no cls members, yet classes are listed"):
        load_split(f"shards:{tmp_path / 'a'}", "train")
    write_shards(((png(rng), "png", None) for _ in range(2)), tmp_path / "b", "train", per_shard=2)
    write_shards(((png(rng), "png", 0) for _ in range(2)), tmp_path / "c", "train", per_shard=2)
    (tmp_path / "c" / "train-000000.tar").rename(tmp_path / "b" / "train-000001.tar")
    with pytest.raises(UsageError, match="disagree"):
        load_split(f"shards:{tmp_path / 'b'}", "train")


def test_make_shards_writes_an_unlabelled_folder_as_label_less_shards(sources, hf_cache, tmp_path):
    done = run_script("scripts/make_shards.py", sources["nested"], str(tmp_path / "shards"), "--per-shard", "20")
    assert done.returncode == 0 and "unlabelled (no cls members)" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"train-00000{i}.tar" for i in range(3)]
    data, info = load_split(f"shards:{tmp_path / 'shards'}", "train")
    folder, _ = load_split(sources["nested"], "train")
    assert not info.labelled and len(data) == len(folder) == IMAGES
    assert sorted(x.sum().item() for x, _ in data) == sorted(x.sum().item() for x, _ in folder)  # the same images


@pytest.mark.parametrize("source", ["nested", "hf-disk"])
def test_a_run_inside_an_unlabelled_folder_is_refused(sources, source):
    folder = Path(sources[source].removeprefix("hf:"))
    config = TrainConfig(dataset=sources[source], output_dir=str(folder / "runs" / "x"))
    with pytest.raises(UsageError, match="inside the dataset folder"):
        check_run_dir(config)
    assert not (folder / "runs").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_too_few_images_to_hold_out_a_tenth_is_one_line(tmp_path, hf_cache, streaming):
    rng = np.random.default_rng(0)
    for i in range(5):
        noise(rng).save(tmp_path / f"{i}.png")
    with pytest.raises(UsageError, match="too few") as e:
        pretraining_splits(str(tmp_path), 8, holdout_images=1000, streaming=streaming, shuffle_buffer=16)
    assert "\n" not in str(e.value) and "has no test split" in str(e.value)


@pytest.mark.parametrize("change", ["added", "swapped"])
def test_a_resume_on_a_folder_that_changed_is_refused(tmp_path, capsys, change):
    """Other held-out images (more images, or the same count with the held ones replaced): resuming
    would train on images the run evaluated on."""
    rng, folder = np.random.default_rng(0), tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        noise(rng).save(folder / f"{i:03d}.png")
    held = pretraining_splits(str(folder), 8, holdout_images=1000).eval.indices.tolist()
    args = ["--dataset", str(folder), *TINY, "--max-steps", "2", "--output-dir", str(tmp_path / "run")]
    with threads_kept():
        main("mpp", args)
        if change == "swapped":  # as many images as before: the same count and rule, other held-out images
            for i in held:
                (folder / f"{i:03d}.png").unlink()
        for i in range(40, 60 if change == "added" else 40 + len(held)):
            noise(rng).save(folder / f"{i:03d}.png")
        before = {f: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()}
        with pytest.raises(SystemExit) as e:
            main("mpp", [*args, "--max-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "(the dataset changed)" in err and "4 of the 40 training images" in err
    assert {f: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_training_set_smaller_than_one_batch_is_refused_before_anything_is_written(tmp_path, capsys, streaming):
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(12):  # 1 held out, 11 to train on: a stream knows it, having counted them for the carve
        noise(rng).save(tmp_path / "photos" / f"{i}.png")
    with threads_kept(), pytest.raises(SystemExit) as e:
        main("mpp", ["--dataset", str(tmp_path / "photos"), *TINY, "--batch-size", "16", "--output-dir",
                     str(tmp_path / "run"), *(["--streaming"] if streaming else [])])
    assert e.value.code == 2
    assert "the training set (11 images) is smaller than one batch (16)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_streamed_resume_keeps_its_loader_workers():
    """A stream's shards are split among the loader workers, each drawing its own augmentations."""
    saved = {"train": {"objective": "mpp", "streaming": True, "num_workers": 2}, "mpp": {}, "precision": "no",
             "data": {"holdout": None}}
    now = {**saved, "train": {**saved["train"], "num_workers": 0}}
    with pytest.raises(UsageError, match="--num-workers 2 → 0"):
        check_resume(saved, now, 1, "ckpt")
    check_resume({**saved, "train": {**saved["train"], "streaming": False}},
                 {**now, "train": {**now["train"], "streaming": False}}, 1, "ckpt")  # loaded: workers may change


def test_hf_label_columns_that_are_not_class_numbers_are_one_line(tmp_path, hf_cache):
    rng = np.random.default_rng(0)
    images = [noise(rng) for _ in range(4)]
    for name, labels in (("text", ["0", "1", "0", "1"]), ("lists", [[0], [1], [0], [1]])):
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=None).cast_column(
            "image", datasets.Image()).save_to_disk(str(tmp_path / name))
        with pytest.raises(UsageError, match="not class numbers") as e:
            load_split(f"hf:{tmp_path / name}", "train")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_visualize_draws_an_unlabelled_runs_held_out_images(sources, hf_cache, tmp_path, streaming):
    import eval.visualize

    run = tmp_path / "run"
    with threads_kept():
        main("mpp", ["--dataset", sources["nested"], *TINY, "--max-steps", "2", "--output-dir", str(run),
                     *(["--streaming"] if streaming else [])])
        drawn = eval.visualize.main(["--run", str(run), "--images", "3"])
    assert sorted(drawn) == ["attention", "predictions"] and all(Path(f).is_file() for f in drawn.values())


# ---------------------------------------------------------------- pretraining through the command line

def stopped_at_step_3(args: list[str]) -> subprocess.CompletedProcess:
    """The pretraining command, sent SIGTERM once step 2 is done: it trains step 3, saves it and exits 143."""
    return subprocess.run([sys.executable, "tests/helpers/faults.py", "sigterm-after", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**ENV, "FAULT_STEP": "2"})


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
@pytest.mark.parametrize("source", SOURCES)
def test_mpp_trains_on_each_source_and_resumes_bitwise(sources, labelled, hf_cache, tmp_path, source, streaming):
    # Streamed with 2 loader workers: each filters the held-out images out of its own shards.
    args = ["--dataset", sources[source], *TINY, *(["--streaming", "--num-workers", "2"] if streaming else [])]
    probed = ["--fewshot-every", "6", "--fewshot-dataset", labelled]
    run = tmp_path / "run"
    stopped = stopped_at_step_3([*args, *probed, "--output-dir", str(run)])
    assert stopped.returncode == 143 and "stopped at step 3 of 6" in stopped.stdout + stopped.stderr, (
        stopped.stderr[-3000:])
    log = stopped.stdout + stopped.stderr
    assert f"dataset {sources[source]}: unlabelled (" in log and "held-out split: " in log
    resumed = run_script("scripts/pretrain_mpp.py", *args, *probed, "--output-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    with threads_kept():  # the same run never stopped, in this process and without the probe (which changes nothing)
        main("mpp", [*args, "--output-dir", str(tmp_path / "straight")])
    got, expected = final_weights(run), final_weights(tmp_path / "straight")
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the resumed run differs from the straight one"

    config = json.loads((run / "config.json").read_text())
    holdout = config["data"]["holdout"]
    assert config["data"]["labelled"] is False and config["data"]["class_names"] is None
    assert holdout["images"] == IMAGES // 10 and holdout["of"] == IMAGES and len(holdout["fingerprint"]) == 40
    assert holdout == json.loads((tmp_path / "straight" / "config.json").read_text())["data"]["holdout"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [m["step"] for m in metrics if "fewshot/pets/25shot" in m]
    assert probes == [0, 6] and json.loads((run / "summary.json").read_text())["eval"]["loss"] > 0


# ---------------------------------------------------------------- whatever needs labels refuses

@pytest.mark.parametrize("source", SOURCES)
def test_every_label_needing_command_refuses_every_unlabelled_source(sources, hf_cache, tmp_path, capsys, source):
    out = tmp_path / "out"  # each command's output goes below it: none may be created
    for command, argv in label_needing(sources[source], out).items():
        with threads_kept(), pytest.raises(SystemExit) as e:
            run_in_process(argv)
        assert e.value.code == 2 and one_error_line(capsys.readouterr().err), command
        assert not out.exists(), f"{command} wrote {list(out.rglob('*'))}"


def one_error_line(stderr: str) -> bool:
    """One `error:` line, the last, saying the data has no labels and what to pass; no traceback
    (progress bars of `datasets` reading the data may come before it)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return (len(errors) == 1 and lines[-1] == errors[0] and "has no labels" in errors[0]
            and "labelled dataset" in errors[0] and "Traceback" not in stderr)


def test_the_refusals_through_the_command_line(sources, hf_cache, tmp_path):
    """Each command once as a user runs it, on the sources in turn."""
    out = tmp_path / "out"
    for (command, argv), source in zip(label_needing("", out).items(), itertools.cycle(SOURCES)):
        argv = [sources[source] if a == "" else a for a in argv]
        done = run_script(*argv)
        assert done.returncode == 2 and one_error_line(done.stderr), (command, done.stderr[-2000:])
        assert not out.exists(), command
