"""The comparison's tables from its rows (mpp.report.reports), as data and as markdown.

A table is {"title", "dataset", "columns", "rows" (cells as text), "names"}: the main one has every
run, then the baselines (random init, raw pixels) with a result in it (few-shot, linear probe, a
`k-NN k=<k>` column per k of the k-NN reports, fine-tuning); each few-shot dataset other than the
main one (a transfer check) gets a table of its own.

Runs whose reports have "layers" also get per-block tables (`layer_tables`): one per few-shot
dataset at its largest shot count, one per linear-probe dataset and one per k-NN dataset at its
largest k, a row per (run, feature variant) and its random init, a column per block; they add
"caption" (the best cell per run, the raw-pixels reference) and "best" ({run: {"block", "features",
"accuracy"}}).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mpp.report.entries import Entry, FinetuneEntry, Sweep
from mpp.report.reports import DASH, Row


def pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def main_dataset(rows: list[Row]) -> str | None:
    """The few-shot dataset most rows were evaluated on; ties go to the one most rows trained on
    (a transfer check on a second dataset never displaces the runs' own), then to the first seen."""
    counts = Counter(ds for row in rows for ds in row.fewshot)
    trained = Counter(row.dataset for row in rows)
    return max(counts, key=lambda ds: (counts[ds], trained[ds])) if counts else None


def shot_counts(rows: list[Row], dataset: str) -> list[int]:
    return sorted({k for row in rows if dataset in row.fewshot for k in row.fewshot[dataset].results})


def fewshot_cells(row: Row, dataset: str | None, shots: list[int]) -> list[str]:
    results = row.fewshot[dataset].results if dataset in row.fewshot else {}
    return [pct(results[k].mean, results[k].std) if k in results else DASH for k in shots]


def shared_dataset(entries: list[Entry | FinetuneEntry | None]) -> str | None:
    """The one dataset of a column's results, or None when they differ (each cell then names its own)."""
    found = {e.dataset for e in entries if e}
    return found.pop() if len(found) == 1 else None


def result_cell(entry: Entry | FinetuneEntry | None, shared: str | None, text: str) -> str:
    if entry is None:
        return DASH
    return text if shared else f"{text} ({entry.dataset})"


def finetune_text(entry: FinetuneEntry) -> str:
    lr = f", lr {entry.lr:g}" if isinstance(entry.lr, (int, float)) else ""
    return pct(entry.mean, entry.std) + lr


def knn_cells(row: Row, shared: str | None, ks: list[int]) -> list[str]:
    results = row.knn.results if row.knn else {}
    return [result_cell(row.knn, shared, pct(results[k])) if k in results else DASH for k in ks]


def main_table(runs: list[Row], baselines: list[Row], dataset: str | None) -> dict:
    """Every run, then the baselines with a result in this table."""
    shown = [b for b in baselines if dataset in b.fewshot or b.linear_probe or b.knn]
    rows = runs + shown
    shots = shot_counts(rows, dataset) if dataset else []
    probe_ds = shared_dataset([r.linear_probe for r in rows])
    knn_ds = shared_dataset([r.knn for r in rows])
    ks = sorted({k for r in rows if r.knn for k in r.knn.results})
    tune_ds = shared_dataset([r.finetune for r in rows])
    columns = ["run", "objective", "data", *[f"{k}-shot" for k in shots],
               f"linear probe ({probe_ds})" if probe_ds else "linear probe",
               *[f"k-NN k={k}" + (f" ({knn_ds})" if knn_ds else "") for k in ks],
               f"fine-tune ({tune_ds})" if tune_ds else "fine-tune", "steps", "wall time"]
    cells = [[r.name, r.label, r.dataset or DASH, *fewshot_cells(r, dataset, shots),
              result_cell(r.linear_probe, probe_ds, pct(r.linear_probe.accuracy) if r.linear_probe else ""),
              *knn_cells(r, knn_ds, ks),
              result_cell(r.finetune, tune_ds, finetune_text(r.finetune) if r.finetune else ""),
              f"{r.steps:,}" if isinstance(r.steps, int) else DASH, duration(r.wall_time_s)] for r in rows]
    title = f"Runs (few-shot on {dataset})" if dataset else "Runs"
    return {"title": title, "dataset": dataset, "columns": columns, "rows": cells, "names": [r.name for r in rows]}


def fewshot_table(rows: list[Row], dataset: str) -> dict:
    rows = [r for r in rows if dataset in r.fewshot]
    shots = shot_counts(rows, dataset)
    return {"title": f"Few-shot on {dataset}", "dataset": dataset,
            "columns": ["run", "objective", *[f"{k}-shot" for k in shots]],
            "rows": [[r.name, r.label, *fewshot_cells(r, dataset, shots)] for r in rows],
            "names": [r.name for r in rows]}


def build_tables(runs: list[Row], baselines: list[Row]) -> list[dict]:
    everything = runs + baselines
    main = main_dataset(everything)
    others = list(dict.fromkeys(ds for r in everything for ds in r.fewshot if ds != main))
    return [main_table(runs, baselines, main)] + [fewshot_table(everything, ds) for ds in others]


# ---------------------------------------------------------------- per-block results

@dataclass(frozen=True)
class LayerView:
    """One evaluation of the per-block comparison: few-shot at `shots` on `dataset`, k-NN with `k`
    neighbours, or the linear probe (neither)."""

    probe: str  # fewshot | linear_probe | knn
    dataset: str
    shots: int | None = None
    k: int | None = None

    def title(self) -> str:
        if self.probe == "fewshot":
            return f"{self.shots}-shot on {self.dataset}"
        return f"{self.k}-NN on {self.dataset}" if self.probe == "knn" else f"linear probe on {self.dataset}"


def view_entry(row: Row, view: LayerView) -> Entry | None:
    """The row's shown report entry for this evaluation, or None."""
    if view.probe == "fewshot":
        entry = row.fewshot.get(view.dataset)
    else:
        entry = row.knn if view.probe == "knn" else row.linear_probe
    return entry if entry and entry.dataset == view.dataset else None


def row_layers(row: Row, view: LayerView) -> Sweep | None:
    """The row's per-block sweep (mpp.report.entries.Sweep) for this evaluation, or None."""
    entry = view_entry(row, view)
    return entry.layers if entry else None


def accuracy(result, view: LayerView) -> float | None:
    """A result's accuracy in this evaluation: a few-shot {shots: Score} at the view's shots, a k-NN
    {k: accuracy} at its k, or a probe's ProbeScore (mpp.report.entries)."""
    if result is None:
        return None
    if view.probe == "fewshot":
        return result[view.shots].mean if view.shots in result else None
    return result.get(view.k) if view.probe == "knn" else result.accuracy


def reference_accuracy(row: Row, view: LayerView) -> float | None:
    """A baseline row's own (top-level) accuracy in this evaluation, or None."""
    entry = view_entry(row, view)
    if entry is None:
        return None
    return entry.accuracy if view.probe == "linear_probe" else accuracy(entry.results, view)


def layer_views(runs: list[Row], datasets: list[str | None]) -> list[LayerView]:
    """Every evaluation some run has per-block results for: few-shot datasets in the tables' order
    (`datasets`, then any other) at every shot count, then the linear probe per dataset, then k-NN
    per dataset at every k."""
    shots: dict[str, set] = {}
    for row in runs:
        for ds, entry in row.fewshot.items():
            if entry.layers:
                shots.setdefault(ds, set()).update(k for r in entry.layers.results.values() for k in r)
    order = [d for d in datasets if d in shots] + [d for d in shots if d not in datasets]
    views = [LayerView("fewshot", ds, k) for ds in order for k in sorted(shots[ds])]
    probed = dict.fromkeys(r.linear_probe.dataset for r in runs if r.linear_probe and r.linear_probe.layers)
    ks: dict[str, set] = {}
    for row in runs:
        if row.knn and row.knn.layers:
            ks.setdefault(row.knn.dataset, set()).update(k for r in row.knn.layers.results.values() for k in r)
    return (views + [LayerView("linear_probe", ds) for ds in probed]
            + [LayerView("knn", ds, k=k) for ds, found in ks.items() for k in sorted(found)])


def best_layer(layers: Sweep, view: LayerView) -> dict | None:
    """{"block", "features", "accuracy"} of the sweep's best feature (the first in spec order on a tie)."""
    scored = [(accuracy(layers.results.get(s.name), view), s) for s in layers.specs]
    scored = [(a, s) for a, s in scored if a is not None]
    if not scored:
        return None
    best, spec = max(scored, key=lambda found: found[0])
    return {"block": spec.layer, "features": spec.variant, "accuracy": best}


def layer_table(runs: list[Row], baselines: list[Row], view: LayerView) -> dict:
    """Rows (run × feature variant, then the run's random init) by block; each run's best cell in bold."""
    swept = [(r, layers) for r in runs if (layers := row_layers(r, view))]
    blocks = sorted({b for _, layers in swept for b in layers.blocks})
    cells, best = [], {}
    for row, layers in swept:
        best[row.name] = best_layer(layers, view)
        top = best[row.name]
        for name, results in ((row.name, layers.results), (f"{row.name} (random init)", layers.random_init)):
            if results is None:
                continue
            for var in layers.variants:
                line = [name, var]
                for b in blocks:
                    found = accuracy(results.get(f"{b}/{var}"), view)
                    text = pct(found) if found is not None else DASH
                    bold = top and results is layers.results and (b, var) == (top["block"], top["features"])
                    line.append(f"**{text}**" if bold else text)
                cells.append(line)
    tops = [f"{name} block {b['block']}, {b['features']} ({pct(b['accuracy'])})" for name, b in best.items() if b]
    caption = ["Best per run (in bold): " + "; ".join(tops) + "."] if tops else []
    refs = [(r.name, a) for r in baselines if r.kind == "pixels" and (a := reference_accuracy(r, view)) is not None]
    if refs:
        caption.append("Reference: " + "; ".join(f"{name} {pct(a)}" for name, a in refs) + ".")
    return {"title": f"By block: {view.title()}", "dataset": view.dataset, "probe": view.probe, "shots": view.shots,
            "k": view.k, "columns": ["run", "features", *[f"block {b}" for b in blocks]], "rows": cells,
            "names": [c[0] for c in cells], "caption": " ".join(caption), "best": best}


def layer_tables(runs: list[Row], baselines: list[Row], views: list[LayerView]) -> list[dict]:
    """A per-block table at each few-shot dataset's largest shot count, for each linear-probe dataset
    and at each k-NN dataset's largest k (the views' order)."""
    largest = {(v.probe, v.dataset): v for v in views}  # views are in increasing shots and k
    return [layer_table(runs, baselines, v) for v in largest.values()]


# ---------------------------------------------------------------- markdown

def markdown_table(table: dict) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    caption = [table["caption"]] if table.get("caption") else []
    return "\n".join([f"### {table['title']}", "", line(table["columns"]), line(["---"] * len(table["columns"])),
                      *map(line, table["rows"]), *(["", *caption] if caption else [])])


def render(tables: list[dict], notes: list[str], by_block: list[dict] | None = None) -> str:
    """The comparison's markdown: every table, the per-block tables, the legend, then the notes."""
    parts = [markdown_table(t) for t in [*tables, *(by_block or [])]]
    parts.append("Accuracy in % on the evaluation's test split, mean ± std over seeds; – = no result.")
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"
