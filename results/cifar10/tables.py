"""Every table of results/cifar10/REPORT.md, computed from the committed files beside it.

    python results/cifar10/tables.py            # print every table
    python results/cifar10/tables.py --write    # put them into REPORT.md, between its table markers
    python results/cifar10/tables.py --check    # exit 1 if a table in REPORT.md differs from the files
    (--report PATH: another copy of the report, for the test that this check can fail)

Sources: compare.json (the first pipeline run, sections 1-5: its run folders were not kept, so only
what that file holds is reported from it) and runs/<name>/ (sections 6-7: config, summary,
metrics.jsonl and the probe reports of every model, kept by studies.sh), floors/<name>/summary.json
(the no-learning floor of each run's held-out MPP metric, from floors.sh). Accuracies in %, one
decimal; every ± is the population standard deviation (ddof=0), as the probes and fine-tuning write it.
"""
from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np

from mpp.report.curves import metrics_scalars
from mpp.report.report_tables import pct, pm, read, reference, score, signed, sync, table

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
SHOTS = ("1", "5", "10", "25")
SEEDS = ("mpp", "mpp-seed1", "mpp-seed2")
HEADLINE = "6/token+norm"  # the paper's feature: the last block's class token after the final LayerNorm


def load(run: str, name: str) -> dict:
    return read(RUNS / run / name)


# ---- the first pipeline run (sections 1-5): compare.json only ----

def first_run() -> dict:
    data = read(HERE / "compare.json")
    runs = {r["name"]: r for r in data["runs"]}
    merged = {"fewshot": {}, "linear_probe": None}  # one entry per probe report of the random init
    for entry in data["random_init"]:
        merged["fewshot"].update(entry["fewshot"] or {})
        merged["linear_probe"] = entry["linear_probe"] or merged["linear_probe"]
    runs["random init"] = merged
    return runs


def shot_cells(entry: dict | None) -> list[str]:
    if not entry:
        return ["–"] * len(SHOTS)
    return [f"{pct(entry['results'][k]['mean'])} ± {pct(entry['results'][k]['std'])}" for k in SHOTS]


@cache
def first_run_tables() -> dict[str, str]:
    runs = first_run()
    names = {"mpp": "MPP (no labels)", "supervised": "supervised (50k labels)",
             "scratch": "from scratch (5k labels)¹", "random init": "random init"}
    rows, transfer = [], []
    for key, label in names.items():
        r = runs[key]
        ft = r.get("finetune")
        rows.append([label, *shot_cells(r["fewshot"]["cifar10"]), pct(r["linear_probe"]["accuracy"]),
                     f"{pct(ft['mean'])} ± {pct(ft['std'])} (lr {ft['lr']:g})" if ft else "–"])
        transfer.append([label.split(" (")[0], *shot_cells(r["fewshot"].get("imagenette"))])
    variants = {"mpp": "mean colour, 50% (the paper's)", "mpp-4x4": "4×4 downsized, 50%",
                "mpp-l2": "L2 to the pixels, 50%", "mpp-15pct": "mean colour, 15%",
                "random init": "random init (for reference)"}
    ablations = []
    for key, label in variants.items():
        r = runs[key]
        imagenette = "/".join(pct(r["fewshot"]["imagenette"]["results"][k]["mean"]) for k in SHOTS)
        ablations.append([label, *shot_cells(r["fewshot"]["cifar10"]), pct(r["linear_probe"]["accuracy"]),
                          imagenette.replace("/", " / "), f"{r['wall_time_s'] / 60:.1f} min" if r.get("wall_time_s")
                          else "–"])
    shots = [f"{k}-shot" for k in SHOTS]
    return {
        "first-run": table(["model", *shots, "linear probe", "fine-tune (10% labels)"], rows),
        "first-run-transfer": table(["model", *shots], transfer),
        "first-run-ablations": table(["MPP variant", *shots, "linear probe", "Imagenette 1 / 5 / 10 / 25-shot",
                                      "pretraining wall time"], ablations),
    }


