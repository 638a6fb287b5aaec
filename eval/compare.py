"""Compare runs: one table, plots, and one TensorBoard view of several run directories.

    python eval/compare.py runs/cifar10-cpu/mpp runs/cifar10-cpu/supervised [--output DIR] [--names A B]

In Python: `from eval.compare import compare; report = compare(run_dirs, output_dir, names=None)`.

What a run directory may hold (each piece is optional, but a run needs config.json or at least one
result): config.json and summary.json (scripts/pretrain_*.py), metrics.jsonl and tensorboard/
(training curves), fewshot*.json (eval/fewshot.py, any dataset), linear-probe*.json, finetune.json
(in the run itself or in RUN/finetune*/) and checkpoints/ckpt-<step>.pt.

Output (DIR, default `<common parent of the runs>/compare`, so that one `tensorboard --logdir
<common parent>` shows the runs and the comparison together):

- `compare.md` (also printed) and `compare.json` (the same data, raw numbers). Layout:
  * **Runs**: one row per run: objective (`mpp (mean_color, 50%)`, `supervised`,
    `finetune (scratch)`), training data, few-shot accuracy on the *main* few-shot dataset (the one
    most rows were evaluated on) at every shot count any row has, linear-probe accuracy, fine-tune
    accuracy with its chosen lr, steps and wall time. Then one "random init (<arch>)" row per
    architecture and evaluation dataset found in fewshot-random-init / linear-probe-random-init
    reports: runs that share both show it once.
  * **Few-shot on <dataset>**: one more table per other few-shot dataset (a transfer check such as
    `fewshot-imagenette.json`), with the rows evaluated on it.
  * Accuracies are % on the evaluation's test split, `mean ± std` over seeds; `–` marks a missing
    result. A linear-probe or fine-tune column names its dataset in the header when all rows share
    one, else in each cell. Notes below the tables say which file was shown when a run has several.
- `fewshot.png`: accuracy vs shots (log x, error bars = std), one panel per dataset.
- `curves.png`: train/loss and eval/* scalars read back from each run's TensorBoard events
  (a fine-tune directory's seed-0 training; metrics.jsonl when a run has no events), one panel per
  tag and loss scale (MPP target, supervised, finetune): the objectives' losses are not comparable.
- `pos_embed-<run>.png`: the paper's Figure 7 for each run with a checkpoint: the cosine
  similarity of every patch's position embedding with every other patch's, an h×w grid of h×w
  tiles (tile (i, j) is patch (i, j) against all patches).
- `tensorboard/`: the markdown table as TensorBoard text.

Plots are drawn on matplotlib `Figure`s (Agg), never through pyplot, so calling `compare` from
another program leaves its matplotlib backend alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mpp import checkpoint as ckpt_io
from mpp.config import Parser
from mpp.data import dataset_name
from mpp.errors import UsageError, cli_main
from mpp.files import atomic_write, writable_dir, write_json

DASH = "–"
RESULT_GLOBS = ("summary.json", "fewshot*.json", "linear-probe*.json", "finetune.json", "finetune*/finetune.json")
# What makes two random-init baselines the same model; the head and dropout do not change the features.
ARCH_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")
EXPECTED = ("config.json or a result (summary.json, fewshot*.json, linear-probe*.json, finetune.json, "
            "finetune*/finetune.json)")
TB_SUFFIX = ".compare"  # marks the events files this script writes, so a rerun replaces only its own


@dataclass
class Row:
    """One row of the comparison: a run, or a random-init baseline."""

    name: str
    kind: str = "run"  # run | random-init
    path: str | None = None
    objective: str | None = None  # mpp | supervised | finetune, as the run's config says
    label: str = DASH  # the table's objective cell
    dataset: str | None = None  # the training data's short name
    steps: int | None = None
    wall_time_s: float | None = None
    fewshot: dict[str, dict] = field(default_factory=dict)  # dataset → {"spec", "file", "step", "results": {k: {mean, std}}}
    linear_probe: dict | None = None  # {"accuracy", "dataset", "spec", "file"}
    finetune: dict | None = None  # {"mean", "std", "lr", "dataset", "spec", "init", "file", ...}
    loss_scale: str | None = None  # runs whose losses can share an axis have the same loss scale
    sources: list[str] = field(default_factory=list)  # random-init rows: the runs whose reports they show


# ---------------------------------------------------------------- reading a run directory

def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read '{path}' ({type(e).__name__}): it is truncated or not JSON; "
                         "rerun what wrote it or move it out of the run directory") from e
    if not isinstance(found, dict):
        raise UsageError(f"'{path}' holds a JSON {type(found).__name__}, not an object: rerun what wrote it "
                         "or move it out of the run directory")
    return found


def bad_report(path: Path, what: str, problem: str) -> UsageError:
    return UsageError(f"'{path}' is not a {what} report ({problem}): rerun the evaluation or move the file away")


def fewshot_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    results = report.get("results")
    if not isinstance(results, dict) or not results:
        raise bad_report(path, "few-shot", "no 'results'")
    try:
        parsed = {int(r.get("shots", k)): {"mean": float(r["mean"]), "std": float(r.get("std") or 0.0)}
                  for k, r in results.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise bad_report(path, "few-shot", f"a result without a numeric mean: {e}") from e
    spec = (report.get("dataset") or {}).get("spec") or fallback_spec or "unknown"
    return {"spec": spec, "dataset": dataset_name(spec), "file": path.relative_to(run_dir).as_posix(),
            "step": report.get("step"), "results": dict(sorted(parsed.items()))}


def linear_probe_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    try:
        accuracy = float(report["accuracy"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad_report(path, "linear-probe", "no numeric 'accuracy'") from e
    spec = (report.get("dataset") or {}).get("spec") or fallback_spec or "unknown"
    return {"accuracy": accuracy, "spec": spec, "dataset": dataset_name(spec),
            "file": path.relative_to(run_dir).as_posix(), "l2": report.get("l2")}


def finetune_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    test = report.get("test_accuracy")
    try:
        mean, std = float(test["mean"]), float(test.get("std") or 0.0)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad_report(path, "fine-tune", "no numeric 'test_accuracy.mean'") from e
    spec = (report.get("dataset") or {}).get("spec") or fallback_spec or "unknown"
    return {"mean": mean, "std": std, "lr": report.get("lr"), "spec": spec, "dataset": dataset_name(spec),
            "init": report.get("init"), "pretrained": report.get("pretrained"), "steps": report.get("steps"),
            "wall_time_s": report.get("wall_time_s"), "file": path.relative_to(run_dir).as_posix()}


def is_random_init(path: Path, report: dict) -> bool:
    return report.get("init") == "random" if "init" in report else "random-init" in path.name


def pick(entries: list[dict], dataset: str | None, what: str, run_name: str, notes: list[str]) -> dict | None:
    """The entry on the run's own dataset, else the first by file name; a note when there was a choice."""
    if not entries:
        return None
    chosen = next((e for e in entries if dataset and e["dataset"] == dataset), entries[0])
    if len(entries) > 1:
        why = "it is on the run's data" if dataset and chosen["dataset"] == dataset else "the first by name"
        notes.append(f"{run_name}: {len(entries)} {what} results ({', '.join(e['file'] for e in entries)}); "
                     f"shown: {chosen['file']} ({why})")
    return chosen


