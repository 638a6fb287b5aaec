"""Frozen-ViT features for the probes: extraction in dataset order, the pooling that makes one vector
per image, and the sharing of the work across the processes of `accelerate launch`.

A probe embeds images with the eval transform in eval mode; it reads the labels from the data set
(`labels()`, mpp.data.datasets), which decodes no image.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mpp.core.errors import UsageError
from mpp.data.sources import normalize
from mpp.run.records import LayerSpec
from mpp.run.runtime import LOADER_LIMIT_S

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the evaluation CLIs' --device
FEATURES = ("token", "avg")  # the paper's class-token pre-logits | the mean of the final-norm patch tokens
POOLS = FEATURES  # how one block's tokens become one vector: its class token | the mean of its patch tokens
# The raw-pixel reference: images area-averaged to at most 32×32 (3,072 numbers), so a probe stays solvable.
PIXEL_GRID = 32


@dataclass(frozen=True)
class FeatureSpec:
    """One representation of an image: block `layer`'s (1..depth) class token or mean patch token,
    with or without the final LayerNorm. The paper's is (depth, "token", norm=True)."""
    layer: int  # 1..depth: the block whose output is read
    pool: str  # token | avg
    norm: bool  # through the ViT's final LayerNorm (as the last layer's features always are)

    @property
    def name(self) -> str:  # "6/token+norm": how reports, tables and plots name it
        return f"{self.layer}/{self.pool}{'+norm' if self.norm else ''}"

    def record(self) -> LayerSpec:
        """As a report's "layers" lists it."""
        return LayerSpec(name=self.name, layer=self.layer, pool=self.pool, norm=self.norm)


def headline_spec(depth: int, features: str = "token") -> FeatureSpec:
    """What `--features token|avg` has always meant: the last block through the final norm."""
    if features not in POOLS:
        raise UsageError(f"unknown --features '{features}': use {' or '.join(FEATURES)}")
    return FeatureSpec(depth, features, True)


def layer_specs(depth: int, layers: Sequence[str] | None) -> list[FeatureSpec]:
    """`--layers all` or block numbers (1..depth, or negative from the end) → every (block, pool,
    norm) feature of those blocks, in block order."""
    if not layers:
        return []
    layers = list(layers)  # a config's tuple or the command line's list
    if "all" in layers and layers != ["all"]:
        raise UsageError(f"--layers {' '.join(layers)}: 'all' stands alone: pass --layers all, or block numbers")
    if layers == ["all"]:
        chosen = list(range(1, depth + 1))
    else:
        chosen = []
        for text in layers:
            try:
                k = int(text)
            except ValueError:
                raise UsageError(f"--layers {text!r} is not a block number: pass all, or numbers 1..{depth} "
                                 "(negative counts from the last)") from None
            k = depth + 1 + k if k < 0 else k
            if not 1 <= k <= depth:
                raise UsageError(f"--layers {text} is outside the model's {depth} blocks: "
                                 f"pass 1..{depth} or -1..-{depth}")
            chosen.append(k)
        chosen = sorted(set(chosen))
    return [FeatureSpec(k, pool, norm) for k in chosen for pool in POOLS for norm in (False, True)]


def pool_tokens(tokens: torch.Tensor, how: str) -> torch.Tensor:
    """(B, N+1, D) tokens → (B, D): the class token or the mean patch token."""
    return tokens[:, 0] if how == "token" else tokens[:, 1:].mean(1)


def vit_featurizer(vit, specs: list[FeatureSpec]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Normalised images (B, 3, H, W) → {spec name: (B, D)} for every spec, from one forward pass
    through the blocks the deepest spec needs."""
    depth = max(s.layer for s in specs)

    def featurize(images: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = vit.forward_blocks(images, depth)  # [(B, N+1, D)] × depth
        normed = {s.layer: vit.norm(blocks[s.layer - 1]) for s in specs if s.norm}  # (B, N+1, D) each
        return {s.name: pool_tokens(normed[s.layer] if s.norm else blocks[s.layer - 1], s.pool) for s in specs}

    return featurize


def pixel_featurizer(image_size: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The raw-pixel reference: normalised images, area-averaged to at most PIXEL_GRID², flattened."""
    grid = pixel_grid(image_size)

    def featurize(images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != grid:
            images = F.adaptive_avg_pool2d(images, grid)  # (B, 3, g, g)
        return {"pixels": images.flatten(1)}  # (B, 3·g²)

    return featurize


def pixel_grid(image_size: int) -> int:
    return min(image_size, PIXEL_GRID)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module | None) -> Iterator[None]:
    """Run `module` in eval mode under no_grad, then put every submodule back in the mode it was in
    (the probes, the in-run probe and the pictures read a model this way; None: nothing to switch)."""
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def process_group():
    """accelerate's process state when started as several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # gloo on a machine without CUDA


def process_device(device, state) -> torch.device:
    """`--device`, or under `accelerate launch` with CUDA this process's own GPU (one GPU per process)."""
    return state.device if state is not None and str(device).startswith("cuda") else torch.device(device)


def is_main_process() -> bool:
    return (state := process_group()) is None or state.is_main_process


def extract_features(vit, dataset, batch_size: int = 256, device="cpu", indices=None, num_workers: int = 0,
                     progress: bool = True, desc: str = "features",
                     features: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [n, D], labels long [n]) of `dataset` (or of its `indices` only), in order:
    the paper's class token (`features="token"`) or the mean patch token ("avg"), after the final norm."""
    spec = headline_spec(vit.config.depth, features)
    found, labels = extract_feature_sets(vit_featurizer(vit, [spec]), vit, dataset, batch_size, device, indices,
                                         num_workers, progress, desc)
    return found[spec.name], labels


def extract_feature_sets(featurize, module, dataset, batch_size: int = 256, device="cpu", indices=None,
                         num_workers: int = 0, progress: bool = True,
                         desc: str = "features") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: features float32 [n, D_name]}, labels long [n]) of `dataset` (or of its `indices`),
    in order, from `featurize` (normalised images → {name: (B, D)}) computed by `module` (a ViT,
    put in eval mode and back; None for the pixels).

    Under `accelerate launch` each process embeds a contiguous share and every process gets all
    the features back, in dataset order: no image is embedded twice or dropped."""
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    state = process_group()
    device = process_device(device, state)
    if state is not None:
        shares = np.array_split(np.asarray(order, dtype=np.int64), state.num_processes)
        order = [int(i) for i in shares[state.process_index]]
        progress = progress and state.is_main_process
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        timeout=LOADER_LIMIT_S if num_workers else 0)  # bounded: a stuck read is one line
    if module is not None:
        module.to(device)
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    with evaluating(module):
        for images, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
            for name, out in featurize(normalize(images.to(device))).items():  # (B, D_name) each
                feats.setdefault(name, []).append(out.float().cpu())
            labels.append(torch.as_tensor(y).reshape(-1))
    if state is not None:  # [(features, labels) of process 0, of process 1, ...]: contiguous shares in order
        from accelerate.utils import gather_object

        shares = gather_object([(feats, labels)])
        names = next((list(f) for f, _ in shares if f), [])
        feats = {n: [t for share, _ in shares for t in share.get(n, [])] for n in names}
        labels = [y for _, share in shares for y in share]
    if not labels or not feats:
        raise UsageError("the probe got an empty dataset: pass a dataset with images in both splits")
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels).long()  # {name: (n, D)}, (n,)
