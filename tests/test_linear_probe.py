"""Linear probe on all the training data: the dev split, l2 chosen without the test split, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import threads_kept

from eval.linear_probe import main
from mpp.core.errors import UsageError
from mpp.eval import probes
from mpp.eval.probes import (
    DEFAULT_L2S,
    fewshot_probe_grid,
    linear_probe,
    lsr_predict,
    stratified_dev_split,
)

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"init", "run", "checkpoint", "step", "features", "kernels", "dataset", "feature_dim", "l2_grid",
               "dev_accuracy", "l2", "accuracy", "vit", "reference_seed"}
OPTIONAL_KEYS = {"references", "layers"}  # the references (on by default) and --layers
DATASET_KEYS = {"spec", "image_size", "num_classes", "train_size", "dev_size", "test_size"}


def noisy_classes(n, d, k=5, m=300, noise=2.0, seed=0):
    """Gaussian classes around random centres, offset so the bias feature matters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    train_y, test_y = np.arange(n) % k, rng.integers(0, k, m)  # every class in train
    train_x = centers[train_y] + noise * rng.normal(size=(n, d)) + 3.0
    test_x = centers[test_y] + noise * rng.normal(size=(m, d)) + 3.0
    return train_x, train_y, test_x, test_y


def test_separable_features_are_solved():
    train_x, train_y, test_x, test_y = noisy_classes(500, 32, k=10, m=1000, noise=0.1)
    out = linear_probe(train_x, train_y, test_x, test_y)
    assert out["accuracy"] == 1.0
    assert all(acc == 1.0 for acc in out["dev_accuracy"].values())
    assert out["l2"] == max(DEFAULT_L2S)  # every l2 ties on dev: the tie goes to the largest


def test_random_labels_give_chance():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(1000, 64)), rng.normal(size=(2000, 64))
    train_y, test_y = rng.integers(0, 10, 1000), rng.integers(0, 10, 2000)
    out = linear_probe(train_x, train_y, test_x, test_y)
    assert out["accuracy"] <= 0.14  # chance is 0.1
    assert max(out["dev_accuracy"].values()) <= 0.2


def test_dev_split_is_stratified_disjoint_and_fixed():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 7 + [3] * 2)
    fit, dev = stratified_dev_split(labels, 0.1)
    assert sorted(np.concatenate([fit, dev]).tolist()) == list(range(len(labels)))  # a partition
    assert np.bincount(labels[dev], minlength=4).tolist() == [5, 2, 1, 1]  # ~10% of each class, at least one
    assert np.bincount(labels[fit], minlength=4).min() >= 1  # every class keeps one image to fit on
    again_fit, again_dev = stratified_dev_split(labels, 0.1)
    np.testing.assert_array_equal(dev, again_dev)
    np.testing.assert_array_equal(fit, again_fit)
    _, half = stratified_dev_split(labels, 0.5)
    assert np.bincount(labels[half], minlength=4).tolist() == [25, 10, 4, 1]  # 3.5 rounds up


@pytest.mark.parametrize("labels, kwargs, message", [
    ([0, 0, 1, 1, 2], {}, r"class 2 has 1 training images, fewer than 2"),
    ([0, 0, 1, 1], {"num_classes": 3, "class_names": list("abc")}, r"class 2 \('c'\) has 0 training images"),
])
def test_dev_split_needs_two_images_per_class(labels, kwargs, message):
    with pytest.raises(UsageError, match=message):
        stratified_dev_split(np.array(labels), 0.1, **kwargs)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0])
def test_dev_fraction_out_of_range(fraction):
    with pytest.raises(UsageError, match=r"--dev-fraction .* \(0, 0.5\]"):
        stratified_dev_split(np.arange(20) % 2, fraction)


