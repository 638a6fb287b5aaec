"""The comparison's figures: few-shot accuracy vs shots, training curves, position-embedding similarity.

Plots are drawn on matplotlib `Figure`s (Agg), never through pyplot, so a program that draws them
keeps its own matplotlib backend. Each run has one colour in every figure (`run_colors`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpp.reports import Row
from mpp.tables import shot_counts


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def run_colors(rows: list[Row]) -> dict[str, str]:
    """One colour per row, the same in every plot."""
    return {r.name + r.kind: f"C{i % 10}" for i, r in enumerate(rows)}


def plot_fewshot(rows: list[Row], datasets: list[str], path: Path, colors: dict[str, str]) -> None:
    """Accuracy vs shots (log x, error bars = std), one panel per dataset; baselines dashed."""
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
    """One panel per (tag, loss scale) of `curve_panels`, three to a row; returns the number of panels."""
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


def mosaic(sim: np.ndarray, gap: int = 1) -> np.ndarray:
    """[h, w, h, w] → one image of h×w tiles, tile (i, j) = sim[i, j], NaN gaps between tiles."""
    h, w = sim.shape[:2]
    out = np.full((h * (h + gap) - gap, w * (w + gap) - gap), np.nan)
    for i in range(h):
        for j in range(w):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = sim[i, j]
    return out


def plot_pos_embed(name: str, found: dict, path: Path) -> None:
    """An h×w grid of h×w tiles (tile (i, j): patch (i, j) against all patches) of mpp.posembed's similarity."""
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
