"""What the training loops of pretraining (mpp.train.pretrain) and fine-tuning (mpp.train.finetune) share.

- `data_loaders` / `eval_loader`: the prepared (sharded) loaders of one process;
- `agree`: one collective per step that tells every process whether any saw a non-finite loss or a
  stop signal, so they raise or stop together and none is left waiting;
- `optimizer_step`: backward, gradient clipping and the optimizer step;
- `evaluate`: metrics summed over a held-out split, every image once, gathered from every process.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from mpp.run.runtime import loader_kwargs


def data_loaders(train_set: Dataset, eval_set: Dataset, micro_batch: int, num_workers: int, accelerator,
                 streamed: bool = False) -> tuple[DataLoader, DataLoader]:
    """The prepared (sharded) training and evaluation loaders of one process.

    Training: one seeded shuffle (seed + epoch) split into per-process batches, so each image is seen
    at most once per epoch across processes (a last partial batch is dropped), and the global batch
    of step t holds the same images whatever the process count; a stream is read in its own order.
    Evaluation: see `eval_loader`."""
    kw = loader_kwargs(micro_batch, num_workers)
    train_loader = accelerator.prepare(DataLoader(train_set, shuffle=not streamed, drop_last=True, **kw))
    return train_loader, eval_loader(eval_set, accelerator, kw)


def eval_loader(eval_set: Dataset, accelerator, kw: dict) -> DataLoader:
    """Each held-out image exactly once across processes, none repeated to even out their shares
    (`evaluate` gathers counts, so unequal shares are fine)."""
    even = accelerator.even_batches
    accelerator.even_batches = False
    loader = accelerator.prepare(DataLoader(eval_set, **kw))
    accelerator.even_batches = even
    return loader


def agree(accelerator, loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(some process's loss is not finite, some process was asked to stop), the same on every process."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop_requested), device=loss.device)])  # [2]
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    return bool(flags[0] > 0), bool(flags[1] > 0)


def optimizer_step(accelerator, module: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   grad_clip: float) -> torch.Tensor | None:
    """Backward, then (once the gradients are synchronised) clip their global norm to `grad_clip`
    (0: no clipping); returns that norm, or None. Under `accelerator.accumulate` the optimizer only
    steps on the last micro-batch."""
    accelerator.backward(loss)
    norm = None
    if accelerator.sync_gradients and grad_clip > 0:
        norm = accelerator.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


BatchSums = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]  # (images, labels) → {metric: sum over the batch}


@torch.no_grad()
def evaluate(module: torch.nn.Module, batch_sums: BatchSums, loader: DataLoader, accelerator, *,
             seed: int | None = None, stop: Callable[[], bool] = lambda: False) -> tuple[dict[str, float], int]:
    """({metric: its sum over the split / the images scored}, images scored), gathered from every process.

    `module` is put in eval mode for the pass. It must not be DDP-wrapped (no collective per batch,
    so processes may hold unequal shares). With `seed`, random draws (MPP's corruption) come from
    seed + process index, so evaluations are comparable, without touching the training RNG. A `stop`
    that turns true ends the pass early; the caller discards those partial metrics."""
    from accelerate.utils import gather_object

    module.eval()
    sums: dict[str, float] = {}
    count = 0
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed + accelerator.process_index)
        for images, labels in loader:
            if stop():
                break
            for k, v in batch_sums(images, labels).items():
                sums[k] = sums.get(k, 0.0) + v
            count += len(images)
    module.train()
    shares = gather_object([(sums, count)])  # one (sums, count) per process
    total = sum(n for _, n in shares)
    keys = dict.fromkeys(k for s, _ in shares for k in s)  # a process with no images has no keys
    return {k: sum(s.get(k, 0.0) for s, _ in shares) / max(1, total) for k in keys}, total
