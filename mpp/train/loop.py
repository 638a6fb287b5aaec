"""The one training loop, which pretraining (mpp.train.trainer) and fine-tuning (mpp.train.finetune) both run.

- `Built`: a built training as a value (accelerator, the prepared module, optimizer, schedule, loader,
  step budget); `LoopSettings`: how it is stepped; `Hooks`: what the caller adds (the loss of a batch,
  what a non-finite loss says, each epoch's start, logging, and what follows a step: checkpoints and
  evaluations);
- `TrainLoop.run()`: epochs of micro-batches, gradient accumulation, one agreement across processes
  per micro-batch (non-finite loss, stop), the optimizer step and schedule, the metric window and its
  throughput, the progress bar; where it stands is one `Progress`, which a checkpoint saves whole;
- `data_loaders` / `eval_loader`: the prepared (sharded) loaders of one process;
- `agree`, `optimizer_step`: one micro-batch's collective and optimizer step.
Evaluation over a held-out split is mpp.eval.held_out's.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from mpp.core.errors import UsageError
from mpp.core.reproducible import seed_step
from mpp.core.stopping import StopRequest
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


@dataclass
class Progress:
    """Where a training stands; a checkpoint holds it, a resume starts from it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the training set begun
    batch_in_epoch: int = 0  # micro-batches of this process into the epoch (a resume skips them)
    elapsed: float = 0.0  # training seconds before this process started (earlier runs of a resumed run)


@dataclass
class Built:
    """A built training, whole: what the loop steps. Pretraining and fine-tuning each build one."""

    accelerator: object  # accelerate.Accelerator: processes, precision, accumulation
    module: torch.nn.Module  # the prepared (maybe DDP-wrapped) module whose parameters the optimizer steps
    optimizer: torch.optim.Optimizer  # prepared
    scheduler: object  # an LRScheduler, stepped once per optimizer step that was not skipped (fp16 overflow)
    train_loader: DataLoader  # prepared; each process's micro-batches
    total_steps: int  # optimizer steps in all (a resume continues towards it)


@dataclass(frozen=True)
class LoopSettings:
    grad_clip: float  # clip the global gradient norm to this; 0: off
    log_every: int  # optimizer steps between logged training metrics (and at the last step)
    images_per_step: int  # the global batch: images per optimizer step, for the throughput
    accum_steps: int = 1  # micro-batches per optimizer step
    step_seed: int | None = None  # reseed every generator per micro-batch from (this, step, micro, process):
        # bitwise resume; None: don't
    desc: str = ""  # the progress bar's label
    leave_bar: bool = True  # keep the finished bar on screen


class Hooks:
    """What a training adds to the loop. `loss` is required; the rest default to nothing."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to step on, {metric: a 0-dim tensor} averaged into the logged window; include "loss")."""
        raise NotImplementedError

    def diverged(self, step: int) -> str:
        """The one-line error for a loss that is not finite at `step` (in some process)."""
        return f"the loss is not finite at step {step}"

    def on_epoch(self, epoch: int) -> None:
        """Called as each epoch starts (after the loader's own set_epoch)."""

    def log(self, values: dict[str, float], step: int) -> None:
        """The window's training metrics at `step` (identical on every process)."""

    def after_step(self, step: int, stopping: bool) -> bool:
        """After optimizer step `step` and its logging: checkpoints, evaluations. Returns whether to
        stop (`stopping`: a stop was asked for in this step)."""
        return stopping


