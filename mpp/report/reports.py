"""Reading a run directory's results into comparison rows: one `Row` per run, one per reference baseline.

Two baselines (a `Reference` each): a random init of the run's architecture (a fewshot-random-init /
linear-probe-random-init report, or a report's "references.random_init") and the normalised raw
pixels ("references.pixels"). A report's optional "layers" (every block's features: "<block>/<pool>[+norm]")
becomes its entry's `layers` (mpp.report.entries.Sweep); reports without it keep `layers` None.

What a run directory may hold is defined in mpp.run.rundir; each report is a record of mpp.run.records,
written by scripts/pretrain_*.py (summary.json), eval/fewshot.py (fewshot*.json), eval/linear_probe.py
(linear-probe*.json), eval/knn.py (knn*.json) and eval/finetune.py (finetune.json, in the run itself
or in RUN/finetune*/), and read here through the same class. A report the records refuse is one line
that names the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpp.core.layout import CHECKPOINTS, CONFIG, FEWSHOT_GLOB, FINETUNE, KNN_GLOB, LINEAR_PROBE_GLOB, SUMMARY
from mpp.data.sources import dataset_name
from mpp.model.objective import TARGETS
from mpp.report.entries import (
    Entry,
    FewshotEntry,
    FinetuneEntry,
    KnnEntry,
    LinearProbeEntry,
    fewshot_entry,
    finetune_entry,
    knn_entry,
    linear_probe_entry,
)
from mpp.run.records import (
    FewshotReport,
    FinetuneReport,
    KnnReport,
    LinearProbeReport,
    ProbeHead,
    Report,
    Summary,
    parse_record,
    read_json,
    read_record,
)
from mpp.run.rundir import run_dir_of

DASH = "–"  # a missing result, in every cell
FINETUNE_GLOBS = (FINETUNE, f"finetune*/{FINETUNE}")
# What makes two random-init baselines the same model; the head and dropout do not change the features.
ARCH_FIELDS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim")


@dataclass
class Row:
    """One row of the comparison: a run, or a random-init baseline."""

    name: str
    kind: str = "run"  # run | random-init | pixels
    path: str | None = None
    objective: str | None = None  # mpp | supervised | finetune, as the run's config says
    label: str = DASH  # the table's objective cell
    dataset: str | None = None  # the training data's short name
    steps: int | None = None
    wall_time_s: float | None = None
    fewshot: dict[str, FewshotEntry] = field(default_factory=dict)  # the evaluation's dataset → its entry
    linear_probe: LinearProbeEntry | None = None
    knn: KnnEntry | None = None
    finetune: FinetuneEntry | None = None
    loss_scale: str | None = None  # runs whose losses can share an axis have the same loss scale
    sources: list[str] = field(default_factory=list)  # baseline rows: the runs whose reports hold the baseline


@dataclass(frozen=True)
class Reference:
    """One baseline result found in a run directory, before baselines of the same model are merged into a row."""

    run: str  # the name of the run whose report holds it
    kind: str  # random-init | pixels
    key: tuple  # what makes two the same baseline: the architecture (random init), the image size (pixels)
    label: str  # the row's name in brackets: "Micro/4, 16 px" or "32 px"
    probe: str  # fewshot | linear_probe | knn
    entry: Entry  # its `where` names the references key, None for a file of its own


# ---------------------------------------------------------------- one report

def read_optional(path: Path) -> dict:
    """The JSON object in `path` (a run's config.json), or {} when there is no such file."""
    return read_json(path) if path.is_file() else {}


def read_reports(run_dir: Path, pattern: str, cls: type[Report]) -> list[tuple[Path, Report]]:
    """The run's reports matching `pattern`, as `cls` records; probes of other features than the paper's
    class token (`--features avg`) are left out before they are checked, so every row compares the same
    representation."""
    found = [(path, read_json(path)) for path in sorted(run_dir.glob(pattern))]
    return [(path, parse_record(path, report, cls)) for path, report in found
            if report.get("features", "token") == "token"]


def is_random_init(path: Path, report: ProbeHead) -> bool:
    """A report of an untrained model: its "init" says so, or (a report without one) its file name."""
    return report.init == "random" if report.init is not None else "random-init" in path.name


def pick(entries: list, dataset: str | None, what: str, run_name: str, notes: list[str]):
    """The entry on the run's own dataset, else the first by file name; a note when there was a choice."""
    if not entries:
        return None
    chosen = next((e for e in entries if dataset and e.dataset == dataset), entries[0])
    if len(entries) > 1:
        why = "it is on the run's data" if dataset and chosen.dataset == dataset else "the first by name"
        notes.append(f"{run_name}: {len(entries)} {what} results ({', '.join(e.file for e in entries)}); "
                     f"shown: {chosen.file} ({why})")
    return chosen


# ---------------------------------------------------------------- labels

def mpp_target(config: dict) -> str | None:
    """The MPP target as the table and the curve panels name it (its label in mpp.model.objective.TARGETS),
    or None when the config names none. A run of a target no longer registered keeps its recorded name."""
    target = (config.get("mpp") or {}).get("target")
    return TARGETS[target].label if target in TARGETS else (str(target) if target else None)


def objective_label(config: dict, summary: Summary, finetune: FinetuneEntry | None) -> tuple[str | None, str]:
    """(objective, the table's cell): `mpp (mean_color, 50%)`, `supervised`, `finetune (scratch)`."""
    objective = (config.get("train") or {}).get("objective") or summary.objective
    if objective == "mpp":
        rate = (config.get("mpp") or {}).get("corrupt_rate")
        target = mpp_target(config)
        details = [target] if target else []
        details += [f"{100 * rate:g}%"] if isinstance(rate, (int, float)) else []
        return objective, f"mpp ({', '.join(details)})" if details else "mpp"
    if objective == "finetune":
        # the fine-tune's report where it says, else the run's config (a "pretrained": null there: scratch)
        settings = {**(config.get("finetune") or {}),
                    **{k: v for k, v in (("init", finetune and finetune.init),
                                         ("pretrained", finetune and finetune.pretrained)) if v is not None}}
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


# ---------------------------------------------------------------- references: the baselines a run's reports hold

REFERENCES = {"random_init": "random-init", "pixels": "pixels"}  # a report's "references" key → the row kind
PROBES = {  # probe → (the glob of its reports, their record, its entry: (path, report, run_dir, fallback spec, where))
    "fewshot": (FEWSHOT_GLOB, FewshotReport, fewshot_entry),
    "linear_probe": (LINEAR_PROBE_GLOB, LinearProbeReport, linear_probe_entry),
    "knn": (KNN_GLOB, KnnReport, knn_entry),
}


def report_arch(report: ProbeHead, config: dict) -> tuple[tuple, str]:
    """The architecture a report probed: its own "vit" (and model name), else the run's."""
    train = config.get("train") or {}
    return arch_of(getattr(report, "vit", None) or config.get("vit"), report.probed_model() or train.get("model"))


def references_of(path: Path, report: ProbeHead, run_dir: Path, name: str, config: dict,
                  probe: str) -> list[Reference]:
    """The baselines in a report's optional "references" (the record keeps unknown keys for newer readers)."""
    if report.references is None:
        return []
    refs = []
    for key, found in report.references.items():
        entry = PROBES[probe][2](path, report, run_dir, (config.get("train") or {}).get("dataset"), f"references.{key}")
        if REFERENCES[key] == "random-init":
            arch, label = report_arch(report, config)
        else:
            size = report.pixels_size()
            grid = found.grid  # the pixels are area-averaged to at most 32×32 (mpp.eval.features)
            arch, label = (size,), f"{size} px" if grid in (None, size) else f"{size} px as {grid}×{grid}"
        refs.append(Reference(name, REFERENCES[key], arch, label, probe, entry))
    return refs


# ---------------------------------------------------------------- one run, and the baselines of all

def read_run(run_dir: Path, name: str, notes: list[str]) -> tuple[Row, list[Reference]]:
    """The run's row and the baselines its reports hold: its random-init reports first (by file name),
    then the "references" of its reports (by file name)."""
    config = read_optional(run_dir / CONFIG)
    summary = read_record(run_dir / SUMMARY, Summary) if (run_dir / SUMMARY).is_file() else Summary()
    spec = (config.get("train") or {}).get("dataset")
    own = dataset_name(spec) if spec else None
    row = Row(name=name, path=str(run_dir), dataset=own, steps=summary.steps, wall_time_s=summary.wall_time_s)
    files: list[Reference] = []
    inside: list[Reference] = []

    by_dataset: dict[str, list[FewshotEntry]] = {}
    single: dict[str, list] = {"linear_probe": [], "knn": []}  # probes with one entry per row
    imported = None
    for probe, (pattern, cls, entry_of) in PROBES.items():
        for path, report in read_reports(run_dir, pattern, cls):
            imported = imported or report.imported  # a timm model's reports (mpp.eval.timm_io): no config
            entry = entry_of(path, report, run_dir, spec)
            inside += references_of(path, report, run_dir, name, config, probe)
            if is_random_init(path, report):
                files.append(Reference(name, "random-init", *report_arch(report, config), probe, entry))
            elif probe == "fewshot":
                by_dataset.setdefault(entry.dataset, []).append(entry)
            else:
                single[probe].append(entry)
    row.fewshot = {ds: pick(entries, None, f"few-shot ({ds})", name, notes) for ds, entries in by_dataset.items()}
    row.linear_probe = pick(single["linear_probe"], own, "linear-probe", name, notes)
    row.knn = pick(single["knn"], own, "k-NN", name, notes)

    tunes = [finetune_entry(p, r, run_dir, spec) for pattern in FINETUNE_GLOBS
             for p, r in read_reports(run_dir, pattern, FinetuneReport)]
    row.finetune = pick(tunes, own, "fine-tune", name, notes)
    row.objective, row.label = objective_label(config, summary, row.finetune)
    if row.objective is None and imported:
        row.label = f"timm ({imported.name})"
    row.loss_scale = loss_scale(config, row.objective)
    if row.objective == "finetune" and row.finetune and row.steps is None:  # a fine-tune run: its own training
        row.steps, row.wall_time_s = row.finetune.steps, row.finetune.wall_time_s
    note_stale(row, notes)
    return row, files + inside


def note_stale(row: Row, notes: list[str]) -> None:
    """A few-shot or k-NN report of an earlier checkpoint than the run's end is worth saying."""
    for entry in [*row.fewshot.values(), *([row.knn] if row.knn else [])]:
        if row.steps and entry.step and entry.step != row.steps:
            notes.append(f"{row.name}: {entry.file} evaluated the step-{entry.step} checkpoint "
                         f"of {row.steps} steps")


def source_of(ref: Reference) -> str:
    """Where a baseline was read: `mpp/fewshot-random-init.json`, `mpp/fewshot.json references.pixels`."""
    return f"{ref.run}/{ref.entry.file}" + (f" {ref.entry.where}" if ref.entry.where else "")


BASELINE_NAMES = {"random-init": "random init", "pixels": "raw pixels"}


def baseline_rows(found: list[Reference], notes: list[str]) -> list[Row]:
    """One row per (baseline kind, model, evaluation dataset): random init per architecture, raw pixels
    per image size. The first found is shown: runs in the order given, in a run its random-init files
    before its reports' references (mpp.report.reports.read_run's order); a note names it when there were more."""
    rows: dict[tuple, Row] = {}
    shown: dict[tuple, list[Reference]] = {}  # (row key, probe) → every reference found, the shown one first
    for ref in sorted(found, key=lambda r: r.kind != "random-init"):  # random init first, pixels after: stable
        key = (ref.kind, ref.key, ref.entry.dataset)
        name = BASELINE_NAMES[ref.kind]
        row = rows.setdefault(key, Row(name=f"{name} ({ref.label})", kind=ref.kind, label=name))
        if ref.run not in row.sources:
            row.sources.append(ref.run)
        shown.setdefault((key, ref.probe), []).append(ref)
        if ref.probe == "fewshot" and ref.entry.dataset not in row.fewshot:
            row.fewshot[ref.entry.dataset] = ref.entry
        elif ref.probe == "linear_probe" and row.linear_probe is None:
            row.linear_probe = ref.entry
        elif ref.probe == "knn" and row.knn is None:
            row.knn = ref.entry
    for (key, probe), refs in shown.items():
        if len(refs) > 1:
            rule = "the first run's" + (", a random-init report before references" if key[0] == "random-init" else "")
            same = [r for r in refs[1:] if _scores(r.entry) == _scores(refs[0].entry)]
            other = [r for r in refs[1:] if r not in same]
            where = [f"the same numbers are also in {', '.join(map(source_of, same))}"] if same else []
            if other:  # e.g. a random init drawn with each run's own seed: not one baseline, several draws of it
                where.append(f"other numbers (another draw) in {', '.join(map(source_of, other))}")
            what = PROBES[probe][1].WHAT  # few-shot | linear-probe | k-NN
            notes.append(f"{rows[key].name}, {what} on {key[2]}: shown once, from {source_of(refs[0])} "
                         f"({rule}); {'; '.join(where)}")
    return list(rows.values())


def _scores(entry: Entry):
    """What a baseline's table cells show: its linear-probe accuracy or its few-shot (k-NN) results."""
    return entry.accuracy if isinstance(entry, LinearProbeEntry) else entry.results
