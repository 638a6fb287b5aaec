"""Linear probe on all the training data of frozen ViT features, with l2 chosen on a dev split.

The protocol: embed the whole train and test splits (eval transform, the final-norm class token,
"pre_logits"); hold out a stratified dev split of the training features (`--dev-fraction`, seed 0);
fit the closed-form regularised least-squares probe of eval/fewshot.py on the rest for every l2 of
a grid (one eigendecomposition); keep the l2 with the best dev accuracy (ties: the larger l2); refit
on all the training features with it; score the test split once. The l2 is chosen on dev, never on
test: picking it by test accuracy would make the reported number an optimistic, tuned-on-test one.
Usage: `python eval/linear_probe.py --run runs/mpp` (add `--random-init` for the untrained baseline).
The few-shot protocol, with its l2 fixed in advance, stays in eval/fewshot.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from eval.fewshot import (
    _labels,
    add_model_flags,
    add_runtime_flags,
    check_flags,
    dataset_labels,
    dataset_name,
    extract_features,
    fewshot_probe_grid,
    is_main_process,
    probe_target,
    save_report,
)
from mpp.config import NON_NEGATIVE, POSITIVE, Parser, Range, number_flag
from mpp.data import build_dataset
from mpp.errors import UsageError, cli_main

# Wide enough to span "almost unregularised" to "class-mean classifier" on standardised features.
DEFAULT_L2S = tuple(2.0**k for k in range(-4, 16, 2))  # 2^-4 .. 2^14
DEV_SEED = 0  # the dev split is fixed: every model is selected on the same held-out images


def stratified_dev_split(labels, dev_fraction: float, seed: int = DEV_SEED, num_classes: int | None = None,
                         class_names=None) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, dev indices), sorted: about `dev_fraction` of every class goes to dev, at least
    one image, and at least one stays to fit on (so every class needs 2 or more images)."""
    if not 0 < dev_fraction <= 0.5:
        raise UsageError(f"--dev-fraction {dev_fraction} is out of range: pass a fraction in (0, 0.5], e.g. 0.1")
    labels = _labels(labels)
    rng = np.random.default_rng(seed)
    classes = range(num_classes) if num_classes else np.unique(labels)
    dev = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < 2:  # one image can be fit on or held out, not both
            name = f" ('{class_names[c]}')" if class_names is not None else ""
            raise UsageError(f"class {c}{name} has {len(pool)} training images, fewer than 2: the dev split needs one "
                             "to hold out and one to fit on; pass a larger --max-train or a dataset with more images")
        n_dev = min(len(pool) - 1, max(1, int(dev_fraction * len(pool) + 0.5)))  # rounded half up
        dev.append(rng.choice(pool, size=n_dev, replace=False))
    dev = np.sort(np.concatenate(dev)).astype(np.int64)
    fit = np.setdiff1d(np.arange(len(labels)), dev)  # sorted; classes outside `classes` stay in fit
    return fit, dev


def select_l2(fit_x, fit_y, dev_x, dev_y, l2s, num_classes: int | None = None) -> tuple[float, dict[float, float]]:
    """(chosen l2, dev accuracy per l2): fit on (fit_x, fit_y), score on the dev split only.

    Ties go to the larger l2: with equal evidence, the more regularised probe is the safer bet."""
    dev_accuracy = fewshot_probe_grid(fit_x, fit_y, dev_x, dev_y, l2s, num_classes)  # one eigendecomposition
    chosen = max(dev_accuracy, key=lambda l2: (dev_accuracy[l2], l2))
    return chosen, dev_accuracy


def linear_probe(train_x, train_y, test_x, test_y, l2s=DEFAULT_L2S, dev_fraction: float = 0.1,
                 num_classes: int | None = None, class_names=None, seed: int = DEV_SEED) -> dict:
    """The protocol on features: {"l2_grid", "dev_accuracy" {l2: acc}, "l2", "accuracy", "train_size",
    "dev_size", "test_size"}, accuracies in [0, 1]. The test features enter only the final scoring."""
    l2s = list(dict.fromkeys(float(v) for v in l2s))  # dedupe, keep the order
    if not l2s or min(l2s) <= 0:
        raise UsageError(f"--l2 {l2s} is out of range: pass positive penalties, e.g. --l2 1 64 1024")
    train_y, test_y = _labels(train_y), _labels(test_y)  # (n,), (m,)
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


