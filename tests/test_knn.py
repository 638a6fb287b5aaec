"""Weighted k-NN (DINO's protocol): the chunked search against scikit-learn's neighbours and an explicit
vote, its bounds and one-line errors; eval/knn.py through the command line; its reports in the comparison."""
import json
import math

import numpy as np
import pytest
import torch
from helpers.runs import run_script
from sklearn.neighbors import NearestNeighbors

from eval import knn
from mpp.core.errors import UsageError
from mpp.core.files import write_json
from mpp.eval import probe_setup, probes
from mpp.eval.features import extract_features
from mpp.eval.probe_runs import ProbeData
from mpp.eval.probes import knn_chunks, knn_predict, knn_probe, knn_probe_grid
from mpp.model.vit import ViT, ViTConfig
from mpp.report.comparison import compare
from mpp.report.curves import tensorboard_scalars
from mpp.run.checkpoint import save_checkpoint

TINY = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def clusters(n=400, m=200, d=16, k=6, spread=1.5, seed=0):
    """Gaussian classes around random centres: neither chance nor trivially separable."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    train_y, test_y = rng.integers(0, k, n), rng.integers(0, k, m)
    train_x = centers[train_y] + spread * rng.normal(size=(n, d))
    test_x = centers[test_y] + spread * rng.normal(size=(m, d))
    return train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y


def sklearn_votes(train_x, train_y, test_x, k, temperature, classes):
    """The independent answer: scikit-learn's brute-force cosine neighbours (float64), then DINO's vote
    written out: each neighbour adds exp(similarity / T) to its class, the largest sum wins."""
    found = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train_x.astype(np.float64))
    distances, neighbours = found.kneighbors(test_x.astype(np.float64))  # (m, k): 1 - cosine similarity
    predictions = []
    for dist, idx in zip(distances, neighbours, strict=True):
        votes = np.zeros(classes)
        for d, j in zip(dist, idx, strict=True):
            votes[train_y[j]] += math.exp((1.0 - d) / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


@pytest.mark.parametrize("chunks", [None, (7, 13), (200, 1)])  # one block; neither divides the data; 1 row a chunk
@pytest.mark.parametrize("temperature", [0.02, 0.07, 1.0])
def test_predictions_equal_sklearn_neighbours_and_an_explicit_vote(temperature, chunks):
    train_x, train_y, test_x, test_y = clusters()
    ks = [1, 5, 20, 50]
    ours = knn_predict(train_x, train_y, test_x, ks, temperature, num_classes=6, chunks=chunks)
    assert list(ours) == ks
    for k in ks:
        expected = sklearn_votes(train_x, train_y, test_x, k, temperature, 6)
        np.testing.assert_array_equal(ours[k], expected, err_msg=f"k={k}")
    grid = knn_probe_grid(train_x, train_y, test_x, test_y, ks, temperature, chunks=chunks)
    assert grid == {k: float((ours[k] == test_y).mean()) for k in ks}
    assert all(0.4 < a < 0.95 for a in grid.values())  # a meaningful comparison
    assert len({tuple(p) for p in ours.values()}) > 1  # k changes the answer here


def test_one_search_serves_every_k(monkeypatch):
    train_x, train_y, test_x, test_y = clusters(seed=1)
    separate = {k: knn_probe(train_x, train_y, test_x, test_y, k=k) for k in (10, 20, 3)}
    blocks = []
    real = probes.finite_rows
    monkeypatch.setattr(probes, "finite_rows", lambda x, what: blocks.append(what) or real(x, what))
    assert knn_probe_grid(train_x, train_y, test_x, test_y, (10, 20, 3, 10)) == separate  # deduplicated, in order
    assert blocks == ["train", "test"]  # each split read once: one block of 200 × 400 for the three k


def test_inputs_torch_float64_and_scale_agree():
    train_x, train_y, test_x, test_y = clusters(seed=2)
    reference = knn_probe_grid(train_x, train_y, test_x, test_y, (5, 20))
    assert knn_probe_grid(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                          torch.from_numpy(test_y), (5, 20)) == reference
    # float64 rows are converted a chunk at a time (never the whole matrix); the cosine ignores each row's scale
    scaled = train_x.astype(np.float64) * np.random.default_rng(0).uniform(0.1, 10, (len(train_x), 1))
    assert knn_probe_grid(scaled, train_y, test_x * 3, test_y, (5, 20), chunks=(50, 64)) == reference


def test_separated_classes_score_one_and_shuffled_labels_chance():
    rng = np.random.default_rng(0)
    centers = 10.0 * rng.normal(size=(10, 32))
    train_y, test_y = np.repeat(np.arange(10), 50), rng.integers(0, 10, 1000)
    train_x = centers[train_y] + rng.normal(size=(500, 32))
    test_x = centers[test_y] + rng.normal(size=(1000, 32))
    assert knn_probe_grid(train_x, train_y, test_x, test_y, (1, 10, 20)) == {1: 1.0, 10: 1.0, 20: 1.0}
    shuffled = knn_probe_grid(train_x, rng.permutation(train_y), test_x, test_y, (10, 20))
    assert all(a < 0.16 for a in shuffled.values()), shuffled  # chance is 0.1


def test_a_tie_goes_to_the_lower_class():
    train_x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # two identical directions, classes 1 and 0
    assert knn_predict(train_x, [1, 0, 2], np.array([[1.0, 0.0]]), [2])[2].tolist() == [0]


def test_chunks_bound_memory_whatever_the_sizes():
    budget = probes.KNN_CHUNK_FLOATS
    for m, n, d, k, classes in [(50_000, 1_281_167, 768, 20, 1000), (10, 1_281_167, 768, 1_281_167, 1000),
                                (50_000, 1_281_167, 200_000, 20, 21_841), (3, 5, 2, 5, 2)]:
        test_rows, train_rows = knn_chunks(m, n, d, k, classes)
        assert 1 <= test_rows <= m and 1 <= train_rows <= n
        if (m, n) != (3, 5):  # bounded, when there is anything to bound
            assert test_rows * train_rows <= budget and train_rows * d <= budget and test_rows * d <= budget
            assert test_rows * (4 * k + 2 * classes) <= budget or test_rows == 1
    test_rows, train_rows = knn_chunks(50_000, 1_281_167, 768, 20, 1000)  # ImageNet at ViT-B's width
    assert 32 * 2**20 < 4 * test_rows * train_rows <= 64 * 2**20  # large blocks (fast), 64 MiB of similarities at most


@pytest.mark.parametrize("change, message", [
    ({"ks": [0]}, "k-NN k=0 is out of range: pass --k as whole numbers of at least 1"),
    ({"ks": [2.5]}, "k-NN k=2.5 is out of range"),
    ({"ks": []}, "k-NN got no k: pass --k"),
    ({"ks": [10, 41]}, "k-NN with k=41 needs at least 41 training images, but it has 40: pass a --k of at most 40"),
    ({"temperature": 0.0}, "k-NN temperature 0.0 is not a finite number > 0: pass e.g. --temperature 0.07"),
    ({"temperature": float("nan")}, "k-NN temperature nan is not a finite number > 0"),
    ({"temperature": -1.0}, "k-NN temperature -1.0 is not"),
    ({"train_x": np.zeros((40, 3))}, "k-NN probe got train features (40, 3), labels (40,), test features (10, 4)"),
    ({"train_x": np.zeros((0, 4)), "train_y": []}, "pass non-empty [n, d] features"),
    ({"test_x": np.zeros((0, 4)), "test_y": []}, "pass non-empty [n, d] features"),
    ({"train_y": np.arange(39) % 3}, "labels (39,)"),
    ({"test_y": [0, 1]}, "k-NN probe got 10 test features and 2 test labels: pass one label per test row"),
    ({"train_y": np.arange(40) % 3 - 1}, "k-NN train labels run -1..1, outside the classes 0..1"),
    ({"train_x": np.where(np.eye(40, 4) > 0, np.nan, 1.0)}, "the k-NN train features are not finite (NaN or inf)"),
    ({"test_x": np.full((10, 4), np.inf)}, "the k-NN test features are not finite (NaN or inf)"),
])
def test_bad_input_is_one_line(change, message):
    rng = np.random.default_rng(0)
    args = {"train_x": rng.normal(size=(40, 4)), "train_y": np.arange(40) % 3, "test_x": rng.normal(size=(10, 4)),
            "test_y": np.arange(10) % 3, "ks": [10], "temperature": 0.07, **change}
    with pytest.raises(UsageError) as error:
        knn_probe_grid(args["train_x"], args["train_y"], args["test_x"], args["test_y"], args["ks"],
                       args["temperature"])
    text = str(error.value)
    assert message in text and "\n" not in text and ": " in text


# ---- eval/knn.py through the command line, and its reports in the comparison


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run in miniature: config.json and a 2-block checkpoint at step 7 (seed 3)."""
    torch.manual_seed(1)
    vit = ViT(ViTConfig(**TINY))
    config = {"train": {"dataset": "digits", "image_size": 16, "model": "tiny", "seed": 3, "objective": "mpp"},
              "vit": {**TINY, "num_classes": 1000}, "data": {"num_classes": 10, "class_names": list("0123456789")}}
    run = tmp_path_factory.mktemp("knn") / "run"
    run.mkdir()
    write_json(run / "config.json", config)
    save_checkpoint(run, 7, {"config": config, "model": vit.state_dict(), "step": 7})
    return run


