"""Run the pretraining entry point with one injected fault: `python tests/helpers/faults.py FAULT ARGS...`.

The fault is patched into the real code, then the real `mpp.train.pretrain.main("mpp", ARGS)` runs, so the
process (its loader workers, signal handlers, exit path) is exactly what a user starts.
- step: a bug inside the second training step's forward pass;
- worker: a bug inside a loader worker, on its fifth image;
- save: a bug inside torch.save, at the first checkpoint;
- slow-eval: every evaluation batch takes 0.5 s and, the first time, creates the file $FAULT_MARKER;
- sigterm-after: the process sends itself SIGTERM once optimizer step $FAULT_STEP is done, as a scheduler
  would at that moment: a stop that lands at the same step every time (the run trains one more step,
  saves it and exits 143), so a resumed run can be compared bitwise with one never stopped.
- read-limit: no fault, a shorter bound: each image read may take $FAULT_READ_LIMIT seconds (a test's
  stuck read, e.g. a FIFO in the dataset, is then given up on in seconds, not minutes).
- eval: a bug inside the first evaluation's forward pass (with --eval-every 0: the final evaluation).
- oom: the third training step's forward pass fails to allocate, as torch.OutOfMemoryError says.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

import mpp.data.sources
import mpp.model.objective
import mpp.run.checkpoint
from mpp.train.pretrain import main


def step() -> None:
    forward, calls = mpp.model.objective.MPPObjective.forward, [0]

    def crashing(self, images, labels=None):
        calls[0] += self.training
        if calls[0] == 2:
            raise RuntimeError("injected fault in a training step")
        return forward(self, images, labels)

    mpp.model.objective.MPPObjective.forward = crashing


def worker() -> None:
    getitem, calls = mpp.data.sources.TensorImages.__getitem__, [0]

    def crashing(self, index):
        if torch.utils.data.get_worker_info() is not None:  # in a worker process only: the main process
            calls[0] += 1  # reads images too (the MPP preview), before the workers start with its count
            if calls[0] == 5:
                raise RuntimeError("injected fault in a loader worker")
        return getitem(self, index)

    mpp.data.sources.TensorImages.__getitem__ = crashing


def save() -> None:
    def crashing(*_args, **_kwargs):
        raise RuntimeError("injected fault in torch.save")

    mpp.run.checkpoint.torch.save = crashing


def slow_eval() -> None:
    forward = mpp.model.objective.MPPObjective.forward
    marker = Path(os.environ["FAULT_MARKER"])

    def slow(self, images, labels=None):
        if not self.training:
            marker.touch()
            time.sleep(0.5)
        return forward(self, images, labels)

    mpp.model.objective.MPPObjective.forward = slow


def sigterm_after() -> None:
    import mpp.train.trainer

    after_step, at = mpp.train.trainer.Trainer.after_step, int(os.environ["FAULT_STEP"])

    def signalling(self, step, stopping):  # the loop's hook after each optimizer step (mpp.train.loop.Hooks)
        stopping = after_step(self, step, stopping)
        if self.progress.step == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return stopping

    mpp.train.trainer.Trainer.after_step = signalling


def read_limit() -> None:
    import mpp.data.readlimit

    mpp.data.readlimit.READ_LIMIT_S = float(os.environ["FAULT_READ_LIMIT"])


def eval_bug() -> None:
    forward = mpp.model.objective.MPPObjective.forward

    def crashing(self, images, labels=None):
        if not self.training:
            raise RuntimeError("injected fault in an evaluation")
        return forward(self, images, labels)

    mpp.model.objective.MPPObjective.forward = crashing


def oom() -> None:
    forward, calls = mpp.model.objective.MPPObjective.forward, [0]

    def failing(self, images, labels=None):
        calls[0] += self.training
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return forward(self, images, labels)

    mpp.model.objective.MPPObjective.forward = failing


if __name__ == "__main__":
    {"step": step, "worker": worker, "save": save, "slow-eval": slow_eval, "sigterm-after": sigterm_after,
     "read-limit": read_limit, "eval": eval_bug, "oom": oom}[sys.argv[1]]()
    main("mpp", sys.argv[2:])