# ---- the reruns with the current code (sections 6-7): runs/<name>/ ----

def report(run: str, name: str) -> Path:
    return RUNS / run / name


def layer(feature: str) -> str | None:
    return None if feature == HEADLINE else feature  # the headline is the report's own result


def fewshot(run: str, feature: str = HEADLINE, shots: str = "25", file: str = "fewshot.json") -> float:
    return score(report(run, file), layer(feature), shots)


def random_fewshot(run: str, feature: str = HEADLINE, shots: str = "25", file: str = "fewshot.json") -> float:
    return reference(report(run, file), "random_init", layer(feature), shots)


def linear(run: str, feature: str = HEADLINE) -> float:
    return score(report(run, "linear-probe.json"), layer(feature))


def random_linear(run: str, feature: str = HEADLINE) -> float:
    return reference(report(run, "linear-probe.json"), "random_init", layer(feature))


def pixels(run: str, probe: str, shots: str = "25", file: str = "fewshot.json") -> float:
    if probe == "fewshot":
        return reference(report(run, file), "pixels", key=shots)
    return reference(report(run, "linear-probe.json"), "pixels")


def headline_row(run: str) -> list[float]:
    return [*(fewshot(run, shots=k) for k in SHOTS), linear(run), fewshot(run, file="fewshot-imagenette.json")]


def random_row(run: str) -> list[float]:
    return [*(random_fewshot(run, shots=k) for k in SHOTS), random_linear(run),
            random_fewshot(run, file="fewshot-imagenette.json")]


def pixel_row(run: str) -> list[float]:
    return [*(pixels(run, "fewshot", k) for k in SHOTS), pixels(run, "linear"),
            pixels(run, "fewshot", file="fewshot-imagenette.json")]


def study3() -> str:
    mpp = np.array([headline_row(r) for r in SEEDS])  # (seeds, 6)
    rand = np.array([random_row(r) for r in SEEDS])
    rows = [[f"MPP seed {i}", *map(pct, mpp[i])] for i in range(len(SEEDS))]
    rows.append(["**MPP, mean ± std over seeds**", *(f"**{pm(mpp[:, j])}**" for j in range(mpp.shape[1]))])
    rows.append(["random init (same seeds), mean ± std", *(pm(rand[:, j]) for j in range(rand.shape[1]))])
    diff = mpp - rand
    rows.append(["MPP − random init, paired by seed: mean (min to max)",
                 *(f"{signed(d.mean())} ({signed(d.min())} to {signed(d.max())})" for d in diff.T)])
    rows.append(["raw pixels", *map(pct, pixel_row("mpp"))])
    rows.append(["supervised (seed 0, 50k labels)", *map(pct, headline_row("supervised"))])
    return table(["model", *(f"{k}-shot" for k in SHOTS), "linear probe", "Imagenette 25-shot"], rows)


def features(run: str) -> list[str]:
    return load(run, "fewshot.json")["layers"]["features"]


def study1() -> str:
    chosen = [HEADLINE, "6/token", "1/avg", "3/avg", "5/avg", "6/avg+norm"]
    rows = []
    for feature in chosen:
        cells = []
        for probe in (("fewshot", "25"), ("fewshot", "5"), ("linear", None)):
            if probe[0] == "fewshot":
                m = [fewshot(r, feature, probe[1]) for r in SEEDS]
                d = [a - random_fewshot(r, feature, probe[1]) for a, r in zip(m, SEEDS, strict=True)]
            else:
                m = [linear(r, feature) for r in SEEDS]
                d = [a - random_linear(r, feature) for a, r in zip(m, SEEDS, strict=True)]
            cells.append(f"{pm(m)} ({signed(np.mean(d))})")
        rows.append([f"`{feature}`" + (" (the paper's)" if feature == HEADLINE else ""), *cells])
    best = []
    for probe in (("fewshot", "25"), ("fewshot", "5"), ("linear", None)):
        shots = probe[1]
        means = {f: np.mean([random_fewshot(r, f, shots) if shots else random_linear(r, f) for r in SEEDS])
                 for f in features("mpp")}
        top = max(means, key=means.get)
        best.append(f"{pct(means[top])} (`{top}`)")
    rows.append(["best random-init feature (mean over seeds)", *best])
    rows.append(["raw pixels", pct(pixels("mpp", "fewshot")), pct(pixels("mpp", "fewshot", "5")),
                 pct(pixels("mpp", "linear"))])
    return table(["feature", "25-shot", "5-shot", "linear probe"], rows)


