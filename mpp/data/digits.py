"""scikit-learn's bundled digits (1797 8×8 greyscale images, 10 classes) and their fixed split, read
without importing scikit-learn.

The digits are every entry point's offline default, so most processes load them; importing sklearn
(which imports scipy) took longer than torch's own import on a 2-core machine. The file is read from
sklearn's package folder as `sklearn.datasets.load_digits` reads it, and the split is the one
`train_test_split(arange(1797), test_size=0.2, stratify=target, random_state=0)` draws, written out
here (StratifiedShuffleSplit's draws on a numpy RandomState); tests/test_data.py checks both against
scikit-learn's own functions.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.2  # the held-out share, stratified by class
SPLIT_SEED = 0  # the same split on every machine: 1437 train / 360 test


def digits_file() -> Path:
    """sklearn/datasets/data/digits.csv.gz, found without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits come with scikit-learn: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 [1797, 8, 8] with values 0..16, target int64 [1797]), as sklearn's load_digits."""
    with gzip.open(digits_file(), "rt") as f:
        data = np.loadtxt(f, delimiter=",")  # float64 [1797, 65]: 64 pixels, then the class
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws proportional to class_counts, the leftover ones given by largest remainder
    (ties broken at random): sklearn.utils._approximate_mode."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_split(target: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a stratified shuffle split: StratifiedShuffleSplit's one split, so
    train_test_split(arange(n), test_size=test_fraction, stratify=target, random_state=seed)."""
    n_test = math.ceil(test_fraction * len(target))
    n_train = len(target) - n_test
    _, y_indices, class_counts = np.unique(target, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train, test = [], []
    for i, count in enumerate(class_counts):
        shuffled = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)
