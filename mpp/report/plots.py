"""The comparison's figures: few-shot accuracy vs shots, accuracy by block, training curves, the
in-run probe's curves (few-shot and k-NN), position-embedding similarity.

Plots are drawn on matplotlib `Figure`s (Agg), never through pyplot, so a program that draws them
keeps its own matplotlib backend. Each run has one colour in every figure (`run_colors`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpp.report.curves import IN_RUN_PROBES, probe_tag
from mpp.report.reports import Row
from mpp.report.tables import LayerView, accuracy, reference_accuracy, row_layers, shot_counts


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def run_colors(rows: list[Row]) -> dict[str, str]:
    """One colour per row, the same in every plot."""
    return {r.name + r.kind: f"C{i % 10}" for i, r in enumerate(rows)}


BASELINE_STYLES = {"random-init": "--", "pixels": ":"}  # a run's lines are solid


def plot_fewshot(rows: list[Row], datasets: list[str], path: Path, colors: dict[str, str]) -> None:
    """Accuracy vs shots (log x, error bars = std), one panel per dataset; random init dashed, raw pixels dotted."""
    from matplotlib.ticker import NullFormatter

    fig = new_figure(5.5 * len(datasets), 4.2)
    for ax, dataset in zip(fig.subplots(1, len(datasets), squeeze=False)[0], datasets, strict=True):
        shots = shot_counts(rows, dataset)
        for row in (r for r in rows if dataset in r.fewshot):
            results = row.fewshot[dataset].results
            ks = sorted(results)
            ax.errorbar(ks, [100 * results[k].mean for k in ks], yerr=[100 * results[k].std for k in ks],
                        marker="o", capsize=3, label=row.name, color=colors[row.name + row.kind],
                        linestyle=BASELINE_STYLES.get(row.kind, "-"))
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the evaluated shot counts are labelled
        ax.set(title=f"few-shot on {dataset}", xlabel="examples per class", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per feature variant, in the order first seen


def plot_layers(runs: list[Row], baselines: list[Row], views: list[LayerView], path: Path,
                colors: dict[str, str]) -> None:
    """Accuracy by block, one panel per evaluation (three to a row): a line per (run, feature variant)
    in the run's colour, a marker per variant; its random init per block dashed; raw pixels dotted."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    variants = list(dict.fromkeys(v for r in runs for view in views if (layers := row_layers(r, view))
                                  for v in layers.variants))
    markers = {v: VARIANT_MARKERS[i % len(VARIANT_MARKERS)] for i, v in enumerate(variants)}
    cols = min(3, len(views))
    rows_n = -(-len(views) // cols)
    fig = new_figure(5.2 * cols, 3.8 * rows_n + 0.9)  # the shared legend below
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, view in zip(axes, views, strict=False):  # the grid's spare axes are hidden below
        for run in runs:
            layers = row_layers(run, view)
            if layers is None:
                continue
            for results, style in (layers.results, "-"), (layers.random_init or {}, BASELINE_STYLES["random-init"]):
                for var in layers.variants:
                    points = [(b, a) for b in layers.blocks
                              if (a := accuracy(results.get(f"{b}/{var}"), view)) is not None]
                    if points:
                        xs, ys = zip(*points, strict=True)
                        ax.plot(xs, [100 * y for y in ys], linestyle=style, marker=markers[var], markersize=4,
                                color=colors[run.name + run.kind], alpha=1.0 if style == "-" else 0.6)
        for row in (b for b in baselines if b.kind == "pixels"):
            if (found := reference_accuracy(row, view)) is not None:
                ax.axhline(100 * found, linestyle=BASELINE_STYLES["pixels"], color=colors[row.name + row.kind],
                           linewidth=1.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks: no 2.5
        ax.set(title=view.title(), xlabel="block", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(views):]:
        ax.set_visible(False)
    # One legend for the figure: colours name runs, markers the features, line styles the baselines.
    pixels = [b for b in baselines if b.kind == "pixels"]
    handles = [Line2D([], [], color=colors[r.name + r.kind], label=r.name) for r in runs
               if any(row_layers(r, v) for v in views)]
    handles += [Line2D([], [], color="black", marker=markers[v], linestyle="none", label=v) for v in variants]
    handles += [Line2D([], [], color="gray", linestyle=BASELINE_STYLES["random-init"],
                       label="random init (same run's colour)")]
    # a pixels row per dataset, but one name (and colour) per resolution: one legend entry each
    shown = {b.name: b for b in pixels if any(reference_accuracy(b, v) is not None for v in views)}
    handles += [Line2D([], [], color=colors[b.name + b.kind], linestyle=BASELINE_STYLES["pixels"], label=name)
                for name, b in shown.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize="small")
    fig.savefig(path, dpi=100)


FLOOR = "eval/floor_"  # the no-learning floor's tags, "eval/floor_<metric>" beside "eval/<metric>"


def curve_panels(runs: list[Row], curves: dict[str, dict]) -> list[tuple[str, str]]:
    """(tag, loss scale) pairs: train/loss first, then the eval tags, each per loss scale.

    An eval tag whose every run logged one point (the end-of-training evaluation, which the table
    already gives) is a lone dot, not a curve: it gets no panel.
    """
    # A floor (eval/floor_<metric>: what no learning scores, mpp.model.floor) is drawn in its metric's panel.
    tags = sorted({t for c in curves.values() for t in c if not t.startswith(FLOOR)},
                  key=lambda t: (t != "train/loss", t))
    scales = list(dict.fromkeys(r.loss_scale or "unknown" for r in runs))

    def series(tag: str, scale: str) -> list[list]:
        return [curves[r.name][tag] for r in runs
                if tag in curves.get(r.name, {}) and (r.loss_scale or "unknown") == scale]

    return [(t, s) for t in tags for s in scales
            if (found := series(t, s)) and (t == "train/loss" or max(map(len, found)) > 1)]


def plot_curves(runs: list[Row], curves: dict[str, dict], path: Path, colors: dict[str, str]) -> int:
    """One panel per (tag, loss scale) of `curve_panels`, three to a row; returns the number of panels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    panels = curve_panels(runs, curves)
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig = new_figure(5 * cols, 3.6 * rows_n)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, (tag, scale) in zip(axes, panels, strict=False):  # the grid's spare axes are hidden below
        values = []
        for run in (r for r in runs if (r.loss_scale or "unknown") == scale and tag in curves.get(r.name, {})):
            steps, ys = zip(*curves[run.name][tag], strict=True)
            ax.plot(steps, ys, marker="." if len(ys) < 30 else None, label=run.name, color=colors[run.name + run.kind])
            values += ys
            floor = curves[run.name].get(tag.replace("eval/", FLOOR, 1)) if tag.startswith("eval/") else None
            if floor:  # the same images and corruption draws, scored without learning: the line to beat
                steps, ys = zip(*floor, strict=True)
                ax.plot(steps, ys, linestyle="--", label=f"{run.name}: no learning", color=colors[run.name + run.kind])
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


def mosaic(sim: np.ndarray, gap: int = 1) -> np.ndarray:
    """[h, w, h, w] → one image of h×w tiles, tile (i, j) = sim[i, j], NaN gaps between tiles."""
    h, w = sim.shape[:2]
    out = np.full((h * (h + gap) - gap, w * (w + gap) - gap), np.nan)
    for i in range(h):
        for j in range(w):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = sim[i, j]
    return out


def plot_pos_embed(name: str, found: dict, path: Path) -> None:
    """An h×w grid of h×w tiles (tile (i, j): patch (i, j) against all patches) of mpp.report.posembed's similarity."""
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


def probe_curve_panels(curves: dict[str, tuple[int | None, dict]]) -> list[LayerView]:
    """An evaluation per in-run probe curve: few-shot, then k-NN; datasets in the order first seen,
    shots or k ascending."""
    found: dict[tuple[str, str], set[int]] = {}
    for _, tags in curves.values():
        for tag in tags:
            probe, dataset, n = probe_tag(tag)
            found.setdefault((probe, dataset), set()).add(n)
    order = sorted(found, key=lambda key: list(IN_RUN_PROBES).index(key[0]))  # stable: datasets as first seen
    return [LayerView(probe, dataset, **{"shots" if probe == "fewshot" else "k": n})
            for probe, dataset in order for n in sorted(found[probe, dataset])]


def plot_fewshot_curves(runs: list[Row], curves: dict[str, tuple[int | None, dict]], path: Path,
                        colors: dict[str, str]) -> list[str]:
    """The in-run probe against images seen (step × batch): one panel per (probe, dataset, shots or
    k), four to a row; a solid line per run (class token), dashed for its mean patch token, and a
    dotted level at its step-0 point (the untrained model: the random-init level). Returns the panel
    titles."""
    from matplotlib.lines import Line2D

    panels = probe_curve_panels(curves)
    cols = min(4, len(panels))
    rows_n = -(-len(panels) // cols)
    fig = new_figure(4.2 * cols, 3.4 * rows_n + 0.7)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    by_images = all(batch for batch, _ in curves.values())  # else every run in steps: one x axis for all
    for ax, view in zip(axes, panels, strict=False):  # the grid's spare axes are hidden below
        n = view.shots if view.probe == "fewshot" else view.k
        for run in runs:
            batch, tags = curves.get(run.name, (None, {}))
            scale = batch if by_images else 1
            for prefix, style in ((view.probe, "-"), (f"{view.probe}_avg", "--")):
                points = tags.get(f"{prefix}/{view.dataset}/{n}{IN_RUN_PROBES[view.probe]}")
                if not points:
                    continue
                steps, values = zip(*sorted(points), strict=True)
                color = colors[run.name + run.kind]
                ax.plot([s * scale for s in steps], [100 * v for v in values], linestyle=style, marker="o",
                        markersize=3, color=color, alpha=1.0 if style == "-" else 0.6)
                if style == "-" and steps[0] == 0:
                    ax.axhline(100 * values[0], linestyle=":", color=color, linewidth=1)
        ax.set(title=view.title(), xlabel="images seen" if by_images else "steps", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colors[r.name + r.kind], label=r.name) for r in runs
               if curves.get(r.name, (0, {}))[1]]
    handles += [Line2D([], [], color="gray", linestyle="-", label="class token (the paper's)"),
                Line2D([], [], color="gray", linestyle="--", label="mean patch token"),
                Line2D([], [], color="gray", linestyle=":", label="step 0: the untrained model")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize="small")
    fig.savefig(path, dpi=100)
    return [view.title() for view in panels]
