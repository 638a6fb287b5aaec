"""Reading a run directory's results into comparison rows: one `Row` per run, one per reference baseline.

Two baselines (a `Reference` each): a random init of the run's architecture (a fewshot-random-init /
linear-probe-random-init report, or a report's "references.random_init") and the normalised raw
pixels ("references.pixels"). A report's optional "layers" (every block's features: "<block>/<pool>[+norm]")
is parsed into its entry's "layers" (see `parse_layers`); reports without it keep "layers": None.

What a run directory may hold is defined in mpp.run.rundir; the reports themselves are written by
scripts/pretrain_*.py (summary.json), eval/fewshot.py (fewshot*.json), eval/linear_probe.py
(linear-probe*.json), eval/knn.py (knn*.json) and eval/finetune.py (finetune.json, in the run itself
or in RUN/finetune*/).
A report this module cannot use is refused with one line that names the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mpp.core.errors import UsageError
from mpp.core.layout import CHECKPOINTS, CONFIG, FEWSHOT_GLOB, FINETUNE, KNN_GLOB, LINEAR_PROBE_GLOB, SUMMARY
from mpp.data.sources import dataset_name
from mpp.model.objective import TARGETS
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
    # dataset → {"spec", "dataset", "file", "in", "step", "results": {k: {mean, std}}, "layers"}
    fewshot: dict[str, dict] = field(default_factory=dict)
    linear_probe: dict | None = None  # {"accuracy", "l2", "dataset", "spec", "file", "in", "layers"}
    knn: dict | None = None  # a few-shot entry's keys, "results" {k: accuracy}, and "temperature"
    finetune: dict | None = None  # {"mean", "std", "lr", "dataset", "spec", "init", "file", ...}
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
    entry: dict  # as PROBES' entry functions make it; "in" names the references key, None for a file


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


def parse_shots(results) -> dict[int, dict]:
    """{"1": {"shots": 1, "mean", "std", ...}, ...} → {1: {"mean", "std"}, ...}, sorted by shots; raises on a bad one."""
    if not isinstance(results, dict) or not results:
        raise ValueError("no results")
    parsed = {int(r.get("shots", k)): {"mean": float(r["mean"]), "std": float(r.get("std") or 0.0)}
              for k, r in results.items()}
    return dict(sorted(parsed.items()))


def parse_knn(results) -> dict[int, float]:
    """{"10": {"k": 10, "accuracy"}, ...} → {10: accuracy, ...}, sorted by k; raises on a bad one."""
    if not isinstance(results, dict) or not results:
        raise ValueError("no results")
    return dict(sorted((int(r.get("k", k)), float(r["accuracy"])) for k, r in results.items()))


def parse_probe(result) -> dict:
    """{"accuracy", "l2", ...} → {"accuracy", "l2"}; raises on a non-numeric accuracy."""
    return {"accuracy": float(result["accuracy"]), "l2": result.get("l2")}


def variant(spec: dict) -> str:
    """A layer spec's feature variant, the same at every block: "token", "token+norm", "avg", "avg+norm"."""
    return spec["pool"] + ("+norm" if spec["norm"] else "")


def is_layer_spec(spec) -> bool:
    return (isinstance(spec, dict) and type(spec.get("layer")) is int and spec["layer"] >= 1
            and isinstance(spec.get("pool"), str) and bool(spec["pool"]) and isinstance(spec.get("norm"), bool)
            and spec.get("name") == f"{spec['layer']}/{variant(spec)}")


def parse_layers(path: Path, found, what: str, parse_one) -> dict | None:
    """A report's "layers" sweep, or None when it has none:
    {"specs": [{name, layer, pool, norm}], "blocks": [1, ...], "variants": ["token", ...],
     "results": {name: parse_one(result)}, "random_init": the same or None}.
    A feature without a result is left out (a `–` cell); a result of a feature no spec names is refused."""
    if found is None:
        return None

    def bad(problem: str) -> UsageError:
        return bad_report(path, what, f"malformed 'layers': {problem}")

    specs = found.get("specs") if isinstance(found, dict) else None
    if not isinstance(specs, list) or not specs:
        raise bad("no 'specs' list")
    for spec in specs:
        if not is_layer_spec(spec):
            raise bad(f"spec {json.dumps(spec)[:80]} is not {{name: '<block>/<pool>[+norm]', layer, pool, norm}}")
    names = [s["name"] for s in specs]
    if found.get("features", names) != names:
        raise bad("'features' and 'specs' list different features")
    parsed = {"specs": [{k: s[k] for k in ("name", "layer", "pool", "norm")} for s in specs],
              "blocks": sorted({s["layer"] for s in specs}), "variants": list(dict.fromkeys(map(variant, specs)))}
    for key in ("results", "random_init"):
        results = found.get(key)
        if results is None and key == "random_init":
            parsed[key] = None
            continue
        if not isinstance(results, dict) or not results:
            raise bad(f"no '{key}' object")
        unknown = [n for n in results if n not in names]
        if unknown:
            raise bad(f"'{key}' has a result for '{unknown[0]}', which no spec names")
        try:
            parsed[key] = {n: parse_one(results[n]) for n in names if n in results}
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise bad(f"a result in '{key}' without a numeric accuracy ({type(e).__name__}: {e})") from e
    return parsed