def test_test_features_never_reach_the_l2_selection(monkeypatch):
    train_x, train_y, test_x, test_y = noisy_classes(200, 16, seed=1)
    test_x = test_x + 1000.0  # far from every training row: any test row in a call is easy to see
    calls = []
    real = probes.lsr_predict
    monkeypatch.setattr(probes, "lsr_predict", lambda x, y, xt, l2s, **kw: calls.append((x, xt, list(l2s)))
                        or real(x, y, xt, l2s, **kw))
    out = linear_probe(train_x, train_y, test_x, test_y, l2s=[0.1, 10.0, 1000.0])
    assert len(calls) == 2  # one decomposition for the whole grid on dev, one refit for test
    (sel_x, sel_xt, sel_l2s), (fit_x, fit_xt, fit_l2s) = calls
    train_rows = {row.tobytes() for row in train_x}
    # Selection: fit rows and scored rows are both training rows, disjoint, together the whole train split.
    assert sel_l2s == [0.1, 10.0, 1000.0] and np.abs(sel_x).max() < 500 and np.abs(sel_xt).max() < 500
    sel_rows, dev_rows = {r.tobytes() for r in sel_x}, {r.tobytes() for r in sel_xt}
    assert sel_rows | dev_rows == train_rows and not sel_rows & dev_rows and len(sel_xt) == out["dev_size"] == 20
    # The refit: all the training rows with the chosen l2, and only then the test rows.
    assert fit_l2s == [out["l2"]] and len(fit_x) == 200 and np.array_equal(fit_xt, test_x)


def test_chosen_l2_is_the_dev_best_even_when_another_wins_on_test():
    train_x, train_y, test_x, _ = noisy_classes(120, 60, seed=2)
    l2s = [1e-2, 1e4]
    honest = linear_probe(train_x, train_y, test_x, np.zeros(len(test_x), dtype=int), l2s)
    dev_best = honest["l2"]
    other = next(v for v in l2s if v != dev_best)
    # Test labels made to agree exactly with the probe the dev split did NOT prefer.
    rigged_y = lsr_predict(train_x, train_y, test_x, [other], num_classes=5)[other]
    on_test = fewshot_probe_grid(train_x, train_y, test_x, rigged_y, l2s, num_classes=5)
    assert on_test[other] == 1.0 > on_test[dev_best]  # the test split would pick `other`
    rigged = linear_probe(train_x, train_y, test_x, rigged_y, l2s)
    assert rigged["l2"] == dev_best and rigged["dev_accuracy"] == honest["dev_accuracy"]
    assert rigged["accuracy"] == on_test[dev_best] < 1.0


def test_ties_go_to_the_larger_l2_in_any_order():
    train_x, train_y, test_x, test_y = noisy_classes(100, 8, noise=0.05, seed=3)
    for l2s in ([1.0, 64.0, 4.0], [64.0, 4.0, 1.0]):
        out = linear_probe(train_x, train_y, test_x, test_y, l2s)
        assert set(out["dev_accuracy"].values()) == {1.0} and out["l2"] == 64.0
        assert out["l2_grid"] == l2s  # reported in the order given


# ---- the CLI on a real (2-step) pretraining run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real MPP run on digits: 2 steps of batch 32, a checkpoint at step 2."""
    from mpp.train.pretrain import TrainConfig, train

    run = tmp_path_factory.mktemp("linear-probe") / "run"
    # module-scoped: the per-test MPP_KERNELS fixture is not set up yet
    with pytest.MonkeyPatch.context() as mp, threads_kept():
        mp.setenv("MPP_KERNELS", "torch")
        train(TrainConfig(output_dir=str(run), max_steps=2, batch_size=32, save_every=2, num_workers=0,
                          cpu_threads=1, warmup_steps=1, log_every=1))
    return run


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_report(report: dict, l2s: list[float], train_size: int, test_size: int, dev_fraction: float = 0.1):
    assert set(report) - OPTIONAL_KEYS == REPORT_KEYS and set(report["dataset"]) == DATASET_KEYS
    data = report["dataset"]
    assert data["spec"] == "digits" and data["num_classes"] == 10 and data["image_size"] == report["vit"]["image_size"]
    assert data["train_size"] == train_size and data["test_size"] == test_size
    # --dev-fraction of each class, rounded per class (a subset's classes are uneven, so only about)
    assert abs(data["dev_size"] - dev_fraction * train_size) <= 0.03 * train_size
    assert report["l2_grid"] == l2s and list(report["dev_accuracy"]) == [f"{v:.12g}" for v in l2s]
    best = max(report["dev_accuracy"].values())
    assert report["l2"] == max(v for v in l2s if report["dev_accuracy"][f"{v:.12g}"] == best)
    assert all(0.0 <= a <= 1.0 for a in report["dev_accuracy"].values()) and 0.0 <= report["accuracy"] <= 1.0