def run_linear_probe(vit, dataset_spec: str, image_size: int, l2s=DEFAULT_L2S, dev_fraction: float = 0.1,
                     batch_size: int = 256, device="cpu", max_train: int = 0, max_test: int = 0,
                     num_workers: int = 0, progress: bool = True, features: str = "token") -> dict:
    """The linear probe of `vit`'s features on `dataset_spec`: the report's data part (see main)."""
    train_set, info = build_dataset(dataset_spec, "train", image_size, train=False)
    test_set, _ = build_dataset(dataset_spec, "test", image_size, train=False)
    train_idx, test_idx = fixed_subset(len(train_set), max_train), fixed_subset(len(test_set), max_test)
    labels = dataset_labels(train_set)
    # The same split linear_probe draws below, drawn here once on the labels alone so that a class
    # too small for it stops the run before the (long) embedding.
    stratified_dev_split(labels if train_idx is None else labels[train_idx], dev_fraction,
                         num_classes=info.num_classes, class_names=info.class_names)
    train_x, train_y = extract_features(vit, train_set, batch_size, device, train_idx, num_workers, progress, "train",
                                        features)
    test_x, test_y = extract_features(vit, test_set, batch_size, device, test_idx, num_workers, progress, "test",
                                      features)
    out = linear_probe(train_x, train_y, test_x, test_y, l2s, dev_fraction, info.num_classes, info.class_names)
    return {"dataset": {"spec": dataset_spec, "image_size": image_size, "num_classes": info.num_classes,
                        "train_size": out["train_size"], "dev_size": out["dev_size"], "test_size": out["test_size"]},
            "feature_dim": int(train_x.shape[1]), "l2_grid": out["l2_grid"],
            "dev_accuracy": {f"{l2:.12g}": acc for l2, acc in out["dev_accuracy"].items()},  # JSON keys: "1024", "0.0625"
            "l2": out["l2"], "accuracy": out["accuracy"]}


def check_writable(output: Path) -> None:
    """Fail before the embedding, not after it, when the results cannot be written."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write '{output}' ({e.strerror}): pass a writable --output") from e
    if output.is_dir() or not os.access(output.parent, os.W_OK):
        problem = "is a directory" if output.is_dir() else "is in a read-only folder"
        raise UsageError(f"cannot write '{output}' ({problem}): pass a writable --output")


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    number_flag(p, "--l2", float, POSITIVE, nargs="+", default=list(DEFAULT_L2S),
                help="ridge penalties to choose from on the dev split (2^-4, 2^-2, ..., 2^14)")
    number_flag(p, "--dev-fraction", float, Range(0, 0.5, low_open=True), default=0.1, metavar="F",
                help="fraction of each class's training images held out to choose l2, in (0, 0.5] (0.1)")
    number_flag(p, "--max-train", int, NON_NEGATIVE, default=0, metavar="N",
                help="use a fixed random N training images; 0 = all (0)")
    number_flag(p, "--max-test", int, NON_NEGATIVE, default=0, metavar="N",
                help="test on a fixed random N images; 0 = all (0)")
    add_runtime_flags(p)
    p.add_argument("--output", metavar="PATH",
                   help="results JSON (default: RUN_DIR/linear-probe[-random-init].json)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_flags(args)
    return args


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    target = probe_target(args, "linear_probe")
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size = vit.config.image_size
    output = target.output(args)
    check_writable(output)
    out = run_linear_probe(vit, dataset, image_size, tuple(args.l2), args.dev_fraction, args.batch_size,
                           args.device, args.max_train, args.max_test, args.num_workers, features=args.features)

    data = out["dataset"]
    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out['feature_dim']}-d features, "
          f"{data['train_size'] - data['dev_size']} fit + {data['dev_size']} dev training images, "
          f"{data['test_size']} test images")
    print(f"{'l2':>10} | dev accuracy (%)")
    for l2 in out["l2_grid"]:
        mark = "  <- chosen" if l2 == out["l2"] else ""
        print(f"{l2:>10.6g} | {100 * out['dev_accuracy'][f'{l2:.12g}']:6.2f}{mark}")
    print(f"l2 = {out['l2']:.12g} (best on dev), refit on all {data['train_size']} training images: "
          f"test accuracy {100 * out['accuracy']:.2f}%")
    if len(out["l2_grid"]) > 1 and out["l2"] in (min(out["l2_grid"]), max(out["l2_grid"])):
        # The dev optimum may lie beyond the grid: say so rather than silently report a clipped choice.
        edge = "smallest" if out["l2"] == min(out["l2_grid"]) else "largest"
        print(f"note: the chosen l2 is the grid's {edge}; a wider --l2 grid may do better on dev")

    report = {**target.report_head(args), **out, "vit": dataclasses.asdict(vit.config)}
    save_report(target, output, report, {f"{prefix}/{dataset_name(dataset)}": out["accuracy"]}, "linear_probe")
    return report


if __name__ == "__main__":
    main()
