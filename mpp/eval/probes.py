"""Probes of frozen features (linear and k-NN), and the per-class draws they are fit on.

The solver is the ViT paper's few-shot probe (arXiv 2010.11929; big_vision's `fewshot_lsr.py`): a
regularised least-squares classifier to {-1,+1} one-hot targets, solved in closed form, every l2 of
a grid from one eigendecomposition. On top of it: the few-shot draw (`sample_shots`), and the linear
probe on all the training data with its l2 chosen on a stratified dev split (`linear_probe`). Every
per-class draw (shots, dev splits, fine-tuning's labelled subsets) is one `stratified_split`.
Beside it, DINO's weighted k-NN classifier (`knn_probe`, `knn_probe_grid`; facebookresearch/dino
`eval_knn.py`), searched in chunks so that a million training features fit.
Inputs are numpy arrays or torch tensors; features are [n, d], labels [n].
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from mpp.core.errors import TooFewImages, TooFewShots, UsageError

BIAS = 100.0  # the constant feature: large, so the bias weight is (almost) not regularised
# Wide enough to span "almost unregularised" to "class-mean classifier" on standardised features.
DEFAULT_L2S = tuple(2.0**k for k in range(-4, 16, 2))  # 2^-4 .. 2^14
DEV_SEED = 0  # the dev split is fixed: every model is selected on the same held-out images
DEV_SPLIT_NEEDS = "the dev split needs one to hold out and one to fit on"  # why a class needs 2 images
# Two draws of the same law (a uniform subset without replacement) that consume the generator
# differently. Both stay: committed results were drawn with each (few-shot and probe tables with
# "choice", fine-tuning's labelled subsets with "permutation"), and a seed must keep naming its draw.
DRAWS = {
    "choice": lambda rng, pool, n: rng.choice(pool, size=n, replace=False),  # Generator.choice
    "permutation": lambda rng, pool, n: rng.permutation(pool)[:n],  # the head of Generator.permutation
}


def as_f64(x) -> np.ndarray:  # torch or numpy -> float64 numpy
    return np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=np.float64)


def as_labels(y) -> np.ndarray:  # torch or numpy -> int64 numpy [n]
    return np.asarray(y.detach().cpu().numpy() if torch.is_tensor(y) else y).astype(np.int64).reshape(-1)


def lsr_predict(train_x, train_y, test_x, l2s, num_classes: int | None = None) -> dict[float, np.ndarray]:
    """Predicted test classes for each l2, from ONE eigendecomposition (the only copy of the math)."""
    x, xt, y = as_f64(train_x), as_f64(test_x), as_labels(train_y)  # (n, d), (m, d), (n,)
    if x.ndim != 2 or xt.ndim != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y) or not len(x):
        raise UsageError(f"few-shot probe got train features {x.shape}, labels {y.shape}, test features {xt.shape}: "
                         "pass non-empty [n, d] features with one label each and the same d for train and test")
    mean, std = x.mean(0), x.std(0) + 1e-5  # train statistics only: the test set never shapes the probe
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS)], 1)  # (n, d+1)
    xt = np.concatenate([(xt - mean) / std, np.full((len(xt), 1), BIAS)], 1)  # (m, d+1)
    k = int(num_classes or y.max() + 1)
    targets = 2.0 * np.eye(k)[y] - 1.0  # (n, K) one-hot in {-1, +1}
    # w = (XᵀX + l2·I)⁻¹ Xᵀy = Xᵀ(XXᵀ + l2·I)⁻¹ y; decompose the smaller Gram matrix once and
    # every l2 is then a diagonal rescaling.
    if len(x) >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)  # (d+1,), (d+1, d+1)
        rhs, lhs = q.T @ (x.T @ targets), q  # (d+1, K), (d+1, d+1)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)  # (n,), (n, n)
        rhs, lhs = q.T @ targets, x.T @ q  # (n, K), (d+1, n)
    out = {}
    for l2 in l2s:
        w = (lhs * (1.0 / (eigs + l2))) @ rhs  # (d+1, K)
        out[float(l2)] = (xt @ w).argmax(1)  # (m,)
    return out


def fewshot_probe_grid(train_x, train_y, test_x, test_y, l2s, num_classes: int | None = None) -> dict[float, float]:
    """Test accuracy in [0, 1] for every l2 in `l2s`."""
    y_test = as_labels(test_y)
    k = num_classes or int(max(as_labels(train_y).max(), y_test.max(initial=0))) + 1
    preds = lsr_predict(train_x, train_y, test_x, l2s, num_classes=k)
    return {l2: float((p == y_test).mean()) for l2, p in preds.items()}


def fewshot_probe(train_x, train_y, test_x, test_y, l2: float = 2**10, num_classes: int | None = None) -> float:
    """Test accuracy in [0, 1] of the closed-form least-squares probe fit on (train_x, train_y)."""
    return fewshot_probe_grid(train_x, train_y, test_x, test_y, [l2], num_classes)[float(l2)]


def class_label(c: int, class_names=None) -> str:
    """How an error names class `c`: "class 3", or "class 3 ('cat')" when the names are known."""
    return f"class {c}" + (f" ('{class_names[c]}')" if class_names is not None else "")


def stratified_split(labels, count: int | Callable[[int], int], seed: int, *, need: int | None = None,
                     num_classes: int | None = None, class_names=None, draw: str = "choice",
                     sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest) int64 indices into `labels`: `count` images of every class drawn without
    replacement, and all the others. `count` is a number, or a function of the class's size.

    Classes are 0..num_classes-1 when it is given (so an absent class is an error), else those
    present, drawn in order from one generator seeded `seed` (`draw`: see DRAWS). A class with
    fewer than `need` images (default: its count) raises TooFewImages with the facts (the class, named
    by `class_names` when given; the images it has; the need). `picked` is sorted, or with sort=False
    in draw order class by class; `rest` is sorted and also holds labels outside the classes drawn."""
    labels = as_labels(labels)
    rng = np.random.default_rng(seed)
    classes = range(num_classes) if num_classes else np.unique(labels)
    picked = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        n = count(len(pool)) if callable(count) else count
        least = n if need is None else need
        if len(pool) < least:
            raise TooFewImages(class_label(c, class_names), len(pool), least)
        picked.append(DRAWS[draw](rng, pool, n))
    picked = np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), picked)  # sorted
    return (np.sort(picked) if sort else picked), rest


