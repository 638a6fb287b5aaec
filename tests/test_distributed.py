"""Several processes under `accelerate launch` (gloo on CPU): the data is sharded without overlap,
2 processes with half the batch each train what 1 process with the whole batch trains, evaluation
and probes see every image once, and only the main process writes."""
import json

import pytest
from helpers.runs import (
    FAST,
    final_weights,
    launch_2,
    max_difference,
    read_metrics,
    run_script,
)

pytestmark = pytest.mark.slow


def shard_records(processes: int, micro_batch: int, workers: int) -> list[dict]:
    args = ["tests/helpers/shard_probe.py", "103", "37", str(micro_batch), "2", str(workers)]
    done = launch_2(*args) if processes == 2 else run_script(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_sample_once_per_epoch_and_the_same_global_batches():
    (one,) = shard_records(1, 8, 0)
    first, second = shard_records(2, 4, 1)
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
    common = ["scripts/pretrain_supervised.py", *FAST, "--num-workers", "1", "--max-steps", "20",
              "--save-every", "10"]
    one = run_script(*common, "--output-dir", str(tmp_path / "one"))
    two = launch_2(*common, "--output-dir", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    difference = max_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"largest weight difference, 1 vs 2 processes after 20 steps: {difference:.2e}")
    # Adam divides by the gradients' own scale, so float-order noise in a near-zero gradient can move
    # a weight by up to one lr (1e-3) per step; other data would move them by many of those.
    assert difference < 5e-4
    curve = {run: [m["train/loss"] for m in read_metrics(tmp_path / run) if "train/loss" in m] for run in ("one", "two")}
    assert len(curve["one"]) == 4 and curve["one"] == pytest.approx(curve["two"], rel=1e-4, abs=1e-5)
    evals = [json.loads((tmp_path / run / "summary.json").read_text())["eval"] for run in ("one", "two")]
    assert evals[0]["accuracy"] == pytest.approx(evals[1]["accuracy"], abs=1 / 360)  # 360 test images, once each
    assert evals[0]["loss"] == pytest.approx(evals[1]["loss"], rel=1e-3)


def test_only_the_main_process_writes(tmp_path):
    run = tmp_path / "run"
    done = launch_2("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "10",
                    "--save-every", "5", "--fewshot-every", "5")  # the in-run probe gathers from both processes
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if "tfevents" in f]  # the scalars' file and the hparams' one
    assert len({f.rsplit(".", 2)[-2] for f in events}) == 1, files  # written by one process (the pid in the name)
    assert [f for f in files if not f.startswith("tensorboard/")] == [
        "checkpoints/ckpt-00000005.pt", "checkpoints/ckpt-00000010.pt", "config.json", "metrics.jsonl", "run.lock", "summary.json"]
    steps = [m["step"] for m in read_metrics(run) if "fewshot/seconds" not in m]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # steps 5, 10 and the evaluation at 10
    probes = [m for m in read_metrics(run) if "fewshot/seconds" in m]
    assert [m["step"] for m in probes] == [0, 5, 10] and all(0 <= m["fewshot/digits/25shot"] <= 1 for m in probes)
    assert done.stdout.count("done:") == 1


def test_probes_gather_features_from_every_process(tmp_path):
    run = tmp_path / "run"
    assert run_script("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "5").returncode == 0
    for script, name in (("eval/fewshot.py", "fewshot"), ("eval/linear_probe.py", "linear-probe")):
        args = [script, "--run", str(run), "--num-workers", "0", "--layers", "1", "-1"]  # references on, as by default
        one = run_script(*args, "--output", str(tmp_path / f"{name}-1.json"))
        two = launch_2(*args, "--output", str(tmp_path / f"{name}-2.json"))
        assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
        a, b = (json.loads((tmp_path / f"{name}-{n}.json").read_text()) for n in (1, 2))
        assert a["dataset"] == b["dataset"]  # the same image counts: every image embedded once
        assert two.stdout.count("wrote ") == 1  # one report
        if name == "fewshot":
            for k in a["results"]:
                assert a["results"][k]["per_seed"] == pytest.approx(b["results"][k]["per_seed"], abs=0.003)  # ≤ 1 of 360
        else:
            assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.003)
        assert a["layers"]["features"] == b["layers"]["features"] and set(a["references"]) == set(b["references"])