@pytest.fixture(scope="module")
def trained(run_dir):
    """eval/knn.py as a user runs it: every block, both references, 150 fixed test images."""
    done = run_script("eval/knn.py", "--run", str(run_dir), "--layers", "all", "--max-test", "150", "--k", "5", "20")
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads((run_dir / "knn.json").read_text())


def test_cli_report_references_layers_and_tensorboard(trained, run_dir):
    done, report = trained
    assert report["init"] == "trained" and report["step"] == 7 and report["checkpoint"].endswith("ckpt-00000007.pt")
    assert report["dataset"] == {"spec": "digits", "image_size": 16, "num_classes": 10, "train_size": 1437,
                                 "test_size": 360, "train_used": 1437, "test_used": 150}
    assert report["k"] == [5, 20] and report["temperature"] == 0.07 and report["feature_dim"] == 32
    for results in (report["results"], *(r["results"] for r in report["references"].values())):
        assert list(results) == ["5", "20"] and all(r["k"] == int(k) and 0 <= r["accuracy"] <= 1
                                                    for k, r in results.items())
    assert set(report["references"]) == {"random_init", "pixels"} and report["references"]["pixels"]["grid"] == 16
    assert report["references"]["pixels"]["results"]["5"]["accuracy"] > 0.9  # digits' pixels are nearly separable
    assert len(report["layers"]["features"]) == 8 and report["layers"]["results"]["2/token+norm"] == report["results"]
    assert report["layers"]["random_init"]["2/token+norm"] == report["references"]["random_init"]["results"]
    assert "5-NN |   20-NN" in done.stdout and "raw pixels |" in done.stdout and "by block (20-NN, %)" in done.stdout
    assert tensorboard_scalars(run_dir / "tensorboard" / "knn") == {
        f"knn/digits/{k}nn": [(7, pytest.approx(report["results"][str(k)]["accuracy"]))] for k in (5, 20)}

    # The same numbers from features taken here and the library call: the CLI scores what it says.
    _, vit, _, _ = probe_setup.build_model(knn.parse_args(["--run", str(run_dir)]))
    data = ProbeData.load("digits", 16)
    test_idx = probes.fixed_subset(360, 150)
    train_x, train_y = extract_features(vit, data.train, progress=False)
    test_x, test_y = extract_features(vit, data.test, indices=test_idx, progress=False)
    assert knn_probe_grid(train_x, train_y, test_x, test_y, (5, 20), num_classes=10) == {
        k: report["results"][str(k)]["accuracy"] for k in (5, 20)}