def sample_shots(labels, shots: int, seed: int, num_classes: int | None = None, class_names=None) -> np.ndarray:
    """Indices of `shots` examples of every class, drawn without replacement (deterministic per seed),
    in draw order class by class; a class with fewer raises TooFewShots (its facts: the class, the
    images it has, the shots)."""
    try:
        picked, _ = stratified_split(labels, shots, seed, num_classes=num_classes, class_names=class_names,
                                     sort=False)
    except TooFewImages as e:
        raise TooFewShots(e.who, e.have, e.need) from None
    return picked


def stratified_dev_split(labels, dev_fraction: float, seed: int = DEV_SEED, num_classes: int | None = None,
                         class_names=None) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, dev indices), sorted: about `dev_fraction` of every class goes to dev, at least
    one image, and at least one stays to fit on (so every class needs 2 or more images: a class with
    fewer raises TooFewImages, whose fix says why)."""
    if not 0 < dev_fraction <= 0.5:
        raise UsageError(f"--dev-fraction {dev_fraction} is out of range: pass a fraction in (0, 0.5], e.g. 0.1")
    try:
        dev, fit = stratified_split(labels, lambda n: min(n - 1, max(1, int(dev_fraction * n + 0.5))),  # half up
                                    seed, need=2, num_classes=num_classes, class_names=class_names)
    except TooFewImages as e:  # one image can be fit on or held out, not both
        raise TooFewImages(e.who, e.have, e.need, DEV_SPLIT_NEEDS) from None
    return fit, dev


def select_l2(fit_x, fit_y, dev_x, dev_y, l2s, num_classes: int | None = None) -> tuple[float, dict[float, float]]:
    """(chosen l2, dev accuracy per l2): fit on (fit_x, fit_y), score on the dev split only.

    Ties go to the larger l2: with equal evidence, the more regularised probe is the safer bet."""
    dev_accuracy = fewshot_probe_grid(fit_x, fit_y, dev_x, dev_y, l2s, num_classes)  # one eigendecomposition
    chosen = max(dev_accuracy, key=lambda l2: (dev_accuracy[l2], l2))
    return chosen, dev_accuracy


def linear_probe(train_x, train_y, test_x, test_y, l2s=DEFAULT_L2S, dev_fraction: float = 0.1,
                 num_classes: int | None = None, class_names=None, seed: int = DEV_SEED) -> dict:
    """The linear-probe protocol on features: {"l2_grid", "dev_accuracy" {l2: acc}, "l2", "accuracy",
    "train_size", "dev_size", "test_size"}, accuracies in [0, 1]. The l2 is chosen on a stratified dev
    split of the training features, never on test; the test features enter only the final scoring."""
    l2s = list(dict.fromkeys(float(v) for v in l2s))  # dedupe, keep the order
    if not l2s or min(l2s) <= 0:
        raise UsageError(f"--l2 {l2s} is out of range: pass positive penalties, e.g. --l2 1 64 1024")
    train_y, test_y = as_labels(train_y), as_labels(test_y)  # (n,), (m,)
    k = num_classes or int(max(train_y.max(), test_y.max(initial=0))) + 1
    fit, dev = stratified_dev_split(train_y, dev_fraction, seed, num_classes, class_names)  # (n - n_dev,), (n_dev,)
    chosen, dev_accuracy = select_l2(train_x[fit], train_y[fit], train_x[dev], train_y[dev], l2s, k)
    # Refit on every training image (dev included) with the chosen l2: the dev images were only
    # needed to choose it, and more data makes a better probe.
    accuracy = fewshot_probe_grid(train_x, train_y, test_x, test_y, [chosen], k)[chosen]
    return {"l2_grid": l2s, "dev_accuracy": dev_accuracy, "l2": chosen, "accuracy": accuracy,
            "train_size": len(train_y), "dev_size": len(dev), "test_size": len(test_y)}


def fixed_subset(n: int, cap: int) -> np.ndarray | None:
    """A fixed random `cap` of range(n), sorted to read the split in order; None (all) for cap 0 or >= n."""
    if 0 < cap < n:
        return np.sort(np.random.default_rng(0).permutation(n)[:cap])
    return None


# ---------------------------------------------------------------- weighted k-NN (DINO's protocol)

KNN_CHUNK_FLOATS = 2**24  # 64 MiB of float32: the most any one block of the k-NN search holds


def check_knn(ks, temperature: float, train_size: int) -> list[int]:
    """The k values (deduplicated, in the order given) once each k and the temperature are usable
    with `train_size` training images; else the one-line UsageError."""
    ks = list(dict.fromkeys(ks))
    if not ks:
        raise UsageError("k-NN got no k: pass --k with at least one number of neighbours, e.g. --k 10 20")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise UsageError(f"k-NN k={k} is out of range: pass --k as whole numbers of at least 1, e.g. --k 10 20")
        if k > train_size:
            raise UsageError(f"k-NN with k={k} needs at least {k} training images, but it has {train_size}: "
                             f"pass a --k of at most {train_size} (or more training images: "
                             "a larger --max-train or dataset)")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise UsageError(f"k-NN temperature {temperature} is not a finite number > 0: pass e.g. --temperature 0.07")
    return [int(k) for k in ks]


def knn_chunks(test_size: int, train_size: int, dim: int, k: int, classes: int,
               budget: int = KNN_CHUNK_FLOATS) -> tuple[int, int]:
    """(test rows, training rows) of one block of the search, so that each array it holds at once
    (the similarities and the running top-k with their indices, a float32 copy of the training
    rows, the test rows, the votes) is at most about `budget` floats, whatever the sizes."""
    train_rows = max(1, min(train_size, budget // max(dim, 1)))
    per_test_row = train_rows + 8 * k + 2 * classes  # similarities; top-k values + int64 indices, twice; float64 votes
    test_rows = max(1, min(test_size, budget // per_test_row, budget // max(dim, 1)))
    return test_rows, train_rows


def as_rows(x) -> torch.Tensor:
    """Features as a CPU tensor, without a copy where one is not needed (its dtype is kept: the search
    converts one chunk at a time, so a large float64 matrix is never copied whole)."""
    return x.detach().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def finite_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """The rows as float32 (a view when they already are), refused when a value is NaN or inf."""
    x = x.to(torch.float32)  # (r, d)
    if not torch.isfinite(x).all():
        raise UsageError(f"the k-NN {what} features are not finite (NaN or inf), so no neighbour is defined: "
                         "probe a checkpoint from before the model diverged, or check the images")
    return x


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / ‖row‖ (r,); a zero row keeps a zero similarity to everything, as under torch's F.normalize."""
    return 1.0 / torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)