def objective_label(config: dict, summary: dict, finetune: dict | None) -> tuple[str | None, str]:
    """(objective, the table's cell): `mpp (mean_color, 50%)`, `supervised`, `finetune (scratch)`."""
    objective = (config.get("train") or {}).get("objective") or summary.get("objective")
    if objective == "mpp":
        mpp = config.get("mpp") or {}
        rate = mpp.get("corrupt_rate")
        details = [str(mpp["target"])] if mpp.get("target") else []
        details += [f"{100 * rate:g}%"] if isinstance(rate, (int, float)) else []
        return objective, f"mpp ({', '.join(details)})" if details else "mpp"
    if objective == "finetune":
        settings = {**(config.get("finetune") or {}), **{k: v for k, v in (finetune or {}).items() if v is not None}}
        if settings.get("init") == "scratch" or ("pretrained" in settings and not settings["pretrained"]):
            return objective, "finetune (scratch)"
        source = settings.get("pretrained")
        return objective, f"finetune (from {run_name_of(source)})" if source else "finetune"
    return objective, objective or DASH


def run_name_of(path: str) -> str:
    """The run directory's name of a pretrained run or checkpoint path (RUN/checkpoints/ckpt-N.pt)."""
    p = Path(path)
    if p.parent.name == "checkpoints":
        return p.parent.parent.name
    return p.parent.name if p.suffix == ".pt" else p.name


