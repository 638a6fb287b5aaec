"""The comparison's tables from its rows (mpp.reports), as data and as markdown.

A table is {"title", "dataset", "columns", "rows" (cells as text), "names"}: the main one has every
run, then the random-init baselines with a result in it; each few-shot dataset other than the main
one (a transfer check) gets a table of its own.
"""
from __future__ import annotations

from collections import Counter

from mpp.reports import DASH, Row


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
    return sorted({k for row in rows if dataset in row.fewshot for k in row.fewshot[dataset]["results"]})


def fewshot_cells(row: Row, dataset: str | None, shots: list[int]) -> list[str]:
    results = row.fewshot[dataset]["results"] if dataset in row.fewshot else {}
    return [pct(results[k]["mean"], results[k]["std"]) if k in results else DASH for k in shots]


def shared_dataset(entries: list[dict | None]) -> str | None:
    """The one dataset of a column's results, or None when they differ (each cell then names its own)."""
    found = {e["dataset"] for e in entries if e}
    return found.pop() if len(found) == 1 else None


def result_cell(entry: dict | None, shared: str | None, text: str) -> str:
    if entry is None:
        return DASH
    return text if shared else f"{text} ({entry['dataset']})"


def finetune_text(entry: dict) -> str:
    lr = f", lr {entry['lr']:g}" if isinstance(entry.get("lr"), (int, float)) else ""
    return pct(entry["mean"], entry["std"]) + lr


def main_table(runs: list[Row], baselines: list[Row], dataset: str | None) -> dict:
    """Every run, then the baselines with a result in this table."""
    shown = [b for b in baselines if dataset in b.fewshot or b.linear_probe]
    rows = runs + shown
    shots = shot_counts(rows, dataset) if dataset else []
    probe_ds = shared_dataset([r.linear_probe for r in rows])
    tune_ds = shared_dataset([r.finetune for r in rows])
    columns = ["run", "objective", "data", *[f"{k}-shot" for k in shots],
               f"linear probe ({probe_ds})" if probe_ds else "linear probe",
               f"fine-tune ({tune_ds})" if tune_ds else "fine-tune", "steps", "wall time"]
    cells = [[r.name, r.label, r.dataset or DASH, *fewshot_cells(r, dataset, shots),
              result_cell(r.linear_probe, probe_ds, pct(r.linear_probe["accuracy"]) if r.linear_probe else ""),
              result_cell(r.finetune, tune_ds, finetune_text(r.finetune) if r.finetune else ""),
              f"{r.steps:,}" if isinstance(r.steps, int) else DASH, duration(r.wall_time_s)] for r in rows]
    title = f"Runs (few-shot on {dataset})" if dataset else "Runs"
    return {"title": title, "dataset": dataset, "columns": columns, "rows": cells, "names": [r.name for r in rows]}


def fewshot_table(rows: list[Row], dataset: str) -> dict:
    rows = [r for r in rows if dataset in r.fewshot]
    shots = shot_counts(rows, dataset)
    return {"title": f"Few-shot on {dataset}", "dataset": dataset, "columns": ["run", "objective", *[f"{k}-shot" for k in shots]],
            "rows": [[r.name, r.label, *fewshot_cells(r, dataset, shots)] for r in rows], "names": [r.name for r in rows]}


def build_tables(runs: list[Row], baselines: list[Row]) -> list[dict]:
    everything = runs + baselines
    main = main_dataset(everything)
    others = list(dict.fromkeys(ds for r in everything for ds in r.fewshot if ds != main))
    return [main_table(runs, baselines, main)] + [fewshot_table(everything, ds) for ds in others]


def markdown_table(table: dict) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([f"### {table['title']}", "", line(table["columns"]), line(["---"] * len(table["columns"])),
                      *map(line, table["rows"])])


def render(tables: list[dict], notes: list[str]) -> str:
    """The comparison's markdown: every table, the legend, then the notes."""
    parts = [markdown_table(t) for t in tables]
    parts.append("Accuracy in % on the evaluation's test split, mean ± std over seeds; – = no result.")
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"
