"""Weighted k-NN (DINO's protocol): the chunked search against scikit-learn's neighbours and an explicit
vote, its bounds and one-line errors."""
import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from mpp import probes
from mpp.errors import UsageError
from mpp.probes import knn_chunks, knn_predict, knn_probe, knn_probe_grid


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
    for dist, idx in zip(distances, neighbours):
        votes = np.zeros(classes)
        for d, j in zip(dist, idx):
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
