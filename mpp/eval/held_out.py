"""The held-out split inside training: its metrics (`HeldOutMetrics`: the objective's loss and
metrics, "eval/<metric>") and, for MPP, a picture of the predictions on a few of its images
(`PredictionMosaic`); `evaluate`, the pass over a split that fine-tuning's accuracy uses too."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from mpp.core.errors import UsageError
from mpp.eval.evaluator import Evaluator, RunView, TrainState
from mpp.eval.visualize import LEGEND, held_out_images, prediction_mosaic
from mpp.model.objective import TARGETS

PREVIEW_IMAGES = 8  # held-out images whose MPP predictions TensorBoard shows at each evaluation

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


class HeldOutMetrics(Evaluator):
    """The objective's metrics over the whole held-out split ("eval/loss", "eval/accuracy", ...), every
    --eval-every steps and at the end; the corruption drawn from the run's seed, so points compare."""

    name = "held_out"

    def __init__(self, view: RunView):
        self.every, self.seed, self.loader = view.config.eval_every, view.config.seed, view.eval_loader

    def run(self, state: TrainState) -> dict[str, float] | None:
        from accelerate.utils import gather_object

        acc, objective = state.accelerator, state.objective

        def batch_sums(images, labels) -> dict[str, float]:
            with acc.autocast():
                _, metrics = objective(images, labels)
            return {k: v.float().item() * len(images) for k, v in metrics.items()}

        results, scored = evaluate(objective, batch_sums, state.stop.waiting(self.loader), acc, seed=self.seed,
                                   stop=lambda: state.stop.requested)
        if any(gather_object([state.stop.requested])):  # the processes agree: all go on to save and stop
            return None
        if scored == 0:
            raise UsageError("the held-out split has no images: pass a dataset with images in its test or val split")
        return {f"eval/{k}": v for k, v in results.items()}


class PredictionMosaic(Evaluator):
    """MPP's predictions on a fixed batch of held-out images, drawn into TensorBoard ("mpp/predictions")
    with each held-out evaluation, when the run's target can be drawn. Its own generator, eval mode,
    no gradients: the run goes on bitwise as without it (mpp.eval.visualize)."""

    name = "predictions"
    TAG = "mpp/predictions"

    def __init__(self, view: RunView):
        self.every, self.seed = view.config.eval_every, view.config.seed
        # Read by every process, so a data error stops them all alike; only the main one draws;
        # held_out_images moves no generator.
        self.images = held_out_images(view.eval_set, PREVIEW_IMAGES)  # (n, 3, S, S) in [0, 1]
        self.main = view.accelerator.is_main_process

    @classmethod
    def build(cls, view: RunView) -> PredictionMosaic | None:
        if view.mpp is None:
            return None
        entry = TARGETS[view.mpp.target]
        return cls(view) if entry.render is not None and entry.decode is not None else None

    def texts(self) -> dict[str, str]:
        return {self.TAG: LEGEND}  # what the mosaic's columns show

    def run(self, state: TrainState) -> dict[str, float]:
        if self.main and len(self.images):
            mosaic = prediction_mosaic(state.objective, self.images, seed=self.seed)  # (3, H', W') in [0, 1]
            state.image(self.TAG, mosaic, LEGEND)
        return {}