def knn_predict(train_x, train_y, test_x, ks, temperature: float = 0.07, num_classes: int | None = None,
                chunks: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """Predicted test classes for every k in `ks`, from ONE search for the max(ks) nearest training
    rows (the only copy of the k-NN math).

    DINO's weighted vote: features L2-normalised, cosine similarity, each of a test row's k most
    similar training rows votes for its class with weight exp(similarity / temperature), the class
    with the largest sum wins (a tie: the lower class number). The weights leave out each row's
    common factor exp(top similarity / temperature), which changes no argmax and keeps a small
    temperature from overflowing. Test rows are taken `chunks[0]` at a time against `chunks[1]`
    training rows at a time, a running top-k merged over the training chunks (default: knn_chunks)."""
    x, xt, y = as_rows(train_x), as_rows(test_x), torch.as_tensor(as_labels(train_y))  # (n, d), (m, d), (n,)
    if x.ndim != 2 or xt.ndim != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y) or not len(x) or not len(xt) \
            or not x.shape[1]:
        raise UsageError(f"k-NN probe got train features {tuple(x.shape)}, labels {tuple(y.shape)}, test features "
                         f"{tuple(xt.shape)}: pass non-empty [n, d] features with one label each and the same d")
    ks = check_knn(ks, temperature, len(x))
    classes = int(num_classes or y.max() + 1)
    if y.min() < 0 or y.max() >= classes:
        raise UsageError(f"k-NN train labels run {int(y.min())}..{int(y.max())}, outside the classes 0..{classes - 1}: "
                         "pass labels that are class numbers (and num_classes above the largest)")
    kmax = max(ks)
    test_rows, train_rows = chunks or knn_chunks(len(xt), len(x), x.shape[1], kmax, classes)
    # One pass for the training rows' norms (n floats) and the finiteness check: the chunks below
    # are then scaled after the product, with no normalised copy of the training matrix.
    inverse = torch.cat([inverse_norms(finite_rows(x[a:a + train_rows], "train"))
                         for a in range(0, len(x), train_rows)])  # (n,)
    out = {k: np.empty(len(xt), dtype=np.int64) for k in ks}
    for i in range(0, len(xt), test_rows):
        query = finite_rows(xt[i:i + test_rows], "test")  # (t, d)
        query = query * inverse_norms(query)[:, None]  # unit rows
        best_s, best_i = query.new_empty(len(query), 0), torch.empty(len(query), 0, dtype=torch.int64)  # (t, ≤kmax)
        for a in range(0, len(x), train_rows):
            sims = query @ x[a:a + train_rows].to(torch.float32).T  # (t, r)
            sims *= inverse[a:a + train_rows]  # cosine similarities
            top_s, top_i = sims.topk(min(kmax, sims.shape[1]), dim=1)  # (t, ≤kmax)
            merged_s, merged_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + a], 1)  # (t, ≤2·kmax)
            best_s, picked = merged_s.topk(min(kmax, merged_s.shape[1]), dim=1)  # sorted, most similar first
            best_i = merged_i.gather(1, picked)
        weights = ((best_s.double() - best_s[:, :1].double()) / temperature).exp()  # (t, kmax), in (0, 1]
        labels = y[best_i]  # (t, kmax)
        votes = torch.zeros(len(query), classes, dtype=torch.float64)  # (t, C)
        done = 0
        for k in sorted(ks):  # the neighbours of a smaller k are the first of a larger one's
            votes.scatter_add_(1, labels[:, done:k], weights[:, done:k])
            done = k
            out[k][i:i + len(query)] = votes.argmax(1).numpy()
    return {k: out[k] for k in ks}


def knn_probe_grid(train_x, train_y, test_x, test_y, ks=(10, 20), temperature: float = 0.07,
                   num_classes: int | None = None, chunks: tuple[int, int] | None = None) -> dict[int, float]:
    """Test accuracy in [0, 1] of the weighted k-NN classifier for every k in `ks` (one neighbour search)."""
    xt, y_test = as_rows(test_x), as_labels(test_y)  # (m, d), (m,)
    if xt.ndim == 2 and len(y_test) != len(xt):  # another shape: knn_predict says what it got
        raise UsageError(f"k-NN probe got {len(xt)} test features and {len(y_test)} test labels: "
                         "pass one label per test row")
    preds = knn_predict(train_x, train_y, xt, ks, temperature, num_classes, chunks)
    return {k: float((p == y_test).mean()) for k, p in preds.items()}


def knn_probe(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
              num_classes: int | None = None) -> float:
    """Test accuracy in [0, 1] of DINO's weighted k-NN classifier (k neighbours, weights exp(cos / temperature))."""
    return knn_probe_grid(train_x, train_y, test_x, test_y, [k], temperature, num_classes)[k]
