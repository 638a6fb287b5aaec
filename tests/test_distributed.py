"""Several processes under `accelerate launch` (gloo on CPU): the data is sharded without overlap,
2 processes with half the batch each train what 1 process with the whole batch trains, evaluation
and probes see every image once, only the main process writes, and a 2-process run resumes as one."""
import json
import shutil
import sys

import pytest
import torch
from helpers import shard_probe
from helpers.runs import (
    FAST,
    final_weights,
    launch_2,
    max_difference,
    read_metrics,
    run_script,
)

from eval import fewshot, linear_probe
from mpp.run.checkpoint import load_checkpoint
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import parse_args, train

pytestmark = pytest.mark.slow

SHARDS = ["103", "37"]  # training and held-out images: neither a multiple of the batch nor of 2 processes


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One 2-process MPP pretraining (~15 s of launch), read by every test below that needs one: 10
    steps, checkpoints at 5 and 10, the in-run probe at 0, 5 and 10 (it gathers from both processes).
    Tests that write into a run (a resume, a probe's TensorBoard scalars) work on a copy."""
    run = tmp_path_factory.mktemp("launched") / "run"
    done = launch_2("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "10",
                    "--save-every", "5", "--fewshot-every", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_each_sample_once_per_epoch_and_the_same_global_batches(monkeypatch, capsys):
    # The one-process reference in this process (no interpreter start-up); the 2 processes through the CLI.
    monkeypatch.setattr(sys, "argv", ["shard_probe.py", *SHARDS, "8", "2", "0"])
    shard_probe.main()
    (one,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    done = launch_2("tests/helpers/shard_probe.py", *SHARDS, "4", "2", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    for epoch in ("0", "1"):
        # step t's global batch is process 0's batch t followed by process 1's
        merged = [a + b for a, b in zip(first["train"][epoch], second["train"][epoch], strict=True)]
        assert merged == one["train"][epoch]
        seen = [i for batch in merged for i in batch]
        assert len(seen) == len(set(seen)) == 96  # 12 full batches of 8 from 103 images; no image twice
    assert one["train"]["0"] != one["train"]["1"]  # a new order each epoch
    # evaluation: every held-out image exactly once, none repeated to even out the shares
    assert sorted(first["eval"] + second["eval"]) == list(range(37)) and sorted(one["eval"]) == list(range(37))


def test_two_processes_with_half_batches_match_one_process(tmp_path):
    # Supervised, no dropout: given the same images and augmentations a step is deterministic, so
    # any difference is the order of floating-point sums (the gradient mean over 2 × 16 vs 32).
    common = [*FAST, "--num-workers", "1", "--max-steps", "20", "--save-every", "10"]
    train(*parse_args("supervised", [*common, "--output-dir", str(tmp_path / "one")]))  # the reference, in-process
    two = launch_2("scripts/pretrain_supervised.py", *common, "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    difference = max_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"largest weight difference, 1 vs 2 processes after 20 steps: {difference:.2e}")
    # Adam divides by the gradients' own scale, so float-order noise in a near-zero gradient can move
    # a weight by up to one lr (1e-3) per step; other data would move them by many of those.
    assert difference < 5e-4
    curve = {run: [m["train/loss"] for m in read_metrics(tmp_path / run) if "train/loss" in m]
             for run in ("one", "two")}
    assert len(curve["one"]) == 4 and curve["one"] == pytest.approx(curve["two"], rel=1e-4, abs=1e-5)
    evals = [json.loads((tmp_path / run / "summary.json").read_text())["eval"] for run in ("one", "two")]
    assert evals[0]["accuracy"] == pytest.approx(evals[1]["accuracy"], abs=1 / 360)  # 360 test images, once each
    assert evals[0]["loss"] == pytest.approx(evals[1]["loss"], rel=1e-3)


def test_only_the_main_process_writes(launched):
    run, done = launched
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if "tfevents" in f]  # the scalars' file and the hparams' one
    assert len({f.rsplit(".", 2)[-2] for f in events}) == 1, files  # written by one process (the pid in the name)
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        "checkpoints/ckpt-00000005.pt", "checkpoints/ckpt-00000010.pt", "config.json", "metrics.jsonl", "run.lock",
        "summary.json"]
    steps = [m["step"] for m in read_metrics(run) if "fewshot/seconds" not in m]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # steps 5, 10 and the evaluation at 10
    probes = [m for m in read_metrics(run) if "fewshot/seconds" in m]
    assert [m["step"] for m in probes] == [0, 5, 10] and all(0 <= m["fewshot/digits/25shot"] <= 1 for m in probes)
    assert done.stdout.count("done:") == 1


def test_two_processes_through_accelerate_launch(launched, tmp_path):
    # On a machine without CUDA, `--multi_gpu` is accelerate's torchrun launcher; the trainer then
    # joins the processes in one gloo group (a plain `--cpu --num_processes 2` starts one process).
    run = copy_of(launched[0], tmp_path)  # the resume below writes into it
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    assert ckpt["step"] == 10 and ckpt["config"]["num_processes"] == 2
    # each process has its own random streams (corruption, augmentation), saved for resuming
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # 2 processes × 16 images = the global batch of 32: 10 micro-batches of this epoch per process
    assert ckpt["data"] == {"epoch": 0, "batch_in_epoch": 10}
    assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == [5, 10]  # one writer, not two
    flags = ["--output-dir", str(run), *FAST, "--save-every", "5", "--resume"]  # a resume may drop the probe
    resumed = launch_2("scripts/pretrain_mpp.py", *flags, "--max-steps", "15")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 15
    # the same run with one process would see other batches: refused, with a single error line
    single = run_script("scripts/pretrain_mpp.py", *flags, "--max-steps", "20")
    assert single.returncode == 2 and "processes 2 → 1" in single.stderr


def test_probes_gather_features_from_every_process(launched, tmp_path):
    run = copy_of(launched[0], tmp_path)  # each probe adds its scalars to the run's TensorBoard folder
    for entry, script, name in ((fewshot, "eval/fewshot.py", "fewshot"),
                                (linear_probe, "eval/linear_probe.py", "linear-probe")):
        args = ["--run", str(run), "--num-workers", "0", "--layers", "1", "-1"]  # references on, as by default
        a = entry.main([*args, "--output", str(tmp_path / f"{name}-1.json")])  # 1 process: this one
        two = launch_2(script, *args, "--output", str(tmp_path / f"{name}-2.json"))  # 2, through the CLI
        assert two.returncode == 0, two.stderr[-3000:]
        b = json.loads((tmp_path / f"{name}-2.json").read_text())
        a = json.loads(json.dumps(a))  # as written to its file: tuples become lists
        assert a["dataset"] == b["dataset"]  # the same image counts: every image embedded once
        assert two.stdout.count("wrote ") == 1  # one report
        if name == "fewshot":
            for k in a["results"]:
                # ≤ 1 of 360
                assert a["results"][k]["per_seed"] == pytest.approx(b["results"][k]["per_seed"], abs=0.003)
        else:
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.003)
        assert a["layers"]["features"] == b["layers"]["features"] and set(a["references"]) == set(b["references"])
