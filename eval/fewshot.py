"""Few-shot linear evaluation of frozen ViT features (the ViT paper's protocol, arXiv 2010.11929).

k images per class are embedded (the final-norm class token, "pre_logits"), and a regularised
least-squares classifier to {-1,+1} one-hot targets is solved in closed form (mpp.probes), as
big_vision's `fewshot_lsr.py`. Usage: `python eval/fewshot.py --run runs/mpp` (add `--random-init`
for the untrained baseline of the same architecture).
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from mpp.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Parser, Range, number_flag
from mpp.data import build_dataset, dataset_name
from mpp.errors import cli_main
from mpp.features import extract_features, is_main_process
from mpp.probe_setup import (
    add_model_flags,
    add_runtime_flags,
    check_flags,
    probe_target,
    save_report,
)
from mpp.probes import fewshot_probe_grid, fixed_subset, sample_shots

STD_KIND = "population (ddof=0) over seeds"


def run_fewshot(vit, dataset_spec: str, image_size: int, shots=(1, 5, 10, 25), seeds: int = 3, l2s=(2**10,),
                batch_size: int = 256, device="cpu", max_test: int = 0, num_workers: int = 0,
                progress: bool = True, features: str = "token") -> dict:
    """Few-shot accuracies of `vit`'s features for every shot count, over seeds 0..seeds-1."""
    shots, l2s = list(dict.fromkeys(int(k) for k in shots)), list(dict.fromkeys(float(v) for v in l2s))  # dedupe
    train_set, info = build_dataset(dataset_spec, "train", image_size, train=False)
    test_set, _ = build_dataset(dataset_spec, "test", image_size, train=False)
    train_labels = train_set.labels().numpy()  # int64 [n]
    picks = {(k, s): sample_shots(train_labels, k, s, info.num_classes, info.class_names)
             for k in shots for s in range(seeds)}
    # Embed each sampled training image once (the union over all cells), not the whole split.
    union = np.unique(np.concatenate(list(picks.values())))
    train_x, train_y = extract_features(vit, train_set, batch_size, device, union, num_workers, progress, "train",
                                        features)
    test_idx = fixed_subset(len(test_set), max_test)
    test_x, test_y = extract_features(vit, test_set, batch_size, device, test_idx, num_workers, progress, "test",
                                      features)

    results = {}
    for k in shots:
        per_seed = []  # one {l2: accuracy} per seed
        for s in range(seeds):
            rows = np.searchsorted(union, picks[k, s])
            per_seed.append(fewshot_probe_grid(train_x[rows], train_y[rows], test_x, test_y, l2s, info.num_classes))
        grid = {f"{l2:.12g}": [acc[l2] for acc in per_seed] for l2 in l2s}  # JSON keys: "1024", "0.1"
        head = grid[f"{l2s[0]:.12g}"]  # the headline is fixed in advance: picking the best l2 would use the test set
        results[str(k)] = {"shots": k, "mean": float(np.mean(head)), "std": float(np.std(head)), "per_seed": head,
                           "l2_grid": {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                                       for key, v in grid.items()}}
    return {"dataset": {"spec": dataset_spec, "image_size": image_size, "num_classes": info.num_classes,
                        "train_size": len(train_set), "test_size": len(test_set), "test_used": len(test_x),
                        "train_embedded": len(union)},
            "shots": list(shots), "seeds": list(range(seeds)), "l2_grid": l2s, "headline_l2": l2s[0],
            "std": STD_KIND, "feature_dim": int(train_x.shape[1]), "results": results}


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    number_flag(p, "--shots", int, AT_LEAST_1, nargs="+", default=[1, 5, 10, 25], help="examples per class (1 5 10 25)")
    number_flag(p, "--seeds", int, Range(1, 1000), default=3, help="few-shot draws per shot count, seeds 0..N-1 (3)")
    number_flag(p, "--l2", float, POSITIVE, nargs="+", default=[2.0**10], help="ridge penalties, the first is the "
                "headline (1024); the others are only reported: choosing by test accuracy would leak the test set")
    number_flag(p, "--max-test", int, NON_NEGATIVE, default=0, metavar="N",
                help="test on a fixed random N images; 0 = all (0)")
    add_runtime_flags(p)
    p.add_argument("--output", metavar="PATH", help="results JSON (default: RUN_DIR/fewshot[-random-init].json)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_flags(args)
    return args


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    target = probe_target(args, "fewshot")
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size = vit.config.image_size
    out = run_fewshot(vit, dataset, image_size, tuple(args.shots), args.seeds, tuple(args.l2), args.batch_size,
                      args.device, args.max_test, args.num_workers, features=args.features)

    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out['feature_dim']}-d features, "
          f"l2={args.l2[0]:g}, {args.seeds} seed(s)")
    print(f"{'shots':>5} | {'accuracy (%)':>15} | per seed")
    for k, r in out["results"].items():
        seeds = " ".join(f"{100 * a:.1f}" for a in r["per_seed"])
        print(f"{k:>5} | {100 * r['mean']:6.2f} ± {100 * r['std']:5.2f} | {seeds}")

    train_cfg = (target.config or {}).get("train", {})
    report = {**target.report_head(args),
              "run_config": {k: train_cfg.get(k) for k in ("objective", "model", "dataset", "image_size", "seed")}
              if target.config else None,
              "model": args.model, "vit": dataclasses.asdict(vit.config), **out}
    scalars = {f"{prefix}/{dataset_name(dataset)}/{k}shot": r["mean"] for k, r in out["results"].items()}
    save_report(target, target.output(args), report, scalars, "fewshot")
    return report


if __name__ == "__main__":
    main()