def loss_scale(config: dict, objective: str | None) -> str | None:
    """Runs with the same loss scale share a curve panel: MPP losses differ per target."""
    if objective == "mpp":
        return f"mpp {(config.get('mpp') or {}).get('target', '')}".strip()
    return objective


def arch_of(vit: dict | None, model: str | None) -> tuple[tuple, str]:
    """(key, label) of an architecture: what makes two random-init baselines the same model."""
    if not vit:
        return (), "unknown architecture"
    name = model or f"{vit.get('embed_dim')}-d, depth {vit.get('depth')}, patch {vit.get('patch_size')}"
    return tuple(vit.get(f) for f in ARCH_FIELDS), f"{name}, {vit.get('image_size')} px"


def read_reports(run_dir: Path, pattern: str) -> list[tuple[Path, dict]]:
    """The run's reports matching `pattern`; probes of other features than the paper's class token
    (`--features avg`) are left out, so every row compares the same representation."""
    found = [(path, read_json(path)) for path in sorted(run_dir.glob(pattern))]
    return [(path, report) for path, report in found if report.get("features", "token") == "token"]


def read_run(run_dir: Path, name: str, notes: list[str]) -> tuple[Row, list[tuple]]:
    """The run's row and its random-init results as (arch key, arch label, "fewshot"|"linear_probe", entry)."""
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    train = config.get("train") or {}
    spec = train.get("dataset")
    own = dataset_name(spec) if spec else None
    row = Row(name=name, path=str(run_dir), dataset=own, steps=summary.get("steps"),
              wall_time_s=summary.get("wall_time_s"))
    randoms: list[tuple] = []

    by_dataset: dict[str, list[dict]] = {}
    for path, report in read_reports(run_dir, "fewshot*.json"):
        entry = fewshot_entry(path, report, run_dir, spec)
        if is_random_init(path, report):
            model = (report.get("run_config") or {}).get("model") or report.get("model") or train.get("model")
            randoms.append((*arch_of(report.get("vit") or config.get("vit"), model), "fewshot", entry))
        else:
            by_dataset.setdefault(entry["dataset"], []).append(entry)
    row.fewshot = {ds: pick(entries, None, f"few-shot ({ds})", name, notes) for ds, entries in by_dataset.items()}

    probes = []
    for path, report in read_reports(run_dir, "linear-probe*.json"):
        entry = linear_probe_entry(path, report, run_dir, spec)
        if is_random_init(path, report):
            randoms.append((*arch_of(report.get("vit") or config.get("vit"), train.get("model")), "linear_probe", entry))
        else:
            probes.append(entry)
    row.linear_probe = pick(probes, own, "linear-probe", name, notes)

    tunes = [finetune_entry(p, r, run_dir, spec) for pattern in ("finetune.json", "finetune*/finetune.json")
             for p, r in read_reports(run_dir, pattern)]
    row.finetune = pick(tunes, own, "fine-tune", name, notes)
    row.objective, row.label = objective_label(config, summary, row.finetune)
    row.loss_scale = loss_scale(config, row.objective)
    if row.objective == "finetune" and row.finetune and row.steps is None:  # a fine-tune run: its own training
        row.steps, row.wall_time_s = row.finetune.get("steps"), row.finetune.get("wall_time_s")
    note_stale_fewshot(row, notes)
    return row, randoms


