"""Reading a run directory's results into comparison rows: one `Row` per run, one per random-init baseline.

What a run directory may hold is defined in mpp.rundir; the reports themselves are written by
scripts/pretrain_*.py (summary.json), eval/fewshot.py (fewshot*.json), eval/linear_probe.py
(linear-probe*.json) and eval/finetune.py (finetune.json, in the run itself or in RUN/finetune*/).
A report this module cannot use is refused with one line that names the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mpp.data import dataset_name
from mpp.errors import UsageError
from mpp.objective import TARGETS
from mpp.rundir import CHECKPOINTS, CONFIG, FINETUNE, SUMMARY, run_dir_of

DASH = "–"  # a missing result, in every cell
FEWSHOT_GLOB = "fewshot*.json"
LINEAR_PROBE_GLOB = "linear-probe*.json"
FINETUNE_GLOBS = (FINETUNE, f"finetune*/{FINETUNE}")
# What makes two random-init baselines the same model; the head and dropout do not change the features.
ARCH_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")


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


# ---------------------------------------------------------------- one report

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


def read_optional(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    return read_json(path) if path.is_file() else {}


def bad_report(path: Path, what: str, problem: str) -> UsageError:
    return UsageError(f"'{path}' is not a {what} report ({problem}): rerun the evaluation or move the file away")


def report_spec(report: dict, fallback_spec: str | None) -> str:
    """The evaluation's dataset spec: the report's own, else the run's training data."""
    return (report.get("dataset") or {}).get("spec") or fallback_spec or "unknown"


def fewshot_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    results = report.get("results")
    if not isinstance(results, dict) or not results:
        raise bad_report(path, "few-shot", "no 'results'")
    try:
        parsed = {int(r.get("shots", k)): {"mean": float(r["mean"]), "std": float(r.get("std") or 0.0)}
                  for k, r in results.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise bad_report(path, "few-shot", f"a result without a numeric mean: {e}") from e
    spec = report_spec(report, fallback_spec)
    return {"spec": spec, "dataset": dataset_name(spec), "file": path.relative_to(run_dir).as_posix(),
            "step": report.get("step"), "results": dict(sorted(parsed.items()))}


def linear_probe_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    try:
        accuracy = float(report["accuracy"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad_report(path, "linear-probe", "no numeric 'accuracy'") from e
    spec = report_spec(report, fallback_spec)
    return {"accuracy": accuracy, "spec": spec, "dataset": dataset_name(spec),
            "file": path.relative_to(run_dir).as_posix(), "l2": report.get("l2")}


def finetune_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None) -> dict:
    test = report.get("test_accuracy")
    try:
        mean, std = float(test["mean"]), float(test.get("std") or 0.0)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad_report(path, "fine-tune", "no numeric 'test_accuracy.mean'") from e
    spec = report_spec(report, fallback_spec)
    return {"mean": mean, "std": std, "lr": report.get("lr"), "spec": spec, "dataset": dataset_name(spec),
            "init": report.get("init"), "pretrained": report.get("pretrained"), "steps": report.get("steps"),
            "wall_time_s": report.get("wall_time_s"), "file": path.relative_to(run_dir).as_posix()}


def is_random_init(path: Path, report: dict) -> bool:
    return report.get("init") == "random" if "init" in report else "random-init" in path.name


def read_reports(run_dir: Path, pattern: str) -> list[tuple[Path, dict]]:
    """The run's reports matching `pattern`; probes of other features than the paper's class token
    (`--features avg`) are left out, so every row compares the same representation."""
    found = [(path, read_json(path)) for path in sorted(run_dir.glob(pattern))]
    return [(path, report) for path, report in found if report.get("features", "token") == "token"]


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


# ---------------------------------------------------------------- labels

def mpp_target(config: dict) -> str | None:
    """The MPP target as the table and the curve panels name it (its label in mpp.objective.TARGETS),
    or None when the config names none. A run of a target no longer registered keeps its recorded name."""
    target = (config.get("mpp") or {}).get("target")
    return TARGETS[target].label if target in TARGETS else (str(target) if target else None)


def objective_label(config: dict, summary: dict, finetune: dict | None) -> tuple[str | None, str]:
    """(objective, the table's cell): `mpp (mean_color, 50%)`, `supervised`, `finetune (scratch)`."""
    objective = (config.get("train") or {}).get("objective") or summary.get("objective")
    if objective == "mpp":
        rate = (config.get("mpp") or {}).get("corrupt_rate")
        target = mpp_target(config)
        details = [target] if target else []
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
    """The name of the pretrained run a fine-tune report records: a run directory (what eval/finetune.py
    writes) or, in older reports, a checkpoint file in one. Read as text: the run may live on another machine."""
    recorded = Path(path)
    names_a_file = recorded.suffix == ".pt" or recorded.parent.name == CHECKPOINTS
    return (run_dir_of(recorded) if names_a_file else recorded).name


def loss_scale(config: dict, objective: str | None) -> str | None:
    """Runs with the same loss scale share a curve panel: MPP losses differ per target."""
    if objective == "mpp":
        return f"mpp {mpp_target(config) or ''}".strip()
    return objective


def arch_of(vit: dict | None, model: str | None) -> tuple[tuple, str]:
    """(key, label) of an architecture: what makes two random-init baselines the same model."""
    if not vit:
        return (), "unknown architecture"
    name = model or f"{vit.get('embed_dim')}-d, depth {vit.get('depth')}, patch {vit.get('patch_size')}"
    return tuple(vit.get(f) for f in ARCH_FIELDS), f"{name}, {vit.get('image_size')} px"


# ---------------------------------------------------------------- one run, and the baselines of all

def read_run(run_dir: Path, name: str, notes: list[str]) -> tuple[Row, list[tuple]]:
    """The run's row and its random-init results as (arch key, arch label, "fewshot"|"linear_probe", entry)."""
    config = read_optional(run_dir / CONFIG)
    summary = read_optional(run_dir / SUMMARY)
    train = config.get("train") or {}
    spec = train.get("dataset")
    own = dataset_name(spec) if spec else None
    row = Row(name=name, path=str(run_dir), dataset=own, steps=summary.get("steps"),
              wall_time_s=summary.get("wall_time_s"))
    randoms: list[tuple] = []

    by_dataset: dict[str, list[dict]] = {}
    for path, report in read_reports(run_dir, FEWSHOT_GLOB):
        entry = fewshot_entry(path, report, run_dir, spec)
        if is_random_init(path, report):
            model = (report.get("run_config") or {}).get("model") or report.get("model") or train.get("model")
            randoms.append((*arch_of(report.get("vit") or config.get("vit"), model), "fewshot", entry))
        else:
            by_dataset.setdefault(entry["dataset"], []).append(entry)
    row.fewshot = {ds: pick(entries, None, f"few-shot ({ds})", name, notes) for ds, entries in by_dataset.items()}

    probes = []
    for path, report in read_reports(run_dir, LINEAR_PROBE_GLOB):
        entry = linear_probe_entry(path, report, run_dir, spec)
        if is_random_init(path, report):
            randoms.append((*arch_of(report.get("vit") or config.get("vit"), train.get("model")), "linear_probe", entry))
        else:
            probes.append(entry)
    row.linear_probe = pick(probes, own, "linear-probe", name, notes)

    tunes = [finetune_entry(p, r, run_dir, spec) for pattern in FINETUNE_GLOBS for p, r in read_reports(run_dir, pattern)]
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