def test_cli_on_a_real_run_and_its_random_init_baseline(real_run, capsys):
    args = ["--run", str(real_run), "--max-train", "300", "--max-test", "100", "--num-workers", "0"]
    trained = main(args)
    assert json.loads((real_run / "linear-probe.json").read_text()) == json.loads(json.dumps(trained))
    check_report(trained, list(DEFAULT_L2S), 300, 100)
    assert trained["init"] == "trained" and trained["run"] == str(real_run) and trained["step"] == 2
    assert trained["checkpoint"].endswith("ckpt-00000002.pt") and trained["feature_dim"] == trained["vit"]["embed_dim"]
    assert trained["accuracy"] > 0.3  # digits are nearly linearly separable even in 2-step features
    table = capsys.readouterr().out
    assert "<- chosen" in table and "test accuracy" in table and "linear-probe.json" in table

    baseline = main(args + ["--random-init", "--l2", "1", "1024"])
    assert json.loads((real_run / "linear-probe-random-init.json").read_text()) == json.loads(json.dumps(baseline))
    check_report(baseline, [1.0, 1024.0], 300, 100)
    assert baseline["init"] == "random" and baseline["checkpoint"] is None and baseline["step"] == 0
    assert baseline["vit"] == trained["vit"]
    scalars = read_scalars(real_run / "tensorboard" / "linear_probe")
    assert scalars["linear_probe/digits"] == [(2, pytest.approx(trained["accuracy"]))]
    assert scalars["linear_probe_random_init/digits"] == [(0, pytest.approx(baseline["accuracy"]))]
    # The trained run's references: the same random init (its seed) and the pixels, on the same images.
    refs = trained["references"]
    assert set(refs) == {"random_init", "pixels"} and "random_init" not in baseline["references"]
    again = main(args + ["--random-init", "--no-references", "--output", str(real_run / "again.json")])
    assert refs["random_init"]["accuracy"] == again["accuracy"] and "references" not in again
    assert refs["pixels"]["feature_dim"] == 3 * 16 * 16 and refs["pixels"]["grid"] == 16
    assert "raw pixels (16 px) |" in capsys.readouterr().out


def test_cli_preset_with_output(tmp_path):
    out = tmp_path / "sub" / "probe.json"
    report = main(["--random-init", "--model", "Micro/4", "--output", str(out), "--max-train", "200",
                   "--max-test", "50", "--l2", "4", "64", "--dev-fraction", "0.2"])
    assert json.loads(out.read_text())["accuracy"] == report["accuracy"]
    check_report(report, [4.0, 64.0], 200, 50, dev_fraction=0.2)
    assert report["init"] == "random" and report["run"] is None and report["step"] == 0
    assert list(read_scalars(tmp_path / "sub" / "tensorboard" / "linear_probe")) == ["linear_probe_random_init/digits"]


@pytest.mark.parametrize("extra, message", [
    (["--dev-fraction", "0"], "--dev-fraction 0 is out of range"),
    (["--dev-fraction", "0.6"], "--dev-fraction 0.6 is out of range"),
    (["--l2", "1", "0"], "--l2"),
    (["--max-train", "-1"], "--max-train"),
    (["--max-test", "-5"], "--max-test"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-train", "5"], "fewer than 2"),  # 5 random digits leave some class with 0 or 1 images
    (["--output", "FILE/x.json"], "cannot write"),  # a folder that is a file
    (["--output", "."], "is a directory"),
])
def test_cli_usage_errors(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    argv = ["--random-init", "--model", "Micro/4", "--output", "x.json", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "Micro/4", "--output", "x.json"], "--random-init"),
    (["--random-init", "--model", "Micro/4"], "--output"),
])
def test_cli_preset_needs_random_init_and_output(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1


def test_script_bad_input_is_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    done = subprocess.run([sys.executable, "eval/linear_probe.py", "--run", str(missing)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(missing) in done.stderr
