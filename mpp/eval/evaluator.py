"""The interface of an evaluator inside training (big_vision's `Evaluator.run(train_state)`).

An evaluator is built once, when the run starts, from what the run is (`RunView`); it is then asked
to `run(state)` at the steps it is due (`every`, at step 0 if `at_start`, and always at the end),
reads the model without changing the training, and returns its metrics, which the run logs as they
are (tags with their own prefix, e.g. "eval/loss", "fewshot/cifar10/5shot"). Returning None means a
stop cut it short: the run saves and stops. Images it draws go through `state.image`.

The run's evaluators are the registered ones (mpp.eval.in_run: `register_evaluator`), built in
registration order and run in that order at a step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from mpp.core.stopping import StopRequest
from mpp.data.datasets import DatasetInfo
from mpp.model.objective import MPPConfig


@dataclass(frozen=True)
class RunView:
    """What an evaluator is built from: the run as it starts (read-only)."""

    config: object  # the run's TrainConfig (mpp.train.pretrain): its flags, e.g. eval_every, seed
    mpp: MPPConfig | None  # the MPP objective's settings; None: a supervised run
    accelerator: object  # accelerate.Accelerator
    eval_set: Dataset  # the held-out split (the test split, or one carved from the training images)
    eval_loader: DataLoader  # its prepared loader: each image once across processes
    info: DatasetInfo  # the training split's (labelled or not, classes, layout)
    image_size: int  # the ViT's input size
    micro_batch: int  # images per forward pass of one process: what fits beside training
    streamed: bool  # the training data is a stream (no access by index)


@dataclass
class TrainState:
    """What an evaluator reads at one step: never written by it."""

    step: int  # optimizer steps done
    objective: torch.nn.Module  # the unwrapped objective, in train mode (an evaluator restores any mode it sets)
    accelerator: object
    stop: StopRequest  # `stop.requested`: end early and return None; `stop.waiting(loader)`: bounded waits for data
    image: Callable[[str, torch.Tensor, str], None]  # (tag, CHW float image in [0, 1], caption) → the run's trackers


class Evaluator:
    """One kind of evaluation inside training. Subclasses set `name` and `every`, and implement `run`."""

    name: str = ""  # short, unique: the registration key
    every: int = 0  # steps between runs (0: only at the end)
    at_start: bool = False  # also at step 0, before training (the untrained model's level)
    timed: bool = False  # log "<name>/seconds", its wall time

    def due(self, step: int, total_steps: int) -> bool:
        """Whether it runs after `step` within training (the end has its own call)."""
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def texts(self) -> dict[str, str]:
        """Text written once into the run's trackers as its records start ({tag: text}), e.g. a legend."""
        return {}

    def describe(self) -> str | None:
        """A line for the run's log as it starts (None: nothing to say)."""
        return None

    def run(self, state: TrainState) -> dict[str, float] | None:
        raise NotImplementedError


# A registration: the run's view → its evaluator, or None when this run does not use it (e.g. its flag is 0).
EvaluatorFactory = Callable[[RunView], Evaluator | None]
