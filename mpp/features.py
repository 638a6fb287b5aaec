"""Frozen-ViT features for the probes: extraction in dataset order, the pooling that makes one vector
per image, and the sharing of the work across the processes of `accelerate launch`.

A probe embeds images with the eval transform in eval mode; it reads the labels from the data set
(`labels()`, mpp.datasets), which decodes no image.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mpp.data import normalize
from mpp.errors import UsageError

FEATURES = ("token", "avg")  # the paper's class-token pre-logits | the mean of the final-norm patch tokens


def pool(outputs: dict[str, torch.Tensor], features: str) -> torch.Tensor:
    """(B, D) features from `ViT.forward_features` outputs: the class token (the paper's
    representation) or the average patch token (MPP trains the patch tokens, not the class token)."""
    if features == "token":
        return outputs["pre_logits"]  # (B, D)
    if features == "avg":
        return outputs["tokens"][:, 1:].mean(1)  # (B, N, D) -> (B, D)
    raise UsageError(f"unknown --features '{features}': use {' or '.join(FEATURES)}")


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


@torch.no_grad()
def extract_features(vit, dataset, batch_size: int = 256, device="cpu", indices=None, num_workers: int = 0,
                     progress: bool = True, desc: str = "features",
                     features: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [n, D], labels long [n]) of `dataset` (or of its `indices` only), in order.

    Under `accelerate launch` each process embeds a contiguous share and every process gets all
    the features back, in dataset order: no image is embedded twice or dropped."""
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    state = process_group()
    device = process_device(device, state)
    if state is not None:
        order = [int(i) for i in np.array_split(np.asarray(order, dtype=np.int64), state.num_processes)[state.process_index]]
        progress = progress and state.is_main_process
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = vit.training
    vit.eval().to(device)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        out = pool(vit.forward_features(normalize(images.to(device))), features)  # (B, D)
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(y).reshape(-1))
    vit.train(was_training)
    if state is not None:  # [(features, labels) of process 0, of process 1, ...]: contiguous shares in order
        from accelerate.utils import gather_object

        shares = gather_object([(feats, labels)])
        feats = [f for share, _ in shares for f in share]
        labels = [y for _, share in shares for y in share]
    if not feats:
        raise UsageError("few-shot evaluation got an empty dataset: pass a dataset with images in both splits")
    return torch.cat(feats), torch.cat(labels).long()  # (n, D), (n,)
