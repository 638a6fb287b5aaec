"""How fast the training data pipeline delivers images (scripts/bench_train.py): the DataLoader with
the real augmentation, set up as training sets it up, timed alone, to show that it outruns the model.
"""
from __future__ import annotations

import time

from torch.utils.data import DataLoader

from mpp.core.errors import UsageError
from mpp.data.sources import build_dataset
from mpp.run.runtime import loader_kwargs


def loader_rate(spec: str, image_size: int, batch: int, workers: int, batches: int) -> dict:
    """Images/s the training DataLoader delivers (shuffled, seeded augmentation, training's
    `loader_kwargs`), after its first batch: worker start-up is not counted."""
    dataset, _ = build_dataset(spec, "train", image_size, train=True, seed=0)  # draws from (0, epoch, index)
    if len(dataset) < batch:
        raise UsageError(f"--dataset {spec} has {len(dataset)} training images, fewer than one batch ({batch}): "
                         f"pass a smaller --batch-size or a larger --dataset")
    loader = DataLoader(dataset, shuffle=True, drop_last=True, **loader_kwargs(batch, workers))
    epoch, images, started = 0, 0, None
    while started is None or images < batches * batch:
        dataset.set_epoch(epoch)
        for x, _ in loader:  # float32 [B, 3, S, S]
            if started is None:  # worker start-up and the first batch are not counted
                started = time.perf_counter()
                continue
            images += len(x)
            if images >= batches * batch:
                break
        epoch += 1
    return {"dataset": spec, "num_workers": workers, "batch_size": batch, "images": images,
            "images_per_s": images / (time.perf_counter() - started)}
