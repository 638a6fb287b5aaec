"""What no learning scores on MPP's pretext task, the floor its held-out metric is read against.

Each corrupted patch is predicted from the pixel mean of its visible neighbours: the patches above,
below, left and right of it that are not corrupted (none of them visible: the mean of the image's
visible patches). That guess goes through the run's own target function (mean colour, 4×4 cells,
the pixels) and is scored by the target's own metric, on the same images and the same corruption
draws as the model (MPPObjective reports it as "floor_<metric>" beside "<metric>" whenever it
evaluates). Nothing here learns or draws: a run that only matches the floor learned no pretext.
"""
from __future__ import annotations

import torch


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """mpp.model.objective.patchify's inverse: (B, N, P*P*C), N = h·w row-major, pixels as (row, col,
    channel) → (B, C, h·P, w·P)."""
    B, N, F = patches.shape
    (h, w), P = grid, patch_size
    C = F // (P * P)
    x = patches.reshape(B, h, w, P, P, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * P, w * P)


def _beside(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, h, w, ...) → the same shape, each cell holding its neighbour at (row + dy, col + dx); zero
    past the edge (no wrap-around)."""
    out = torch.zeros_like(x)
    h, w = x.shape[1], x.shape[2]
    out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def neighbour_fill(patches: torch.Tensor, corrupted: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """patches (B, N, F) float, corrupted (B, N) bool, grid (h, w) with h·w = N → (B, N, F): each
    corrupted patch replaced by the mean of its visible 4-neighbours (else of the image's visible
    patches; an image with none visible keeps zeros), the others as they were."""
    B, N, F = patches.shape
    h, w = grid
    visible = (~corrupted).to(patches.dtype).reshape(B, h, w, 1)  # (B, h, w, 1)
    x = patches.reshape(B, h, w, F) * visible  # (B, h, w, F): corrupted patches contribute nothing
    sums, counts = torch.zeros_like(x), torch.zeros_like(visible)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        sums += _beside(x, dy, dx)
        counts += _beside(visible, dy, dx)
    image_mean = x.sum((1, 2)) / visible.sum((1, 2)).clamp(min=1)  # (B, F)
    fill = torch.where(counts > 0, sums / counts.clamp(min=1), image_mean[:, None, None, :])  # (B, h, w, F)
    return torch.where(corrupted[..., None], fill.reshape(B, N, F), patches)
