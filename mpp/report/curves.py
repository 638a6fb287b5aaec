"""Training curves read back from a run directory: its TensorBoard events, else its metrics.jsonl.

A curve is [(step, value)] per tag; only train/loss and eval/* are curves a comparison draws
(the learning rate and the like are not).
"""
from __future__ import annotations

import json
from pathlib import Path

from mpp.run.rundir import CONFIG, METRICS, TENSORBOARD

Curves = dict[str, list[tuple[int, float]]]  # tag → [(step, value)]
# A fine-tune directory (eval/finetune.py) logs every training in a folder of its own: the seed-0
# training at the chosen lr stands for it.
EVENT_FOLDERS = (TENSORBOARD, f"{TENSORBOARD}/seed0")


def is_curve_tag(tag: str) -> bool:
    return tag == "train/loss" or tag.startswith("eval/")


def tensorboard_scalars(folder: Path) -> Curves:
    """Every scalar of the events files directly in `folder` (not its subfolders: few-shot points live there)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0}).Reload()  # 0: keep every point
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_scalars(path: Path) -> Curves:
    """metrics.jsonl's scalars; a torn last line of a run still writing is skipped."""
    found: Curves = {}
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


def read_curves(run_dir: str | Path) -> tuple[str | None, Curves]:
    """(source, {tag: [(step, value)]}) of train/loss and eval/* from TensorBoard (the run's own events,
    else a fine-tune's seed-0 training), else metrics.jsonl; (None, {}) when the run logged none."""
    run_dir = Path(run_dir)
    for source in EVENT_FOLDERS:
        folder = run_dir / source
        scalars = tensorboard_scalars(folder) if folder.is_dir() else {}
        curves = {t: v for t, v in scalars.items() if is_curve_tag(t)}
        if curves:
            return source, curves
    curves = {t: v for t, v in metrics_scalars(run_dir / METRICS).items() if is_curve_tag(t)}
    return (METRICS if curves else None), curves


# The in-run probe's points (mpp.eval.fewshot_monitor): <probe>[_avg]/<dataset>/<n><unit>, n shots or neighbours.
IN_RUN_PROBES = {"fewshot": "shot", "knn": "nn"}


def probe_tag(tag: str) -> tuple[str, str, int] | None:
    """(probe, dataset, n) of an in-run probe's tag, the class token's or the mean patch token's
    ("knn_avg/digits/20nn" → ("knn", "digits", 20)); None for any other tag."""
    parts = tag.split("/")
    probe = parts[0].removesuffix("_avg")
    if len(parts) != 3 or probe not in IN_RUN_PROBES or not parts[2].endswith(IN_RUN_PROBES[probe]):
        return None
    n = parts[2].removesuffix(IN_RUN_PROBES[probe])
    return (probe, parts[1], int(n)) if n.isdigit() else None


def read_probe_curves(run_dir: str | Path) -> tuple[int | None, Curves]:
    """(the run's global batch size, {tag: [(step, accuracy)]}) of the in-run probe (`--fewshot-every`:
    few-shot and k-NN), from metrics.jsonl; (None, {}) when the run has none."""
    run_dir = Path(run_dir)
    curves = {t: v for t, v in metrics_scalars(run_dir / METRICS).items() if probe_tag(t)}
    try:
        batch = json.loads((run_dir / CONFIG).read_text())["train"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        batch = None
    return (batch if isinstance(batch, int) else None), curves