def results_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None, where: str | None = None, *,
                  what: str, parse, number: str, keep: tuple[str, ...] = ()) -> dict:
    """The entry of a report whose "results" `parse` reads (few-shot, k-NN); `where` ("references.pixels")
    reads that part of it instead of the top level; `number` names what a result must hold; `keep`:
    the report's own fields the entry also holds."""
    found = report if where is None else report["references"][where.split(".", 1)[1]]
    inside = f" in {where}" if where else ""
    if not isinstance(found.get("results"), dict) or not found["results"]:
        raise bad_report(path, what, f"no 'results'{inside}")
    try:
        results = parse(found["results"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise bad_report(path, what, f"a result{inside} without a numeric {number}: {e}") from e
    spec = report_spec(report, fallback_spec)
    layers = parse_layers(path, report.get("layers"), what, parse) if where is None else None
    return {"spec": spec, "dataset": dataset_name(spec), "file": path.relative_to(run_dir).as_posix(), "in": where,
            "step": report.get("step"), "results": results, "layers": layers, **{k: report.get(k) for k in keep}}


def linear_probe_entry(path: Path, report: dict, run_dir: Path, fallback_spec: str | None,
                       where: str | None = None) -> dict:
    """The linear-probe report's entry; `where` ("references.pixels") reads that part of it instead of the top level."""
    found = report if where is None else report["references"][where.split(".", 1)[1]]
    try:
        accuracy = float(found["accuracy"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad_report(path, "linear-probe", f"no numeric 'accuracy'{f' in {where}' if where else ''}") from e
    spec = report_spec(report, fallback_spec)
    layers = parse_layers(path, report.get("layers"), "linear-probe", parse_probe) if where is None else None
    return {"accuracy": accuracy, "spec": spec, "dataset": dataset_name(spec),
            "file": path.relative_to(run_dir).as_posix(), "in": where, "l2": found.get("l2"), "layers": layers}


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
    """The MPP target as the table and the curve panels name it (its label in mpp.model.objective.TARGETS),
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


# ---------------------------------------------------------------- references: the baselines a run's reports hold

REFERENCES = {"random_init": "random-init", "pixels": "pixels"}  # a report's "references" key → the row kind
PROBES = {  # probe → (what errors call its report, its entry: (path, report, run_dir, fallback spec, where) → dict)
    "fewshot": ("few-shot", partial(results_entry, what="few-shot", parse=parse_shots, number="mean")),
    "linear_probe": ("linear-probe", linear_probe_entry),
    "knn": ("k-NN", partial(results_entry, what="k-NN", parse=parse_knn, number="accuracy", keep=("temperature",))),
}


def report_arch(report: dict, config: dict) -> tuple[tuple, str]:
    """The architecture a report probed: its own "vit" (and model name), else the run's."""
    train = config.get("train") or {}
    model = (report.get("run_config") or {}).get("model") or report.get("model") or train.get("model")
    return arch_of(report.get("vit") or config.get("vit"), model)


def pixels_size(path: Path, found: dict, report: dict, what: str) -> int:
    """The raw pixels' resolution: the reference's own, else the report's images', else the probed model's."""
    size = found.get("image_size") or (report.get("dataset") or {}).get("image_size") or \
        (report.get("vit") or {}).get("image_size")
    if type(size) is not int or size < 1:
        raise bad_report(path, what, "references.pixels has no positive integer 'image_size'")
    return size


def references_of(path: Path, report: dict, run_dir: Path, name: str, config: dict, probe: str) -> list[Reference]:
    """The baselines in a report's optional "references" (unknown keys are left for newer readers)."""
    found = report.get("references")
    if found is None:
        return []
    what, entry_of = PROBES[probe]
    if not isinstance(found, dict):
        raise bad_report(path, what, "'references' is not an object")
    refs = []
    for key, kind in REFERENCES.items():
        if key not in found:
            continue
        if not isinstance(found[key], dict):
            raise bad_report(path, what, f"references.{key} is not an object")
        entry = entry_of(path, report, run_dir, (config.get("train") or {}).get("dataset"), f"references.{key}")
        if kind == "random-init":
            arch, label = report_arch(report, config)
        else:
            size = pixels_size(path, found[key], report, what)
            grid = found[key].get("grid")  # the pixels are area-averaged to at most 32×32 (mpp.eval.features)
            arch, label = (size,), f"{size} px" if grid in (None, size) else f"{size} px as {grid}×{grid}"
        refs.append(Reference(name, kind, arch, label, probe, entry))
    return refs


# ---------------------------------------------------------------- one run, and the baselines of all

def read_run(run_dir: Path, name: str, notes: list[str]) -> tuple[Row, list[Reference]]:
    """The run's row and the baselines its reports hold: its random-init reports first (by file name),
    then the "references" of its reports (by file name)."""
    config = read_optional(run_dir / CONFIG)
    summary = read_optional(run_dir / SUMMARY)
    train = config.get("train") or {}
    spec = train.get("dataset")
    own = dataset_name(spec) if spec else None
    row = Row(name=name, path=str(run_dir), dataset=own, steps=summary.get("steps"),
              wall_time_s=summary.get("wall_time_s"))
    files: list[Reference] = []
    inside: list[Reference] = []

    by_dataset: dict[str, list[dict]] = {}
    single: dict[str, list[dict]] = {"linear_probe": [], "knn": []}  # probes with one entry per row
    imported = None
    for probe, pattern in (("fewshot", FEWSHOT_GLOB), ("linear_probe", LINEAR_PROBE_GLOB), ("knn", KNN_GLOB)):
        for path, report in read_reports(run_dir, pattern):
            imported = imported or report.get("imported")  # a timm model's reports (mpp.eval.timm_io): no config
            entry = PROBES[probe][1](path, report, run_dir, spec)
            inside += references_of(path, report, run_dir, name, config, probe)
            if is_random_init(path, report):
                files.append(Reference(name, "random-init", *report_arch(report, config), probe, entry))
            elif probe == "fewshot":
                by_dataset.setdefault(entry["dataset"], []).append(entry)
            else:
                single[probe].append(entry)
    row.fewshot = {ds: pick(entries, None, f"few-shot ({ds})", name, notes) for ds, entries in by_dataset.items()}
    row.linear_probe = pick(single["linear_probe"], own, "linear-probe", name, notes)
    row.knn = pick(single["knn"], own, "k-NN", name, notes)

    tunes = [finetune_entry(p, r, run_dir, spec) for pattern in FINETUNE_GLOBS for p, r in read_reports(run_dir, pattern)]
    row.finetune = pick(tunes, own, "fine-tune", name, notes)
    row.objective, row.label = objective_label(config, summary, row.finetune)
    if row.objective is None and imported:
        row.label = f"timm ({imported['name']})"
    row.loss_scale = loss_scale(config, row.objective)
    if row.objective == "finetune" and row.finetune and row.steps is None:  # a fine-tune run: its own training
        row.steps, row.wall_time_s = row.finetune.get("steps"), row.finetune.get("wall_time_s")
    note_stale(row, notes)
    return row, files + inside


def note_stale(row: Row, notes: list[str]) -> None:
    """A few-shot or k-NN report of an earlier checkpoint than the run's end is worth saying."""
    for entry in [*row.fewshot.values(), *([row.knn] if row.knn else [])]:
        if row.steps and entry.get("step") and entry["step"] != row.steps:
            notes.append(f"{row.name}: {entry['file']} evaluated the step-{entry['step']} checkpoint "
                         f"of {row.steps} steps")


def source_of(ref: Reference) -> str:
    """Where a baseline was read: `mpp/fewshot-random-init.json`, `mpp/fewshot.json references.pixels`."""
    return f"{ref.run}/{ref.entry['file']}" + (f" {ref.entry['in']}" if ref.entry["in"] else "")


BASELINE_NAMES = {"random-init": "random init", "pixels": "raw pixels"}


def baseline_rows(found: list[Reference], notes: list[str]) -> list[Row]:
    """One row per (baseline kind, model, evaluation dataset): random init per architecture, raw pixels
    per image size. The first found is shown: runs in the order given, in a run its random-init files
    before its reports' references (mpp.report.reports.read_run's order); a note names it when there were more."""
    rows: dict[tuple, Row] = {}
    shown: dict[tuple, list[Reference]] = {}  # (row key, probe) → every reference found, the shown one first
    for ref in sorted(found, key=lambda r: r.kind != "random-init"):  # random init first, pixels after: stable
        key = (ref.kind, ref.key, ref.entry["dataset"])
        name = BASELINE_NAMES[ref.kind]
        row = rows.setdefault(key, Row(name=f"{name} ({ref.label})", kind=ref.kind, label=name))
        if ref.run not in row.sources:
            row.sources.append(ref.run)
        shown.setdefault((key, ref.probe), []).append(ref)
        if ref.probe == "fewshot" and ref.entry["dataset"] not in row.fewshot:
            row.fewshot[ref.entry["dataset"]] = ref.entry
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
            notes.append(f"{rows[key].name}, {PROBES[probe][0]} on {key[2]}: shown once, from {source_of(refs[0])} "
                         f"({rule}); {'; '.join(where)}")
    return list(rows.values())


def _scores(entry: dict):
    """What a baseline's table cells show: its linear-probe accuracy or its few-shot results."""
    return entry["accuracy"] if "accuracy" in entry else entry["results"]
