"""Every table of results/imagenette/REPORT.md, computed from the records kept beside it.

    python results/imagenette/tables.py            # print every table
    python results/imagenette/tables.py --write    # put them into REPORT.md, between its table markers
    python results/imagenette/tables.py --check    # exit 1 if a table in REPORT.md differs from the files

Sources: runs/<model>/ as `scripts/compare_pretraining.py --keep results/imagenette` copies them
(config, summary, metrics.jsonl, the probe reports; finetune.json in mpp/finetune/, supervised/finetune/
and scratch/). Accuracies in % on Imagenette's 3,925 val images; ± is the population std (ddof=0).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mpp.report.curves import metrics_scalars
from mpp.report.report_tables import pct, read, reference, score, signed, sync, table

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
SHOTS = ("1", "5", "10", "25")
MODELS = {"mpp": "MPP (no labels)", "supervised": "supervised (9,469 labels)",
          "scratch": "from scratch (fine-tuned only)"}
FINETUNE = {"mpp": "mpp/finetune/finetune.json", "supervised": "supervised/finetune/finetune.json",
            "scratch": "scratch/finetune.json"}
PAPER = {"mpp-scratch": 2.0, "supervised-mpp": 4.0}  # points, ViT-B/16 on ImageNet (section 4.6)


def load(path: str) -> dict:
    return read(RUNS / path)


def finetune(model: str) -> dict:
    return load(FINETUNE[model])


def finetune_table() -> str:
    lrs = sorted({lr for m in MODELS for lr in finetune(m)["grid"]}, key=float)
    rows = []
    for model, label in MODELS.items():
        report = finetune(model)
        grid = report["grid"]
        test = report["test_accuracy"]
        rows.append([label, *(pct(grid[lr]["dev_accuracy"]) if lr in grid else "–" for lr in lrs),
                     f"{report['lr']:g}", f"{pct(test['mean'])} ± {pct(test['std'] or 0)}",
                     " / ".join(pct(a) for a in test["per_seed"])])
    return table(["model", *(f"dev, lr {lr}" for lr in lrs), "lr chosen", "val accuracy (3 seeds)",
                  "per seed"], rows)


def seeds(model: str) -> np.ndarray:
    return np.asarray(finetune(model)["test_accuracy"]["per_seed"], dtype=float)


def claims_table() -> str:
    rows = []
    for (high, low), key, claim in ((("mpp", "scratch"), "mpp-scratch", "MPP above scratch"),
                                    (("supervised", "mpp"), "supervised-mpp", "supervised above MPP")):
        a, b = seeds(high), seeds(low)
        apart = a.min() > b.max()
        rows.append([claim, f"+{PAPER[key]:.0f}", signed(a.mean() - b.mean()),
                     f"{pct(a.min())}–{pct(a.max())} vs {pct(b.min())}–{pct(b.max())}",
                     "holds in sign" if a.mean() > b.mean() and apart else
                     ("sign only in the means (the seeds overlap)" if a.mean() > b.mean() else "does not hold")])
    return table(["the paper's claim", "paper (points)", "here: difference of means", "seeds' ranges",
                  "reading (the plan's rule)"], rows)


PROBES = [*(("fewshot.json", k) for k in SHOTS), ("linear-probe.json", None), ("knn.json", "10"), ("knn.json", "20")]


def probe_scores(model: str, feature: str | None = None) -> list[float]:
    """[1/5/10/25-shot, linear probe, 10-NN, 20-NN] of `model`'s headline (None) or one feature."""
    return [score(RUNS / model / name, feature, key) for name, key in PROBES]


def reference_scores(model: str, which: str, feature: str | None = None) -> list[float]:
    """The same columns for a reference of `model`'s reports: "random_init" (or one of its features) or
    "pixels"."""
    return [reference(RUNS / model / name, which, feature, key) for name, key in PROBES]


def draws_std(model: str) -> list[str]:
    fs = load(f"{model}/fewshot.json")
    return [pct(fs["results"][k]["std"]) for k in SHOTS]


COLUMNS = [*(f"{k}-shot" for k in SHOTS), "linear probe", "10-NN", "20-NN"]


def probes_table() -> str:
    rows = [[label, *(f"{pct(v)} ± {s}" for v, s in zip(probe_scores(m)[:4], draws_std(m), strict=True)),
             *map(pct, probe_scores(m)[4:])] for m, label in MODELS.items()]
    rows.append(["random init (same ViT, seed 0)", *map(pct, reference_scores("mpp", "random_init"))])
    rows.append(["raw pixels (64 px as 32×32)", *map(pct, reference_scores("mpp", "pixels"))])
    return table(["model (the paper's feature)", *COLUMNS], rows)


def features(model: str) -> list[str]:
    return load(f"{model}/fewshot.json")["layers"]["features"]


def best_cells(scores: dict[str, list[float]]) -> list[str]:
    """Per column, the best feature's score and name."""
    cells = []
    for j in range(len(COLUMNS)):
        top = max(scores, key=lambda f: scores[f][j])
        cells.append(f"{pct(scores[top][j])} (`{top}`)")
    return cells


def best_table() -> str:
    rows = [[label, *best_cells({f: probe_scores(m, f) for f in features(m)})] for m, label in MODELS.items()]
    randoms = {f: reference_scores("mpp", "random_init", f) for f in features("mpp")}
    rows.append(["random init, its best", *best_cells(randoms)])
    rows.append(["raw pixels", *map(pct, reference_scores("mpp", "pixels"))])
    return table(["model (best of its 24 features, chosen on val)", *COLUMNS], rows)


def pretraining_table() -> str:
    rows = []
    for model in ("mpp", "supervised"):
        summary = load(f"{model}/summary.json")
        held = summary["eval"]
        if model == "mpp":
            metric = f"{pct(held['accuracy'])} (floor {pct(held['floor_accuracy'])})"
        else:
            metric = f"{pct(held['accuracy'])}"
        rows.append([MODELS[model], str(summary["steps"]), f"{summary['wall_time_s'] / 60:.1f} min", metric])
    return table(["pretraining", "steps", "wall time", "held-out metric on val: MPP's pretext accuracy (its "
                  "no-learning floor) / supervised's class accuracy"], rows)


def in_run_table() -> str:
    rows = []
    for model in ("mpp", "supervised"):
        points = metrics_scalars(RUNS / model / "metrics.jsonl")["fewshot/imagenette/25shot"]
        rows.append([MODELS[model], " / ".join(f"{pct(v)}" for _, v in points), " / ".join(str(s) for s, _ in points)])
    return table(["in-run 25-shot (class token, 2,000 val images)", "accuracy", "at steps"], rows)


TABLES = {"finetune": finetune_table, "claims": claims_table, "probes": probes_table, "best": best_table,
          "pretraining": pretraining_table, "in-run": in_run_table}


if __name__ == "__main__":
    sys.exit(sync(TABLES, HERE / "REPORT.md", sys.argv[1:], "python results/imagenette/tables.py"))
