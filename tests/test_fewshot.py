"""Few-shot linear probes: the closed form against scikit-learn's ridge, sampling, features, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from eval import fewshot
from eval.fewshot import main
from mpp.core.errors import UsageError
from mpp.core.files import write_json
from mpp.data.sources import dataset_name
from mpp.eval import probe_setup
from mpp.eval.features import extract_features
from mpp.eval.probes import fewshot_probe, fewshot_probe_grid, lsr_predict, sample_shots
from mpp.model.vit import ViT, ViTConfig
from mpp.run.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)


def ridge_predictions(train_x, train_y, test_x, l2, k):
    """The independent solution: sklearn's ridge on the same standardised, bias-augmented features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5

    def augment(x):
        return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], 1)

    targets = 2.0 * np.eye(k)[train_y] - 1.0
    ridge = Ridge(alpha=l2, fit_intercept=False).fit(augment(train_x), targets)
    return ridge.predict(augment(test_x)).argmax(1)


def toy_problem(n, d, k=5, m=300, seed=0):
    """Noisy linear classes: features informative enough that the probe is far from chance and far from perfect."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    train_y, test_y = rng.integers(0, k, n), rng.integers(0, k, m)
    train_x = centers[train_y] + 2.0 * rng.normal(size=(n, d)) + 3.0  # offset: the bias feature matters
    test_x = centers[test_y] + 2.0 * rng.normal(size=(m, d)) + 3.0
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("n, d, gram", [(200, 20, (21, 21)), (30, 100, (30, 30))])  # n >= d, n < d
@pytest.mark.parametrize("l2", [1e-2, 1.0, 2.0**10])
def test_probe_equals_sklearn_ridge(n, d, gram, l2, monkeypatch):
    train_x, train_y, test_x, test_y = toy_problem(n, d)
    shapes = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: shapes.append(a.shape) or eigh(a))
    ours = lsr_predict(train_x, train_y, test_x, [l2], num_classes=5)[l2]
    assert shapes == [gram]  # the branch under test decomposed the smaller Gram matrix
    expected = ridge_predictions(train_x, train_y, test_x, l2, 5)
    np.testing.assert_array_equal(ours, expected)
    accuracy = fewshot_probe(train_x, train_y, test_x, test_y, l2=l2)
    assert accuracy == pytest.approx((expected == test_y).mean())
    assert 0.3 < accuracy < 1.0  # a meaningful comparison: neither chance nor trivially separable


@pytest.mark.parametrize("n, d", [(200, 20), (30, 100)])
def test_grid_equals_separate_calls_with_one_decomposition(n, d, monkeypatch):
    train_x, train_y, test_x, test_y = toy_problem(n, d, seed=1)
    l2s = [0.01, 1.0, 100.0, 2.0**10, 1e5]
    separate = {l2: fewshot_probe(train_x, train_y, test_x, test_y, l2=l2) for l2 in l2s}
    calls = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: calls.append(1) or eigh(a))
    grid = fewshot_probe_grid(train_x, train_y, test_x, test_y, l2s)
    assert grid == separate and len(calls) == 1
    assert len(set(grid.values())) > 1  # l2 actually changes the answer here


def test_probe_accepts_torch_tensors():
    train_x, train_y, test_x, test_y = toy_problem(60, 16, seed=2)
    as_numpy = fewshot_probe(train_x, train_y, test_x, test_y)
    as_torch = fewshot_probe(torch.tensor(train_x, dtype=torch.float32), torch.tensor(train_y),
                             torch.tensor(test_x, dtype=torch.float32), torch.tensor(test_y))
    assert as_torch == pytest.approx(as_numpy, abs=2 / len(test_y))  # float32 input may flip a near-tie


def test_separable_clusters_are_solved_with_five_shots():
    rng = np.random.default_rng(0)
    centers = 10.0 * rng.normal(size=(10, 32))
    labels = np.repeat(np.arange(10), 50)  # a pool of 50 per class
    pool = centers[labels] + rng.normal(size=(500, 32))
    idx = sample_shots(labels, 5, seed=0)
    test_y = rng.integers(0, 10, 1000)
    test_x = centers[test_y] + rng.normal(size=(1000, 32))
    assert fewshot_probe(pool[idx], labels[idx], test_x, test_y) == 1.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(100, 64)), rng.normal(size=(2000, 64))
    train_y, test_y = np.repeat(np.arange(10), 10), rng.integers(0, 10, 2000)
    assert fewshot_probe(train_x, train_y, test_x, test_y) <= 0.35


def test_sample_shots_k_per_class_and_deterministic():
    labels = np.random.default_rng(0).integers(0, 4, 200)
    idx = sample_shots(labels, 7, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 28  # without replacement
    assert np.bincount(labels[idx], minlength=4).tolist() == [7, 7, 7, 7]
    np.testing.assert_array_equal(idx, sample_shots(labels, 7, seed=3))
    assert set(idx.tolist()) != set(sample_shots(labels, 7, seed=4).tolist())


def test_sample_shots_too_few_examples():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(UsageError, match=r"class 1 .*has 3 training examples, fewer than 5"):
        sample_shots(labels, 5, seed=0)
    with pytest.raises(UsageError, match=r"class 3 .*has 0 training examples"):  # absent class, known via num_classes
        sample_shots(labels, 2, seed=0, num_classes=4, class_names=list("abcd"))


def test_extract_features_shape_and_determinism():
    from mpp.data.sources import build_dataset

    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY)).train()
    dataset, _ = build_dataset("digits", "test", 16, train=False)
    indices = [5, 0, 17, 3, 9, 11, 2]
    feats, labels = extract_features(vit, dataset, batch_size=4, indices=indices, progress=False)
    assert feats.shape == (7, 32) and feats.dtype == torch.float32 and labels.dtype == torch.long
    assert labels.tolist() == [dataset[i][1] for i in indices]
    assert vit.training  # the caller's mode is restored
    again, _ = extract_features(vit, dataset, batch_size=7, indices=indices, progress=False)
    torch.testing.assert_close(feats, again)  # eval mode, any batching: the same features
    images = torch.stack([dataset[i][0] for i in indices])
    torch.testing.assert_close(feats, vit.eval().forward_features((images - 0.5) / 0.5)["pre_logits"].detach())


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_report(report: dict, shots: list[int], seeds: int, l2s: list[float]):
    assert set(report) >= {"init", "run", "checkpoint", "step", "run_config", "vit", "dataset", "shots", "seeds",
                           "l2_grid", "headline_l2", "std", "feature_dim", "results"}
    assert list(report["results"]) == [str(k) for k in shots] and report["l2_grid"] == l2s
    for r in report["results"].values():
        assert len(r["per_seed"]) == seeds and all(0.0 <= a <= 1.0 for a in r["per_seed"])
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"])) and r["std"] == pytest.approx(np.std(r["per_seed"]))
        assert list(r["l2_grid"]) == [f"{v:g}" for v in l2s]
        assert r["l2_grid"][f"{l2s[0]:g}"]["per_seed"] == r["per_seed"]  # the headline is the first l2


def test_cli_random_init_preset(tmp_path, capsys):
    out = tmp_path / "x.json"
    main(["--random-init", "--model", "Micro/4", "--output", str(out), "--shots", "1", "5", "--seeds", "2",
          "--l2", "1024", "1", "--max-test", "100"])
    report = json.loads(out.read_text())
    check_report(report, [1, 5], 2, [1024.0, 1.0])
    assert report["init"] == "random" and report["run"] is None and report["step"] == 0
    assert report["feature_dim"] == 128 and report["dataset"]["test_used"] == 100
    assert report["dataset"]["train_embedded"] <= 2 * (1 + 5) * 10  # only the sampled images were embedded
    table = capsys.readouterr().out
    assert "±" in table and "5-shot" in table and "raw pixels |" in table
    scalars = read_scalars(tmp_path / "tensorboard" / "fewshot")
    assert set(scalars) == {"fewshot_random_init/digits/1shot", "fewshot_random_init/digits/5shot"}
    assert scalars["fewshot_random_init/digits/5shot"] == [(0, pytest.approx(report["results"]["5"]["mean"]))]


@pytest.fixture
def run_dir(tmp_path):
    """A finished run in miniature: config.json and a checkpoint at step 7."""
    torch.manual_seed(1)
    vit = ViT(ViTConfig(**TINY))
    config = {"train": {"dataset": "digits", "image_size": 16, "model": "tiny", "seed": 3, "objective": "mpp"},
              "vit": {**TINY, "num_classes": 1000}, "data": {"num_classes": 10, "class_names": list("0123456789")}}
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "config.json", config)
    save_checkpoint(run, 7, {"config": config, "model": vit.state_dict(), "step": 7})
    return run


def test_cli_trained_run_and_its_random_init_baseline(run_dir):
    args = ["--run", str(run_dir), "--shots", "2", "--seeds", "2", "--max-test", "60"]
    trained = main(args)
    assert json.loads((run_dir / "fewshot.json").read_text()) == json.loads(json.dumps(trained))
    check_report(trained, [2], 2, [1024.0])
    assert trained["init"] == "trained" and trained["step"] == 7 and trained["checkpoint"].endswith("ckpt-00000007.pt")
    assert trained["run_config"]["objective"] == "mpp" and trained["feature_dim"] == 32

    baseline = main(args + ["--random-init"])
    assert (run_dir / "fewshot-random-init.json").is_file()
    assert baseline["init"] == "random" and baseline["checkpoint"] is None and baseline["vit"] == trained["vit"]
    # The baseline has the run's architecture, freshly initialised from the run's seed, not its weights.
    _, vit, _, _ = probe_setup.build_model(fewshot.parse_args(["--run", str(run_dir), "--random-init"]))
    _, same, _, _ = probe_setup.build_model(fewshot.parse_args(["--run", str(run_dir), "--random-init"]))
    _, loaded, _, _ = probe_setup.build_model(fewshot.parse_args(["--run", str(run_dir)]))
    torch.testing.assert_close(vit.state_dict(), same.state_dict())
    assert not torch.equal(vit.patch_embed.proj.weight, loaded.patch_embed.proj.weight)
    scalars = read_scalars(run_dir / "tensorboard" / "fewshot")
    assert scalars["fewshot/digits/2shot"] == [(7, pytest.approx(trained["results"]["2"]["mean"]))]
    assert scalars["fewshot_random_init/digits/2shot"][0][0] == 0


def test_cli_random_init_from_config_only(run_dir):
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()  # the run has started but not saved yet
    report = main(["--run", str(run_dir), "--random-init", "--shots", "1", "--seeds", "1", "--max-test", "30"])
    assert report["feature_dim"] == 32 and report["run_config"]["seed"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--random-init", "--model", "Micro/4", "--output", "x.json", "--shots", "0"], "--shots"),
    (["--random-init", "--model", "Micro/4", "--output", "x.json", "--seeds", "0"], "--seeds"),
    (["--random-init", "--model", "Micro/4", "--output", "x.json", "--l2", "1024", "0"], "--l2"),
    (["--model", "Micro/4", "--output", "x.json"], "--random-init"),
    (["--random-init", "--model", "Micro/4"], "--output"),
    (["--random-init", "--model", "Micro/4", "--output", "x.json", "--shots", "500"], "fewer than 500"),
    (["--random-init", "--model", "Ti/16", "--output", "x.json", "--image-size", "100"],
     "not divisible by the patch size 16: pass --image-size 96"),
])
def test_cli_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_script_missing_run_is_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    done = subprocess.run([sys.executable, "eval/fewshot.py", "--run", str(missing)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(missing) in done.stderr


def test_dataset_name_for_tensorboard():
    assert dataset_name("digits") == "digits"
    assert dataset_name("hf:uoft-cs/cifar10") == "cifar10"
    assert dataset_name("/data/my pets/") == "my_pets"


def test_features_token_or_average_patch_token():
    from mpp.eval.features import headline_spec, vit_featurizer

    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY)).eval()
    images = torch.randn(3, 3, 16, 16)
    out = vit.forward_features(images)
    token, avg = headline_spec(vit.config.depth, "token"), headline_spec(vit.config.depth, "avg")
    found = vit_featurizer(vit, [token, avg])(images)
    assert torch.equal(found[token.name], out["pre_logits"])
    # the 16 patch tokens, not the class token
    torch.testing.assert_close(found[avg.name], out["tokens"][:, 1:].mean(1))
    with pytest.raises(UsageError, match="unknown --features"):
        headline_spec(vit.config.depth, "max")


def test_cli_average_patch_features_get_their_own_file(run_dir):
    report = main(["--run", str(run_dir), "--shots", "2", "--seeds", "1", "--max-test", "30", "--features", "avg"])
    assert report["features"] == "avg" and (run_dir / "fewshot-avg.json").is_file()
    assert not (run_dir / "fewshot.json").exists()
