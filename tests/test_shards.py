"""Tar shards (`shards:LOCATION`): read streamed and loaded with the right labels, pretrained on
through the command line, and bad shards refused with one line."""
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from helpers.runs import FAST, final_weights, run_script
from helpers.shard_files import png, synthetic_shards, write_tar

from mpp.core.errors import UsageError
from mpp.data.shards import expand_braces
from mpp.data.sources import load_split
from mpp.run.rundir import list_checkpoints


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("shards") / "s")


def test_brace_patterns_expand_in_order():
    assert expand_braces("t-{08..10}.tar") == ["t-08.tar", "t-09.tar", "t-10.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]


@pytest.mark.parametrize("streaming", [False, True])
def test_streamed_and_loaded_shards_hold_every_sample_with_its_label(shards, hf_cache, streaming):
    data, info = load_split(f"shards:{shards}", "train", streaming=streaming)
    items = list(data) if streaming else [data[i] for i in range(len(data))]
    assert info.class_names == ["c0", "c1", "c2", "c3"] and len(items) == 96
    assert [label for _, label in items] == [i % 4 for i in range(96)]  # unshuffled: shard order, member order
    pattern, _ = load_split(f"shards:{shards}/train-{{000000..000001}}.tar", "train", streaming=streaming)
    assert len(list(pattern) if streaming else pattern) == 48


def test_bad_shards_are_one_line_errors(tmp_path, hf_cache):
    with pytest.raises(UsageError, match="no shard matches"):
        load_split(f"shards:{tmp_path}", "train")
    synthetic_shards(tmp_path / "s")
    with pytest.raises(UsageError, match="1 of the 3 shards named are missing"):
        load_split(f"shards:{tmp_path}/s/train-{{000002..000004}}.tar", "train")
    (tmp_path / "s" / "train-000002.tar").write_bytes(b"")  # one empty shard among good ones
    with pytest.raises(UsageError, match=r"shard '.*train-000002.tar' is not a readable tar file \(empty file\)"):
        load_split(f"shards:{tmp_path}/s", "train")
    write_tar(tmp_path / "train-000000.tar", [("a.txt", b"hello")])
    with pytest.raises(UsageError, match="sample 'a' has txt, no image member"):
        load_split(f"shards:{tmp_path}", "train")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_label_that_is_not_an_integer_in_a_later_sample_is_one_line(tmp_path, hf_cache, streaming):
    # the first sample is fine (check_first_sample passes); datasets' int() fails on a later one
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "train-000000.tar", [("k0.png", png(rng)), ("k0.cls", b"0"),
                                             ("k1.png", png(rng)), ("k1.cls", b"two")])
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(UsageError, match=r"sample 'k1' has the label b'two', not an integer") as e:
        data, _ = load_split(f"shards:{tmp_path}", "train", streaming=streaming)
        list(data)
    assert "\n" not in str(e.value)


def test_pretraining_streams_shards_from_the_command_line(shards, hf_cache, tmp_path):
    done = run_script("scripts/pretrain_mpp.py", "--dataset", f"shards:{shards}", "--streaming", "--model", "Micro/4",
                      "--image-size", "16", *FAST, "--max-steps", "4", "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints").is_dir()
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    rng = np.random.default_rng(1)
    write_tar(bad / "train-000003.tar", [("z0.png", png(rng)), ("z0.cls", b"1.5")])
    failed = run_script("scripts/pretrain_mpp.py", "--dataset", f"shards:{bad}", "--streaming", "--model", "Micro/4",
                        "--image-size", "16", *FAST, "--num-workers", "2", "--max-steps", "8",
                        "--output-dir", str(tmp_path / "bad-run"))
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert lines[-1].startswith("error: shard") and "'z0' has the label b'1.5'" in lines[-1]


@pytest.mark.slow
def test_a_streamed_shard_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(shards, hf_cache, tmp_path):
    # 96 images, batch 32: 3 steps an epoch; the resume from step 4 restarts mid-epoch and crosses into the third.
    args = ["scripts/pretrain_mpp.py", "--dataset", f"shards:{shards}", "--streaming", "--model", "Micro/4",
            "--image-size", "16", *FAST, "--num-workers", "1", "--max-steps", "8", "--save-every", "4"]
    whole = run_script(*args, "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", run)
    list_checkpoints(run)[-1].unlink()  # the step-8 checkpoint: resume from step 4
    (run / "summary.json").unlink()
    resumed = run_script(*args, "--output-dir", str(run), "--resume")
    assert resumed.returncode == 0 and "at step 4" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "whole"), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same images, in the same order, with the same crops


def test_cifar10_shards_from_make_shards_hold_the_folder_readers_images_and_labels(cifar10_slice, hf_cache, tmp_path):
    out = tmp_path / "cifar-shards"
    done = run_script("scripts/make_shards.py", str(cifar10_slice), str(out), "--per-shard", "64")
    assert done.returncode == 0 and len(list(out.glob("train-*.tar"))) == 4, done.stderr[-2000:]
    folder, folder_info = load_split(str(cifar10_slice), "test")
    stream, info = load_split(f"shards:{out}", "test", streaming=True)
    expected = Counter((im.numpy().tobytes(), label) for im, label in (folder[i] for i in range(len(folder))))
    assert info.class_names == folder_info.class_names and len(expected) == 100
    assert Counter((im.numpy().tobytes(), label) for im, label in stream) == expected  # shuffled, same pairs
    again = run_script("scripts/make_shards.py", str(cifar10_slice), str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: '{out}' is not empty: pass an empty or new output folder"]
    inside = run_script("scripts/make_shards.py", str(cifar10_slice), str(cifar10_slice / "train" / "shards"))
    assert inside.returncode == 2 and "is inside the image folder" in inside.stderr
    assert not (cifar10_slice / "train" / "shards").exists()


def test_make_shards_stopped_midway_leaves_no_output_folder(cifar10_slice, tmp_path):
    """SIGTERM at the 150th of the 200 train images read (2 shards written): no OUT, no staging
    folder, one line; a rerun then writes the whole set."""
    out = tmp_path / "shards"
    kill = ("import os, pathlib, runpy, signal, sys; read, n = pathlib.Path.read_bytes, [0]\n"
            "def counted(self):\n    n[0] += 1\n    n[0] == 150 and os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return read(self)\n"
            "pathlib.Path.read_bytes = counted; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    stopped = run_script("-c", kill, "scripts/make_shards.py", str(cifar10_slice), str(out), "--per-shard", "64")
    assert stopped.returncode == 128 + 15 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines() == ["stopped by signal 15: no shards written"]
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the hidden staging folder
    done = run_script("scripts/make_shards.py", str(cifar10_slice), str(out), "--per-shard", "64")
    assert done.returncode == 0 and len(list(out.glob("*.tar"))) == 6 and (out / "classes.txt").is_file()