def note_stale_fewshot(row: Row, notes: list[str]) -> None:
    """A few-shot report of an earlier checkpoint than the run's end is worth saying."""
    for entry in row.fewshot.values():
        if row.steps and entry.get("step") and entry["step"] != row.steps:
            notes.append(f"{row.name}: {entry['file']} evaluated the step-{entry['step']} checkpoint "
                         f"of {row.steps} steps")


def baseline_rows(found: list[tuple[str, tuple, str, str, dict]], notes: list[str]) -> list[Row]:
    """One random-init row per (architecture, evaluation dataset); the first run's report is shown."""
    rows: dict[tuple, Row] = {}
    for run_name, key, label, kind, entry in found:
        row = rows.setdefault((key, entry["dataset"]),
                              Row(name=f"random init ({label})", kind="random-init", label="random init"))
        if run_name not in row.sources:
            row.sources.append(run_name)
        if kind == "fewshot" and entry["dataset"] not in row.fewshot:
            row.fewshot[entry["dataset"]] = entry
        elif kind == "linear_probe" and row.linear_probe is None:
            row.linear_probe = entry
    for (_, dataset), row in rows.items():
        if len(row.sources) > 1:
            notes.append(f"{row.name} on {dataset}: shown once, from {row.sources[0]} "
                         f"({', '.join(row.sources[1:])} ha{'s' if len(row.sources) == 2 else 've'} "
                         "the same architecture and dataset)")
    return list(rows.values())


# ---------------------------------------------------------------- run directories, names, output

def check_run_dir(path: Path) -> bool:
    """True for a run; False for a comparison's own output (skipped, so `runs/*` globs work)."""
    if not path.is_dir():
        raise UsageError(f"run directory '{path}' does not exist: pass run directories written by "
                         "scripts/pretrain_*.py or the eval/ scripts")
    if (path / "config.json").is_file() or any(next(path.glob(g), None) for g in RESULT_GLOBS):
        return True
    if (path / "compare.json").is_file():
        return False
    raise UsageError(f"'{path}' holds nothing to compare: expected {EXPECTED}")


def run_names(paths: list[Path], names: list[str] | None) -> list[str]:
    """--names, else the directory names; clashing names become paths below the runs' common parent."""
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise UsageError(f"run directory '{paths[i]}' is given twice: pass each run once")
    if names is not None:
        if len(names) != len(paths):
            raise UsageError(f"--names has {len(names)} name(s) for {len(paths)} run(s): pass one name per run")
        if len(set(names)) < len(names):
            raise UsageError(f"--names {' '.join(names)} repeats a name: pass distinct names")
        return list(names)
    found = [p.name for p in resolved]
    if len(set(found)) == len(found):
        return found
    common = Path(os.path.commonpath(resolved))
    return [p.relative_to(common).as_posix() for p in resolved]


def common_parent(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([p.resolve() for p in paths]))


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# ---------------------------------------------------------------- tables

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
    parts = [markdown_table(t) for t in tables]
    parts.append("Accuracy in % on the evaluation's test split, mean ± std over seeds; – = no result.")
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- curves

def is_curve_tag(tag: str) -> bool:
    return tag == "train/loss" or tag.startswith("eval/")


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the events files directly in `folder` (not its subfolders: few-shot points live there)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0}).Reload()  # 0: keep every point
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's scalars; a torn last line of a run still writing is skipped."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for tag, value in record.items():
            if tag != "step" and isinstance(value, (int, float)):
                found.setdefault(tag, []).append((record["step"], float(value)))
    return found


def read_curves(run_dir: str | Path) -> tuple[str | None, dict[str, list[tuple[int, float]]]]:
    """(source, {tag: [(step, value)]}) of train/loss and eval/* from TensorBoard, else metrics.jsonl.

    A fine-tune directory (eval/finetune.py) logs every training in a folder of its own: the seed-0
    training at the chosen lr (tensorboard/seed0) stands for it.
    """
    run_dir = Path(run_dir)
    for source in ("tensorboard", "tensorboard/seed0"):
        folder = run_dir / source
        scalars = tensorboard_scalars(folder) if folder.is_dir() else {}
        curves = {t: v for t, v in scalars.items() if is_curve_tag(t)}
        if curves:
            return source, curves
    curves = {t: v for t, v in metrics_scalars(run_dir / "metrics.jsonl").items() if is_curve_tag(t)}
    return ("metrics.jsonl" if curves else None), curves