def beats(run: str) -> list[str]:
    """Every (feature, probe) of `run` scoring above both the random init's best feature and the raw pixels."""
    found = []
    feats = features(run)
    for shots in SHOTS:
        bar = max(max(random_fewshot(run, f, shots) for f in feats), pixels(run, "fewshot", shots))
        found += [f"{f} {shots}-shot {pct(fewshot(run, f, shots))} > {pct(bar)}" for f in feats
                  if fewshot(run, f, shots) > bar]
    bar = max(max(random_linear(run, f) for f in feats), pixels(run, "linear"))
    found += [f"{f} linear {pct(linear(run, f))} > {pct(bar)}" for f in feats if linear(run, f) > bar]
    return found


FLOOR_FILE = HERE / "floors"


def held_out(run: str) -> str:
    """The run's held-out MPP metric beside its no-learning floor (floors/<run>/summary.json)."""
    metrics = load(run, "summary.json")["eval"]
    name = "mse" if "mse" in metrics else "accuracy"
    floor_file = FLOOR_FILE / run / "summary.json"
    floor = read(floor_file)["eval"].get(f"floor_{name}") if floor_file.is_file() else None
    if name == "mse":
        return f"mse {metrics['mse']:.4f} (floor {floor:.4f})" if floor is not None else f"mse {metrics['mse']:.4f}"
    return f"{pct(metrics['accuracy'])} (floor {pct(floor)})" if floor is not None else pct(metrics["accuracy"])


def best_linear(run: str) -> str:
    scores = {f: linear(run, f) for f in features(run)}
    top = max(scores, key=scores.get)
    return f"{pct(scores[top])} (`{top}`)"


def ablations() -> str:
    names = {"mpp": "mean colour, 50%: seed 0", "mpp-seed1": "mean colour, 50%: seed 1",
             "mpp-seed2": "mean colour, 50%: seed 2", "mpp-4x4": "4×4 downsized, 50%",
             "mpp-l2": "L2 to the pixels, 50%", "mpp-15pct": "mean colour, 15%"}
    rows = [[label, *map(pct, headline_row(run)), best_linear(run), held_out(run)] for run, label in names.items()]
    rows.append(["random init (seed 0)", *map(pct, random_row("mpp")), "–", "–"])
    return table(["MPP variant", *(f"{k}-shot" for k in SHOTS), "linear probe", "Imagenette 25-shot",
                  "best linear-probe feature", "held-out MPP metric (its floor)"], rows)


def in_run(run: str, tag: str) -> list[tuple[int, float]]:
    return metrics_scalars(RUNS / run / "metrics.jsonl")[tag]


def in_run_table() -> str:
    rows = []
    for run, label in (("mpp", "MPP seed 0"), ("mpp-seed1", "MPP seed 1"), ("mpp-seed2", "MPP seed 2"),
                       ("supervised", "supervised")):
        rows.append([label, *(" / ".join(pct(v) for _, v in in_run(run, f"fewshot/{d}/25shot"))
                              for d in ("cifar10", "imagenette"))])
    return table(["run", "CIFAR-10", "Imagenette (transfer)"], rows)


def study2() -> str:
    rows = [["MPP, 4 epochs", *map(pct, headline_row("mpp"))],
            ["**MPP, 20 epochs**", *(f"**{pct(v)}**" for v in headline_row("mpp-long"))],
            ["supervised, 4 epochs", *map(pct, headline_row("supervised"))],
            ["supervised, 20 epochs", *map(pct, headline_row("supervised-long"))],
            ["random init", *map(pct, random_row("mpp"))],
            ["raw pixels", *map(pct, pixel_row("mpp"))]]
    return table(["model", *(f"{k}-shot" for k in SHOTS), "linear probe", "Imagenette 25-shot"], rows)


