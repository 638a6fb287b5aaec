"""Position-embedding similarity (the ViT paper's Figure 7) from a run's newest usable checkpoint.

The similarity of every patch's position embedding with every other patch's, as an array
[h, w, h, w] over the patch grid; mpp.report.plots draws it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mpp.report.reports import read_optional
from mpp.run.checkpoint import BadCheckpoint, load_latest
from mpp.run.rundir import CONFIG


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


def patch_grid(config: dict | None, num_embeddings: int) -> tuple[int, int]:
    """(h, w) patches: from the run's ViT config, else the square grid `num_embeddings` fits."""
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
    Read by mpp.run.checkpoint's one loader (weights-only: a checkpoint never runs code), memory-mapped so
    only pos_embed comes off the disk. A torn or unsafe newer one is noted and passed over; a run with
    no usable checkpoint left but an unsafe one is refused, as by every other entry point."""
    def skipped(path: Path, e: BadCheckpoint) -> None:
        notes.append(f"{name}: skipped {e.kind} checkpoint {path.name} ({e.reason})")

    found = load_latest(run_dir, mmap=True, skipped=skipped)
    if found is None:
        return None
    state, path = found
    weights = state.get("model", state)
    pos = weights.get("pos_embed") if isinstance(weights, dict) else None
    if pos is None:
        notes.append(f"{name}: {path.name} holds no model.pos_embed")
        return None
    config = state.get("config") or read_optional(run_dir / CONFIG) or None
    grid = patch_grid(config, pos.reshape(-1, pos.shape[-1]).shape[0])  # pos: [1, N, D] or [N, D]
    try:
        similarity = pos_embed_similarity(pos, grid)
    except ValueError as e:
        notes.append(f"{name}: {path.name}: {e}")
        return None
    step = state.get("step")
    return {"similarity": similarity, "checkpoint": str(path), "step": step if isinstance(step, int) else None}