# ---------------------------------------------------------------- position embeddings

def pos_embed_similarity(pos_embed, grid: tuple[int, int]) -> np.ndarray:
    """[h, w, h, w] cosine similarities between the patches' position embeddings.

    `pos_embed` is [1, N, D] or [N, D] with N = h·w, or h·w + 1 with the class token's first
    (dropped: it has no position in the image).
    """
    if hasattr(pos_embed, "detach"):  # a torch tensor, possibly bf16, which numpy cannot read
        pos_embed = pos_embed.detach().float().cpu().numpy()
    x = np.asarray(pos_embed, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])  # (N, D)
    h, w = grid
    if len(x) == h * w + 1:
        x = x[1:]
    if len(x) != h * w:
        raise ValueError(f"{len(x)} position embeddings do not fit a {h}×{w} patch grid")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return (x @ x.T).reshape(h, w, h, w)


def mosaic(sim: np.ndarray, gap: int = 1) -> np.ndarray:
    """[h, w, h, w] → one image of h×w tiles, tile (i, j) = sim[i, j], NaN gaps between tiles."""
    h, w = sim.shape[:2]
    out = np.full((h * (h + gap) - gap, w * (w + gap) - gap), np.nan)
    for i in range(h):
        for j in range(w):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = sim[i, j]
    return out


def patch_grid(config: dict | None, num_embeddings: int) -> tuple[int, int]:
    vit = (config or {}).get("vit") or {}
    if vit.get("image_size") and vit.get("patch_size"):
        side = vit["image_size"] // vit["patch_size"]
        return side, side
    side = math.isqrt(num_embeddings - 1)  # the class token's plus a square grid
    if side * side != num_embeddings - 1:
        side = math.isqrt(num_embeddings)
    return side, side


def checkpoint_pos_embed(run_dir: Path, notes: list[str], name: str) -> dict | None:
    """{"similarity" [h, w, h, w], "checkpoint", "step"} from the newest usable checkpoint, or None.
    Read by mpp.checkpoint's one loader (weights-only: a checkpoint never runs code), memory-mapped so
    only pos_embed comes off the disk. A torn or unsafe newer one is noted and passed over; a run with
    no usable checkpoint left but an unsafe one is refused, as by every other entry point."""
    def skipped(path: Path, e: ckpt_io.BadCheckpoint) -> None:
        notes.append(f"{name}: skipped {e.kind} checkpoint {path.name} ({e.reason})")

    found = ckpt_io.load_latest(run_dir, mmap=True, skipped=skipped)
    if found is None:
        return None
    state, path = found
    weights = state.get("model", state)
    pos = weights.get("pos_embed") if isinstance(weights, dict) else None
    if pos is None:
        notes.append(f"{name}: {path.name} holds no model.pos_embed")
        return None
    config = state.get("config") or (read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None)
    grid = patch_grid(config, pos.reshape(-1, pos.shape[-1]).shape[0])
    try:
        similarity = pos_embed_similarity(pos, grid)
    except ValueError as e:
        notes.append(f"{name}: {path.name}: {e}")
        return None
    step = state.get("step")
    return {"similarity": similarity, "checkpoint": str(path), "step": step if isinstance(step, int) else None}


# ---------------------------------------------------------------- plots

def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def run_colors(rows: list[Row]) -> dict[str, str]:
    """One colour per row, the same in every plot."""
    return {r.name + r.kind: f"C{i % 10}" for i, r in enumerate(rows)}