class TrainLoop:
    """Runs a `Built` training from `progress` to its `total_steps` (or a stop). `micro` is the number
    of micro-batches into the unfinished optimizer step, which a caller rewinds after an interruption."""

    def __init__(self, built: Built, settings: LoopSettings, hooks: Hooks, progress: Progress | None = None,
                 stop: StopRequest | None = None):
        self.built, self.settings, self.hooks, self.stop = built, settings, hooks, stop
        self.progress = progress or Progress()
        self.micro = 0  # micro-batches into the current optimizer step (checkpoints fall between steps)
        self.values: dict[str, float] = {}  # the last logged training metrics
        self.window = _Window()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the throughput: the window counts training only."""
        self.window.started += seconds

    def run(self) -> bool:
        """Train until the step budget or a stop; whether it stopped early."""
        from tqdm.auto import tqdm

        built, progress = self.built, self.progress
        acc = built.accelerator
        bar = tqdm(total=built.total_steps, initial=progress.step, desc=self.settings.desc, dynamic_ncols=True,
                   disable=not acc.is_local_main_process, leave=self.settings.leave_bar)
        self.window = _Window()
        built.module.train()
        stopping = False
        try:
            while progress.step < built.total_steps and not stopping:
                stopping = self._epoch(bar)
        finally:
            bar.close()  # ends the bar's line, so an error message starts on a line of its own
        return stopping

    def _batches(self) -> Iterable:
        built, progress = self.built, self.progress
        built.train_loader.set_epoch(progress.epoch)
        self.hooks.on_epoch(progress.epoch)
        # A resumed run skips the batches of this epoch it has already trained on.
        batches = (built.accelerator.skip_first_batches(built.train_loader, progress.batch_in_epoch)
                   if progress.batch_in_epoch else built.train_loader)
        return self.stop.waiting(batches) if self.stop else batches  # a stop never waits long on data

    def _epoch(self, bar) -> bool:
        """Train through the rest of the current epoch, or until the step budget or a stop; whether to stop."""
        built, settings, progress = self.built, self.settings, self.progress
        acc = built.accelerator
        stopping = False
        for images, labels in self._batches():
            progress.batch_in_epoch += 1
            with acc.accumulate(built.module):
                if settings.step_seed is not None:
                    seed_step(settings.step_seed, progress.step, self.micro, acc.process_index)
                self.micro += 1
                loss, metrics = self.hooks.loss(images, labels)
                bad, stop = agree(acc, loss, bool(self.stop and self.stop.requested))
                stopping = stopping or stop
                if bad:  # every process raises together
                    raise UsageError(self.hooks.diverged(progress.step + 1))
                norm = optimizer_step(acc, built.module, loss, built.optimizer, settings.grad_clip)
                if norm is not None:
                    metrics["grad_norm"] = norm
            self.window.add(metrics)
            if not acc.sync_gradients:
                continue
            self.micro = 0
            stopping = self._after_step(bar, stopping)
            if progress.step >= built.total_steps or stopping:
                return stopping
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0  # the next epoch starts from its first batch
        return stopping

    def _after_step(self, bar, stopping: bool) -> bool:
        built, settings, progress = self.built, self.settings, self.progress
        acc = built.accelerator
        lr = built.optimizer.param_groups[0]["lr"]  # the rate this step used
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            built.scheduler.step()
        progress.step += 1
        self.window.steps += 1
        bar.update(1)
        if progress.step % settings.log_every == 0 or progress.step == built.total_steps:
            self.values = self.window.values(acc, settings, lr)  # a collective: every process computes it
            self.hooks.log(self.values, progress.step)
            bar.set_postfix(loss=f"{self.values['train/loss']:.4f}", lr=f"{lr:.2e}")
            self.window = _Window()
        return self.hooks.after_step(progress.step, stopping)


@dataclass
class _Window:
    """The training metrics summed since the last log, and the time they took."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0  # optimizer steps in the window
    sums: dict = field(default_factory=dict)  # metric → 0-dim tensor summed over micro-batches

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def values(self, acc, settings: LoopSettings, lr: float) -> dict[str, float]:
        """Means over the window (grad_norm: per optimizer step; the rest per micro-batch), averaged
        across processes; the rate of the last step and the window's throughput."""
        n_micro = self.steps * settings.accum_steps
        values = {f"train/{k}": acc.reduce(v, "mean").item() / (n_micro if k != "grad_norm" else self.steps)
                  for k, v in self.sums.items()}
        values["train/lr"] = lr
        values["train/images_per_s"] = self.steps * settings.images_per_step / (time.perf_counter() - self.started)
        return values
