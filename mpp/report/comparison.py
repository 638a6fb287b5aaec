"""A comparison of run directories: which folders are runs and their names, then the table, the
plots and the TensorBoard text written into one output folder (eval/compare.py is its command line).

    compare(run_dirs, output_dir=None, names=None) → the report compare.json holds

Rows are read by mpp.report.reports (runs, then the random-init and raw-pixels baselines), tables drawn
by mpp.report.tables (with per-block tables when reports have "layers"), curves read by mpp.report.curves, the
position-embedding similarity by mpp.report.posembed, figures by mpp.report.plots.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mpp.core.errors import UsageError
from mpp.core.files import atomic_write, writable_dir, write_json
from mpp.report.curves import read_curves, read_probe_curves
from mpp.report.entries import as_json
from mpp.report.plots import (
    plot_curves,
    plot_fewshot,
    plot_fewshot_curves,
    plot_layers,
    plot_pos_embed,
    run_colors,
)
from mpp.report.posembed import checkpoint_pos_embed
from mpp.report.reports import Row, baseline_rows, read_run
from mpp.report.tables import (
    LayerView,
    build_tables,
    layer_tables,
    layer_views,
    render,
    row_layers,
)
from mpp.run.rundir import CONFIG, REPORT_GLOBS, TENSORBOARD

REPORT = "compare.json"  # a comparison's own output: a folder holding it is skipped, not compared
MARKDOWN = "compare.md"
EXPECTED = f"{CONFIG} or a result ({', '.join(REPORT_GLOBS)})"
TB_SUFFIX = ".compare"  # marks the events files a comparison writes, so a rerun replaces only its own


# ---------------------------------------------------------------- run directories and names

def check_run_dir(path: Path) -> bool:
    """True for a run; False for a comparison's own output (skipped, so `runs/*` globs work)."""
    if not path.is_dir():
        raise UsageError(f"run directory '{path}' does not exist: pass run directories written by "
                         "scripts/pretrain_*.py or the eval/ scripts")
    if (path / CONFIG).is_file() or any(next(path.glob(g), None) for g in REPORT_GLOBS):
        return True
    if (path / REPORT).is_file():
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
    spec.append(("compare", output / TENSORBOARD))
    return "tensorboard --logdir_spec " + ",".join(f"{name}:{shown_path(p)}" for name, p in spec)


def write_tensorboard_text(folder: Path, markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"events.out.tfevents.*{TB_SUFFIX}"):  # the previous comparison's table, nothing else
        old.unlink()
    with SummaryWriter(str(folder), filename_suffix=TB_SUFFIX) as tb:
        tb.add_text("compare", markdown, global_step=0)


# ---------------------------------------------------------------- the comparison

def selected_runs(given: list[Path], names: list[str] | None, notes: list[str]) -> tuple[list[Path], list[str]]:
    """The run directories among `given` (a comparison's output folder is skipped, with a note) and their names."""
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
    return paths, run_names(paths, names)


def draw(runs: list[Row], baselines: list[Row], tables: list[dict], views: list[LayerView],
         pos_embeds: list[dict | None], output: Path, notes: list[str]) -> dict:
    """fewshot.png, layers.png, curves.png, fewshot_curves.png and pos_embed-<run>.png in `output`; what
    compare.json says of them."""
    colors = run_colors(runs + baselines)
    plots: dict = {"fewshot": None, "layers": None, "curves": None, "fewshot_curves": None, "pos_embed": {}}
    datasets = [t["dataset"] for t in tables if t["dataset"]]
    if datasets:
        plot_fewshot(runs + baselines, datasets, output / "fewshot.png", colors)
        plots["fewshot"] = {"file": "fewshot.png", "panels": datasets}
    if views:
        plot_layers(runs, baselines, views, output / "layers.png", colors)
        plots["layers"] = {"file": "layers.png", "panels": [v.title() for v in views],
                           "runs": [r.name for r in runs if any(row_layers(r, v) for v in views)]}
    curves, sources = {}, {}
    for run in runs:
        sources[run.name], curves[run.name] = read_curves(run.path)
    if any(curves.values()):
        panels = plot_curves(runs, curves, output / "curves.png", colors)
        plots["curves"] = {"file": "curves.png", "panels": panels, "sources": sources}
    else:
        notes.append("no training curves: no run has TensorBoard events or metrics.jsonl with train/loss or eval/*")
    probed = {run.name: found for run in runs if (found := read_probe_curves(run.path))[1]}
    if probed:  # the in-run probe (--fewshot-every: few-shot and k-NN) against images seen
        panels = plot_fewshot_curves(runs, probed, output / "fewshot_curves.png", colors)
        plots["fewshot_curves"] = {"file": "fewshot_curves.png", "panels": panels, "runs": list(probed)}
    for run, found in zip(runs, pos_embeds, strict=True):
        if found:
            file = f"pos_embed-{safe_name(run.name)}.png"
            plot_pos_embed(run.name, found, output / file)
            plots["pos_embed"][run.name] = {"file": file, "checkpoint": found["checkpoint"], "step": found["step"],
                                            "grid": list(found["similarity"].shape[:2])}
    return plots


def compare(run_dirs: list[str | Path], output_dir: str | Path | None = None, names: list[str] | None = None) -> dict:
    """Read the runs, write compare.md / compare.json / the plots / TensorBoard text into
    `output_dir` (default: <the runs' common parent>/compare), and return what compare.json holds."""
    if not run_dirs:
        raise UsageError("no run directory given: pass one or more run directories")
    notes: list[str] = []
    paths, names = selected_runs([Path(p) for p in run_dirs], names, notes)
    parent = common_parent(paths)
    output = writable_dir(Path(output_dir) if output_dir else parent / "compare", "--output")

    runs, randoms = [], []
    for path, name in zip(paths, names, strict=True):
        row, found = read_run(path, name, notes)
        runs.append(row)
        randoms += found
    baselines = baseline_rows(randoms, notes)
    # Read before anything is drawn: a run refused for an unsafe checkpoint leaves no half-written plots.
    pos_embeds = [checkpoint_pos_embed(Path(run.path), notes, run.name) for run in runs]
    tables = build_tables(runs, baselines)
    views = layer_views(runs, [t["dataset"] for t in tables])
    by_block = layer_tables(runs, baselines, views)
    plots = draw(runs, baselines, tables, views, pos_embeds, output, notes)

    drawn = [output / p["file"] for p in (plots["fewshot"], plots["layers"], plots["curves"], plots["fewshot_curves"],
                                          *plots["pos_embed"].values()) if p]
    files = [output / MARKDOWN, output / REPORT, *drawn]
    markdown = render(tables, notes, by_block)
    command = tensorboard_command(parent, output, runs)
    report = {"runs": [as_json(r) for r in runs],
              "random_init": [as_json(r) for r in baselines if r.kind == "random-init"],
              "pixels": [as_json(r) for r in baselines if r.kind == "pixels"],
              "main_dataset": tables[0]["dataset"], "tables": tables, "layer_tables": by_block,
              "notes": notes, "plots": plots,
              "markdown": markdown, "output": str(output),
              "tensorboard": {"logdir": shown_path(parent), "command": command, "text": str(output / TENSORBOARD)},
              "files": [str(f) for f in files]}
    atomic_write(output / MARKDOWN, lambda f: f.write(markdown.encode()))
    write_json(output / REPORT, report)
    write_tensorboard_text(output / TENSORBOARD, markdown)
    return report
