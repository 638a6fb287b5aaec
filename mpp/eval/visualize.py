"""Pictures of what MPP predicts: for a few held-out images, the corrupted input as the model saw it,
its predicted targets and the true ones (`prediction_mosaic`), as one CHW float image in [0, 1] for
a PNG or TensorBoard's `add_image`. Where the ViT attends is mpp.eval.attention_maps'. What
eval/visualize.py is asked to draw is a `VisualizeConfig` (its flags, mpp.core.config).

Nothing here changes what it is given: the corruption draws from its own seeded generator (torch's,
numpy's and Python's global generators are untouched), the model runs in eval mode under no_grad
and is put back in the modes it was in, so a training loop can draw one at every evaluation and
still end bitwise the same.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from mpp.core.config import AT_LEAST_1, SEED, Range, check_device, check_ranges, device_flag
from mpp.core.errors import UsageError
from mpp.data.datasets import ImageDataset
from mpp.eval.features import DEFAULT_DEVICE, evaluating
from mpp.eval.probes import fixed_subset
from mpp.model.objective import KEPT, RANDOM, MPPConfig, MPPObjective, patchify
from mpp.model.vit import ViT
from mpp.run.checkpoint import check_shapes

GREY = 0.5  # a [mask] patch in the input panel
RANDOM_BORDER = (1.0, 0.55, 0.0)  # orange: replaced by a random other patch of the batch (its pixels shown)
KEPT_BORDER = (0.0, 0.8, 1.0)  # cyan: corrupted but left unchanged (still predicted)
DIM = 0.3  # the brightness of the patches a prediction panel does not predict
GAP = 2  # white pixels between panels and rows
MIN_PANEL = 64  # small images are enlarged (nearest) to at least this many pixels a side
PANELS = ("original", "input", "predicted", "target")
LEGEND = ("columns: original | the input as the model saw it (grey: [mask]; orange border: a random other patch "
          "of the batch; cyan border: kept unchanged, still predicted) | the predicted target on the corrupted "
          "patches, the rest dimmed | the true target, drawn the same way")


WHAT = ("predictions", "attention")  # the pictures eval/visualize.py draws


@dataclass(frozen=True)
class VisualizeConfig:
    run: str = "runs/mpp"  # run directory or checkpoint file
    what: tuple[str, ...] | None = None  # which pictures (default: both; predictions only for an MPP run,
        # skipped with a note otherwise)
    images: int = 8  # held-out images, one row each
    seed: int = 0  # seed of the corruption drawn for the predictions
    dataset: str | None = None  # dataset spec whose test split (or, without one, the split pretraining
        # holds out) is drawn (default: the run's)
    output: str | None = None  # folder for the PNGs (default: RUN_DIR/visualize)
    device: str = DEFAULT_DEVICE  # cpu, cuda or cuda:N (default: cuda if there is one)

    # What each numeric field accepts (checked at parse time and by validate(); mpp.core.config.Range).
    RANGES: ClassVar[dict[str, Range]] = {"images": AT_LEAST_1, "seed": SEED}
    FLAG_ARGS: ClassVar[dict[str, dict]] = {
        "run": {"metavar": "RUN_DIR"}, "what": {"choices": WHAT}, "images": {"metavar": "N"},
        "dataset": {"metavar": "SPEC"}, "output": {"metavar": "DIR"}, "device": {"type": device_flag},
    }

    def validate(self) -> VisualizeConfig:
        """The flags' own checks, for a config built in code."""
        check_ranges(self)
        for what in self.what or ():
            if what not in WHAT:
                raise UsageError(f"--what {what!r} is not one of {', '.join(WHAT)}: pass one of them")
        check_device(self.device)
        return self