def study2_block1() -> str:
    rows = []
    for run, label in (("mpp", "MPP, 4 epochs (seed 0)"), ("mpp-long", "MPP, 20 epochs (seed 0)")):
        rows.append([label, *(pct(fewshot(run, "1/avg", k)) for k in SHOTS), pct(linear(run, "1/avg"))])
    rows.append(["random init, `1/avg`", *(pct(random_fewshot("mpp", "1/avg", k)) for k in SHOTS),
                 pct(random_linear("mpp", "1/avg"))])
    rows.append(["random init, its best feature", *(pct(max(random_fewshot("mpp", f, k) for f in features("mpp")))
                                                    for k in SHOTS),
                 pct(max(random_linear("mpp", f) for f in features("mpp")))])
    rows.append(["raw pixels", *(pct(pixels("mpp", "fewshot", k)) for k in SHOTS), pct(pixels("mpp", "linear"))])
    return table(["`1/avg` (block 1, mean patch token)", *(f"{k}-shot" for k in SHOTS), "linear probe"], rows)


PREREG, PREREG_FEATURE, MARGIN = "mpp-prereg", "1/avg", 0.02  # REPORT.md section 7, fixed before the run


PREREG_PROBES = {"10": ("fewshot.json", "10"), "25": ("fewshot.json", "25"), "linear": ("linear-probe.json", None),
                 "knn": ("knn.json", "20")}  # the criterion's four: (report, shots or k)


def prereg_scores(probe: str) -> tuple[float, float, str, float, str]:
    """(the fixed feature's score, the random init's best, its feature, the pixels, the draws' spread)."""
    name, key = PREREG_PROBES[probe]
    path = report(PREREG, name)
    rand = {f: reference(path, "random_init", f, key) for f in read(path)["layers"]["random_init"]}
    spread = f"± {pct(read(path)['layers']['results'][PREREG_FEATURE][key]['std'])}" if name == "fewshot.json" else "–"
    return (score(path, PREREG_FEATURE, key), *max((v, f) for f, v in rand.items()),
            reference(path, "pixels", key=key), spread)


def prereg() -> str:
    header = ["probe", f"`{PREREG_FEATURE}`", "draws' std", "random init's best (feature)", "raw pixels",
              "margin over the larger", "criterion (≥ +2.0)"]
    if not all((RUNS / PREREG / f).is_file() for f in ("fewshot.json", "linear-probe.json", "knn.json")):
        return table(header, [["not finished", *["–"] * (len(header) - 1)]])
    rows = []
    for probe, label in (("10", "few-shot, 10 shots"), ("25", "few-shot, 25 shots"), ("linear", "linear probe"),
                         ("knn", "k-NN, k = 20")):
        score, rand, feature, pix, spread = prereg_scores(probe)
        margin = score - max(rand, pix)
        rows.append([label, pct(score), spread, f"{pct(rand)} (`{feature}`)", pct(pix), signed(margin),
                     "met" if round(margin - MARGIN, 9) >= 0 else "**not met**"])
    return table(header, rows)


TABLES = {
    **{name: (lambda n=name: first_run_tables()[n]) for name in ("first-run", "first-run-transfer",
                                                                 "first-run-ablations")},
    "study3": study3, "study1": study1, "ablations": ablations, "in-run": in_run_table, "study2": study2,
    "study2-block1": study2_block1, "prereg": prereg,
}
def main(argv: list[str]) -> int:
    if not argv:
        for run in (*SEEDS, "mpp-4x4", "mpp-l2", "mpp-15pct", "mpp-long"):
            print(f"{run}: above both the random init's best feature and the pixels: {beats(run) or 'none'}")
    return sync(TABLES, HERE / "REPORT.md", argv, "python results/cifar10/tables.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
