"""Data too large for memory: an image folder is listed, not read, at start-up; a streamed pass
holds memory flat; a streamed run stopped and resumed reads on from the same position."""
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.runs import ENV, FAST, REPO, final_weights, read_metrics

from mpp.data.holdout import pretraining_splits
from mpp.data.labels import NO_LABEL
from mpp.data.sources import load_split


def image_folder(root, n_per_class: int, classes: int = 4, test_per_class: int = 2):
    """root/{train,test}/c<k>/<i>.png: tiny noise images, each different."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_streamed_folder_is_listed_not_read_at_start_up(tmp_path, hf_cache, monkeypatch):
    root = image_folder(tmp_path / "big", 500)  # 2,000 training images
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    stream, info = load_split(str(root), "train", streaming=True)
    image, label = next(iter(stream))
    assert image.shape == (3, 8, 8) and info.num_classes == 4
    assert len(opened) <= 2, f"start-up opened {len(opened)} images"  # the one yielded (datasets may peek one)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_an_unlabelled_folder_and_its_held_out_split_are_listed_not_read(tmp_path, hf_cache, monkeypatch, streaming):
    """A folder without train/ (every image at any depth), carved into train and held-out splits
    without opening an image: the carve knows images by their paths."""
    root = image_folder(tmp_path / "big", 500)  # 2,000 images below big/train/c<k>/ and big/test/...
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    splits = pretraining_splits(str(root / "train"), 8, holdout_images=100, streaming=streaming, shuffle_buffer=256)
    assert not splits.info.labelled and len(splits.eval) == 100 and not opened, f"start-up opened {len(opened)} images"
    image, label = next(iter(splits.train))
    assert image.shape == (3, 8, 8) and label == NO_LABEL and len(opened) <= 2


MEASURE = textwrap.dedent("""
    import json, sys
    from torch.utils.data import DataLoader
    from mpp.data.sources import build_dataset

    def rss_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

    dataset, _ = build_dataset(sys.argv[1], "train", 8, train=True, streaming=True, shuffle_buffer=256)
    total, seen, marks = int(sys.argv[2]), 0, {}
    for images, _ in DataLoader(dataset, batch_size=64):
        seen += len(images)
        for f in (0.1, 0.5, 1.0):
            if seen >= f * total and f not in marks:
                marks[f] = rss_mb()
    print(json.dumps({"seen": seen, "rss_mb": marks}))
""")


@pytest.mark.slow
def test_memory_stays_flat_over_a_streamed_pass(tmp_path, hf_cache):
    root = image_folder(tmp_path / "big", 1500)  # 6,000 training images
    done = subprocess.run([sys.executable, "-c", MEASURE, str(root), "6000"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**ENV, "HF_DATASETS_CACHE": str(hf_cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rss = {float(k): v for k, v in result["rss_mb"].items()}
    print(f"RSS over a streamed pass of {result['seen']} images: {rss}")
    assert result["seen"] == 6000
    # flat: from 10% to 100% of the pass, growth is allocator noise, not memory per image read
    assert rss[1.0] - rss[0.1] < 25, rss


@pytest.mark.slow
def test_a_streamed_run_resumes_at_its_position(tmp_path, hf_cache):
    root = image_folder(tmp_path / "data", 150)  # 600 images: 18 steps of 32 per epoch, 30 steps cross one
    env = {**ENV, "HF_DATASETS_CACHE": str(hf_cache)}

    def pretrain(run, *extra):
        return [sys.executable, "scripts/pretrain_mpp.py", "--dataset", str(root), "--streaming", "--image-size", "8",
                "--output-dir", str(run), *FAST, "--num-workers", "1", "--max-steps", "30", "--save-every", "100",
                *extra]

    # The uninterrupted run trains beside the stopped one (each on its own cache): its start-up and the
    # other's overlap on the machine's 2 cores, and what it trains does not depend on the timing.
    whole = subprocess.Popen(pretrain(tmp_path / "whole"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**env, "HF_DATASETS_CACHE": str(hf_cache / "whole")})
    run = tmp_path / "stopped"
    proc = subprocess.Popen(pretrain(run), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and read_metrics(run)) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped at step" in out + err, err[-2000:]
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err[-2000:]
    resumed = subprocess.run(pretrain(run, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "whole"), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same images, in the same order, with the same crops