@pytest.fixture(scope="module")
def baseline(trained, run_dir):
    """The run's random init, as `--random-init` scores it (in this process: the CLI has its own test)."""
    return knn.main(["--run", str(run_dir), "--random-init", "--max-test", "150", "--k", "5", "20", "--no-references"])


def test_cli_random_init_and_mean_patch_token_get_their_own_files(trained, baseline, run_dir):
    _, report = trained
    assert json.loads((run_dir / "knn-random-init.json").read_text()) == json.loads(json.dumps(baseline))
    assert baseline["init"] == "random" and baseline["step"] == 0 and "references" not in baseline
    assert baseline["results"] == report["references"]["random_init"]["results"]  # the run's seed, the same images
    avg = knn.main(["--run", str(run_dir), "--features", "avg", "--no-references", "--max-test", "150", "--k", "5"])
    assert avg["features"] == "avg" and (run_dir / "knn-avg.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--k", "0"], "error: --k 0 is out of range: pass a number >= 1"),
    (["--temperature", "nan"], "error: --temperature nan is not finite: pass a number > 0"),
    (["--k", "10", "100000"], "error: k-NN with k=100000 needs at least 100000 training images, but it has 1437"),
])
def test_cli_bad_settings_are_one_line_and_write_nothing(extra, message, tmp_path):
    out = tmp_path / "out" / "knn.json"
    done = run_script("eval/knn.py", "--model", "Micro/4", "--random-init", "--output", str(out), *extra, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_a_dataset_refused_writes_nothing(tmp_path, capsys):
    """The data is loaded before the output is prepared: a refused dataset leaves no folder behind."""
    with pytest.raises(SystemExit) as stopped:
        knn.main(["--model", "Micro/4", "--random-init", "--dataset", str(tmp_path / "nope"),
                  "--output", str(tmp_path / "out" / "knn.json")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: dataset folder") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_compare_shows_the_knn_columns_and_reference_rows(trained, baseline, run_dir, tmp_path):
    _, report = trained
    found = compare([run_dir], tmp_path / "out")
    table = found["tables"][0]
    assert table["columns"] == ["run", "objective", "data", "linear probe", "k-NN k=5 (digits)", "k-NN k=20 (digits)",
                                "fine-tune", "steps", "wall time"]
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["rows"]}
    assert list(rows) == ["run", "random init (tiny, 16 px)", "raw pixels (16 px)"]

    def cell(results, k):
        return f"{100 * results[str(k)]['accuracy']:.1f}"

    refs = report["references"]
    for name, results in (("run", report["results"]), ("random init (tiny, 16 px)", refs["random_init"]["results"]),
                          ("raw pixels (16 px)", refs["pixels"]["results"])):
        assert [rows[name][f"k-NN k={k} (digits)"] for k in (5, 20)] == [cell(results, 5), cell(results, 20)]
    notes = "\n".join(found["notes"])
    assert "random init (tiny, 16 px), k-NN on digits: shown once, from run/knn-random-init.json" in notes
    assert [t["title"] for t in found["layer_tables"]] == ["By block: 20-NN on digits"]
    assert found["plots"]["layers"]["panels"] == ["5-NN on digits", "20-NN on digits"]
    assert "| k-NN k=5 (digits) | k-NN k=20 (digits) |" in found["markdown"]