def held_out_images(dataset: ImageDataset, n: int) -> torch.Tensor:
    """The same `n` images of `dataset` at every call → (min(n, len), 3, H, W) float in [0, 1].

    A map-style set gives the fixed random subset `mpp.eval.probes.fixed_subset` picks (all of it when
    it holds n or fewer), in index order; a stream its first n. The items come through the set's own
    transform (the eval transform for a held-out split); torch's global generator is left as it was."""
    if n < 1:
        raise UsageError(f"{n} held-out images: pass at least 1")
    with torch.random.fork_rng(devices=[]):  # a transform that draws must not move the caller's stream
        if dataset.streamed:
            items = list(itertools.islice(iter(dataset), n))
        else:
            index = fixed_subset(len(dataset), n)
            items = [dataset[int(i)] for i in (range(len(dataset)) if index is None else index)]
    if not items:
        raise UsageError(f"the data set {dataset.info.spec} has no images to draw: pass a --dataset with a test split")
    images = torch.stack([image for image, _ in items])  # (n, 3, H, W)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def tile(rows: list[list[torch.Tensor]], scale: int | None = None) -> torch.Tensor:
    """Rows of equal-sized panels (3, h, w) → one image (3, R·h·s + (R+1)·GAP, C·w·s + (C+1)·GAP) on a
    white ground, each panel enlarged s times (nearest; default: to at least MIN_PANEL pixels)."""
    h, w = rows[0][0].shape[1:]
    s = scale or max(1, -(-MIN_PANEL // max(h, w)))
    R, C = len(rows), max(len(r) for r in rows)
    out = torch.ones(3, R * h * s + (R + 1) * GAP, C * w * s + (C + 1) * GAP)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            big = panel.float().cpu().repeat_interleave(s, 1).repeat_interleave(s, 2)  # (3, h·s, w·s)
            top, left = GAP + r * (h * s + GAP), GAP + c * (w * s + GAP)
            out[:, top:top + h * s, left:left + w * s] = big.clamp(0, 1)
    return out


def unpatchify(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, P, P, 3) pixels, patches in row-major order → (B, 3, grid·P, grid·P): patchify's inverse."""
    B, N, P = patches.shape[:3]
    x = patches.reshape(B, grid, grid, P, P, 3)  # (B, h, w, P, P, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, grid * P, grid * P)


def bordered(patches: torch.Tensor, color: tuple[float, float, float]) -> torch.Tensor:
    """(M, P, P, 3) → the same with a frame in `color`, 1 pixel wide per 8 of P (at least 1)."""
    out = patches.clone()
    b = max(1, patches.shape[1] // 8)
    rgb = torch.tensor(color, dtype=out.dtype, device=out.device)  # (3,)
    out[:, :b], out[:, -b:], out[:, :, :b], out[:, :, -b:] = rgb, rgb, rgb, rgb
    return out


def prediction_mosaic(objective: MPPObjective, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One row per image of `images` (B, 3, H, W) in [0, 1], four panels (PANELS; LEGEND says what
    each shows) → (3, B·H·s + (B+1)·GAP, 4·W·s + 5·GAP) float in [0, 1] on the CPU (s: `tile`'s scale).

    The corruption is drawn from a torch.Generator seeded `seed`, so the same call draws the same
    picture; the model's parameters, modes and every global generator are left as they were."""
    entry = objective.entry
    if entry.decode is None or entry.render is None:
        raise UsageError(f"MPP target '{entry.name}' has no rendering: give its Target a decode and a render "
                         "(mpp/model/objective.py) to draw its predictions")
    device = objective.mask_token.device
    images = images.to(device, torch.float32)
    B, _, H, W = images.shape
    P, config = objective.vit.config.patch_size, objective.config
    grid = H // P
    with evaluating(objective):
        generator = torch.Generator(device=device).manual_seed(seed)
        pred, target, corruption = objective.predict(images, generator=generator)  # (B, n, ·), (B, n, ...)
        predicted = entry.render(entry.decode(pred.flatten(0, 1), config), P, config)  # (M, P, P, 3)
        truth = entry.render(target.flatten(0, 1), P, config)  # (M, P, P, 3)
    pixels = patchify(images, P).reshape(B * grid * grid, P, P, 3)  # (B·N, P, P, 3)
    kind = corruption.kind.flatten()  # (B·N,)
    # The input: every position shows the pixels of the patch its embedding came from (row B·N: [mask]).
    table = torch.cat([pixels, torch.full_like(pixels[:1], GREY)])  # (B·N + 1, P, P, 3)
    seen = table[corruption.source.flatten()]  # (B·N, P, P, 3)
    seen[kind == RANDOM] = bordered(seen[kind == RANDOM], RANDOM_BORDER)
    seen[kind == KEPT] = bordered(seen[kind == KEPT], KEPT_BORDER)
    flat = (corruption.chosen + torch.arange(B, device=device)[:, None] * grid * grid).flatten()  # (M,) b·N + i
    panels = [images]
    for drawn in (seen, predicted, truth):
        if drawn is not seen:
            drawn = (pixels * DIM).index_copy(0, flat, drawn.to(pixels.dtype))  # (B·N, P, P, 3)
        panels.append(unpatchify(drawn.reshape(B, grid * grid, P, P, 3), grid))  # (B, 3, H, W)
    return tile([[panel[b] for panel in panels] for b in range(B)])


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """(3, H, W) float in [0, 1] → an 8-bit RGB PNG at `path` (its folder is made)."""
    import PIL.Image

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
        PIL.Image.fromarray(array).save(path)
    except OSError as e:
        raise UsageError(f"cannot write '{path}' ({e.strerror or e}): pass a writable --output") from e
    return path


def mpp_objective(config: dict, vit: ViT, objective_state: dict, source: str) -> MPPObjective:
    """The MPP objective a run trained, around its trained `vit`: the run config's "mpp" section and a
    checkpoint's "objective" weights ([mask] embedding, head), shape-checked."""
    known = MPPConfig.__dataclass_fields__
    objective = MPPObjective(vit, MPPConfig(**{k: v for k, v in config["mpp"].items() if k in known}))
    weights = {**objective_state, **{f"vit.{k}": v for k, v in vit.state_dict().items()}}
    check_shapes(objective, weights, source,
                 "pass the run directory the checkpoint came from (its config builds the head)")
    objective.load_state_dict(weights)
    return objective
