"""The no-learning floor of MPP's held-out metric (mpp.model.floor): on toy images where the
neighbours' mean is known, it scores what it must; an evaluating objective reports it beside its
own metric, and a training one does not."""
from __future__ import annotations

import pytest
import torch

from mpp.model.floor import neighbour_fill, unpatchify
from mpp.model.objective import MASKED, Corruption, MPPConfig, MPPObjective, patchify
from mpp.model.vit import ViT, vit_config

P, GRID = 4, (4, 4)  # 16 px images of 4×4 patches


def ramp() -> torch.Tensor:
    """(1, 3, 16, 16): every channel linear in row and column, so the mean of a patch's four
    neighbours is the patch itself, pixel for pixel."""
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return torch.stack([0.2 + 0.02 * cols, 0.1 + 0.03 * rows, 0.9 - 0.01 * (rows + cols)])[None]


def checkerboard() -> torch.Tensor:
    """(1, 3, 16, 16): patches alternately black and white, so every patch's neighbours are its opposite."""
    cells = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2  # (4, 4)
    return cells.repeat_interleave(P, 0).repeat_interleave(P, 1).float().expand(1, 3, 16, 16).clone()


def corrupt(*cells: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(1, 16, dtype=torch.bool)
    for r, c in cells:
        mask[0, r * 4 + c] = True
    return mask


def test_unpatchify_inverts_patchify():
    images = torch.rand(2, 3, 16, 24)
    assert torch.equal(unpatchify(patchify(images, P), P, (4, 6)), images)


def test_an_interior_patch_of_a_ramp_is_its_neighbours_mean():
    images = ramp()
    filled = neighbour_fill(patchify(images, P), corrupt((1, 2)), GRID)
    assert torch.allclose(filled, patchify(images, P), atol=1e-6)  # exact: nothing to learn here


def test_a_checkerboard_patch_is_guessed_as_its_opposite():
    patches = patchify(checkerboard(), P)  # (1, 16, 48)
    filled = neighbour_fill(patches, corrupt((1, 1)), GRID)
    assert patches[0, 5].unique().tolist() == [0.0] and filled[0, 5].unique().tolist() == [1.0]
    assert torch.equal(filled[0, :5], patches[0, :5]) and torch.equal(filled[0, 6:], patches[0, 6:])


def test_only_visible_neighbours_count_and_none_falls_back_to_the_image_mean():
    patches = torch.arange(16.0).reshape(1, 16, 1)  # one feature: the patch's own index
    # (0, 0)'s neighbours (0, 1) and (1, 0) are corrupted too: the mean of the 13 visible patches.
    filled = neighbour_fill(patches, corrupt((0, 0), (0, 1), (1, 0)), GRID)
    visible = [i for i in range(16) if i not in (0, 1, 4)]
    assert filled[0, 0, 0] == pytest.approx(sum(visible) / len(visible))
    # (0, 1)'s visible neighbours are (0, 2) and (1, 1): indices 2 and 5.
    assert filled[0, 1, 0] == pytest.approx((2 + 5) / 2)


@pytest.mark.parametrize("target, metric, on_ramp, on_board", [
    ("mean_color", "accuracy", 1.0, 0.0), ("downsample", "accuracy", 1.0, 0.0), ("l2", "mse", 0.0, 1.0)])
def test_an_evaluating_objective_reports_the_floor_beside_its_metric(target, metric, on_ramp, on_board):
    torch.manual_seed(0)
    objective = MPPObjective(ViT(vit_config("Micro/4")), MPPConfig(target=target, corrupt_rate=0.05))
    assert not any(k.startswith("floor_") for k in objective.train()(checkerboard())[1])  # training: none
    with torch.no_grad():
        _, metrics = objective.eval()(checkerboard())  # one patch of 16 corrupted, wherever the draw puts it
    assert metric in metrics and float(metrics[f"floor_{metric}"]) == pytest.approx(on_board)
    # On the ramp only an interior patch is its neighbours' mean: that corruption, built by hand.
    chosen = torch.tensor([[6]])  # patch (1, 2)
    kind = torch.zeros(1, 16, dtype=torch.int8)
    kind[0, 6] = MASKED
    corruption = Corruption(torch.zeros(1, 16, 8), chosen, kind, torch.arange(16)[None])
    target_rows = objective.targets(ramp())[:, 6]  # (1, ...)
    floor = objective.floor(ramp(), corruption, target_rows)
    assert float(floor[metric]) == pytest.approx(on_ramp, abs=1e-6)


def test_the_curves_draw_the_floor_dashed_in_its_metric_s_panel(tmp_path, monkeypatch):
    from mpp.report import plots
    from mpp.report.reports import Row

    runs = [Row("a", loss_scale="mpp (mean_color, 50%)")]
    curves = {"a": {"train/loss": [(1, 6.0), (2, 5.0)], "eval/accuracy": [(1, 0.20), (2, 0.28)],
                    "eval/floor_accuracy": [(1, 0.26), (2, 0.26)]}}
    scale = runs[0].loss_scale
    assert plots.curve_panels(runs, curves) == [("train/loss", scale), ("eval/accuracy", scale)]  # no floor panel
    drawn = []
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda ax, x, y, **kw: drawn.append((ax.get_title(), kw)))
    assert plots.plot_curves(runs, curves, tmp_path / "curves.png", {"a" + runs[0].kind: "C0"}) == 2
    styles = [(kw.get("label"), kw.get("linestyle")) for _, kw in drawn]
    assert styles == [("a", None), ("a", None), ("a: no learning", "--")]  # train/loss, then accuracy and its floor