def plot_fewshot(rows: list[Row], datasets: list[str], path: Path, colors: dict[str, str]) -> None:
    from matplotlib.ticker import NullFormatter

    fig = new_figure(5.5 * len(datasets), 4.2)
    for ax, dataset in zip(fig.subplots(1, len(datasets), squeeze=False)[0], datasets):
        shots = shot_counts(rows, dataset)
        for row in (r for r in rows if dataset in r.fewshot):
            results = row.fewshot[dataset]["results"]
            ks = sorted(results)
            ax.errorbar(ks, [100 * results[k]["mean"] for k in ks], yerr=[100 * results[k]["std"] for k in ks],
                        marker="o", capsize=3, label=row.name, color=colors[row.name + row.kind],
                        linestyle="--" if row.kind == "random-init" else "-")
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the evaluated shot counts are labelled
        ax.set(title=f"few-shot on {dataset}", xlabel="examples per class", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def curve_panels(runs: list[Row], curves: dict[str, dict]) -> list[tuple[str, str]]:
    """(tag, loss scale) pairs: train/loss first, then the eval tags, each per loss scale.

    An eval tag whose every run logged one point (the end-of-training evaluation, which the table
    already gives) is a lone dot, not a curve: it gets no panel.
    """
    tags = sorted({t for c in curves.values() for t in c}, key=lambda t: (t != "train/loss", t))
    scales = list(dict.fromkeys(r.loss_scale or "unknown" for r in runs))

    def series(tag: str, scale: str) -> list[list]:
        return [curves[r.name][tag] for r in runs
                if tag in curves.get(r.name, {}) and (r.loss_scale or "unknown") == scale]

    return [(t, s) for t in tags for s in scales
            if (found := series(t, s)) and (t == "train/loss" or max(map(len, found)) > 1)]


def plot_curves(runs: list[Row], curves: dict[str, dict], path: Path, colors: dict[str, str]) -> int:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    panels = curve_panels(runs, curves)
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig = new_figure(5 * cols, 3.6 * rows_n)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, (tag, scale) in zip(axes, panels):
        values = []
        for run in (r for r in runs if (r.loss_scale or "unknown") == scale and tag in curves.get(r.name, {})):
            steps, ys = zip(*curves[run.name][tag])
            ax.plot(steps, ys, marker="." if len(ys) < 30 else None, label=run.name, color=colors[run.name + run.kind])
            values += ys
        if tag.endswith("loss") and min(values) > 0:  # losses fall over orders of magnitude
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 0.5 rather than 2×10⁰
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.5 on a short run's axis
        ax.set(title=f"{tag} — {scale}", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return len(panels)


def plot_pos_embed(name: str, found: dict, path: Path) -> None:
    sim = found["similarity"]
    h, w = sim.shape[:2]
    side = max(4.0, min(12.0, 0.45 * w + 2.5))
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(mosaic(sim), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (w + 1) + (w - 1) / 2 for j in range(w)], [str(j + 1) for j in range(w)])
    ax.set_yticks([i * (h + 1) + (h - 1) / 2 for i in range(h)], [str(i + 1) for i in range(h)])
    ax.tick_params(length=0)
    ax.set(xlabel="input patch column", ylabel="input patch row",
           title=f"{name}: position-embedding similarity" + (f" (step {found['step']})" if found["step"] else ""))
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- TensorBoard

def shown_path(path: Path) -> str:
    """Relative to the working directory when below it: a shorter command to copy."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def tensorboard_command(parent: Path, output: Path, runs: list[Row]) -> str:
    """`--logdir <the runs' parent>` when it also holds the output; otherwise each folder by name
    (never the file system's root: TensorBoard would crawl the whole disk)."""
    if parent.parent != parent:
        try:
            output.resolve().relative_to(parent)
            return f"tensorboard --logdir {shown_path(parent)}"
        except ValueError:
            pass
    if parent.parent == parent:
        spec = [(safe_name(r.name), Path(r.path)) for r in runs]
    else:
        spec = [("runs", parent)]
    spec.append(("compare", output / "tensorboard"))
    return "tensorboard --logdir_spec " + ",".join(f"{name}:{shown_path(p)}" for name, p in spec)


def write_tensorboard_text(folder: Path, markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"events.out.tfevents.*{TB_SUFFIX}"):  # this script's previous table, nothing else
        old.unlink()
    with SummaryWriter(str(folder), filename_suffix=TB_SUFFIX) as tb:
        tb.add_text("compare", markdown, global_step=0)


# ---------------------------------------------------------------- the comparison

def compare(run_dirs: list[str | Path], output_dir: str | Path | None = None, names: list[str] | None = None) -> dict:
    """Read the runs, write compare.md / compare.json / the plots / TensorBoard text into
    `output_dir` (default: <the runs' common parent>/compare), and return what compare.json holds."""
    if not run_dirs:
        raise UsageError("no run directory given: pass one or more run directories")
    given = [Path(p) for p in run_dirs]
    notes: list[str] = []
    paths = []
    for p in given:
        if check_run_dir(p):
            paths.append(p)
        else:
            notes.append(f"skipped {p}: a comparison's output, not a run")
    if not paths:
        raise UsageError(f"no run among {', '.join(map(str, given))}: expected {EXPECTED}")
    if names is not None and len(paths) != len(given):
        raise UsageError("--names cannot be matched to the runs when a comparison folder is among them: leave it out")
    names = run_names(paths, names)
    parent = common_parent(paths)
    output = writable_dir(Path(output_dir) if output_dir else parent / "compare", "--output")

    runs, randoms = [], []
    for path, name in zip(paths, names):
        row, found = read_run(path, name, notes)
        runs.append(row)
        randoms += [(name, *r) for r in found]
    baselines = baseline_rows(randoms, notes)
    # Read before anything is drawn: a run refused for an unsafe checkpoint leaves no half-written plots.
    pos_embeds = [checkpoint_pos_embed(Path(run.path), notes, run.name) for run in runs]
    tables = build_tables(runs, baselines)
    colors = run_colors(runs + baselines)

    files: list[Path] = []
    plots: dict = {"fewshot": None, "curves": None, "pos_embed": {}}
    datasets = [t["dataset"] for t in tables if t["dataset"]]
    if datasets:
        plot_fewshot(runs + baselines, datasets, output / "fewshot.png", colors)
        plots["fewshot"] = {"file": "fewshot.png", "panels": datasets}
    curves, sources = {}, {}
    for run in runs:
        sources[run.name], curves[run.name] = read_curves(run.path)
    if any(curves.values()):
        panels = plot_curves(runs, curves, output / "curves.png", colors)
        plots["curves"] = {"file": "curves.png", "panels": panels, "sources": sources}
    else:
        notes.append("no training curves: no run has TensorBoard events or metrics.jsonl with train/loss or eval/*")
    for run, found in zip(runs, pos_embeds):
        if found:
            file = f"pos_embed-{safe_name(run.name)}.png"
            plot_pos_embed(run.name, found, output / file)
            plots["pos_embed"][run.name] = {"file": file, "checkpoint": found["checkpoint"], "step": found["step"],
                                            "grid": list(found["similarity"].shape[:2])}
    files += [output / p["file"] for p in (plots["fewshot"], plots["curves"], *plots["pos_embed"].values()) if p]

    files = [output / "compare.md", output / "compare.json", *files]
    markdown = render(tables, notes)
    command = tensorboard_command(parent, output, runs)
    report = {"runs": [asdict(r) for r in runs], "random_init": [asdict(r) for r in baselines],
              "main_dataset": tables[0]["dataset"], "tables": tables, "notes": notes, "plots": plots,
              "markdown": markdown, "output": str(output),
              "tensorboard": {"logdir": shown_path(parent), "command": command, "text": str(output / "tensorboard")},
              "files": [str(f) for f in files]}
    atomic_write(output / "compare.md", lambda f: f.write(markdown.encode()))
    write_json(output / "compare.json", report)
    write_tensorboard_text(output / "tensorboard", markdown)
    return report


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--output", metavar="DIR", help="where the table, plots and TensorBoard text go "
                   "(default: <the runs' common parent>/compare)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names, one per RUN_DIR in order "
                   "(default: the directory names); put it after the run directories")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = compare(args.runs, args.output, args.names)
    print(report["markdown"])
    print(f"wrote {', '.join(Path(f).name for f in report['files'])} in {shown_path(Path(report['output']))}")
    print(f"overlay the runs: {report['tensorboard']['command']}")
    return report


if __name__ == "__main__":
    main()
