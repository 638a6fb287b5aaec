"""Running the entry points from tests: as subprocesses, alone or under `accelerate launch`, or in-process."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mpp.run.checkpoint import load_checkpoint
from mpp.run.rundir import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
# A few seconds per run: 2-block Micro at 16 px, small batches, no worker processes.
FAST = ["--batch-size", "32", "--num-workers", "0", "--log-every", "5", "--warmup-steps", "5"]
# The PyTorch ops, not the Triton kernels (which run under Triton's slow interpreter without a GPU):
# conftest sets MPP_KERNELS per test, which a module-scoped fixture's subprocess would not see.
# A run uses the cores this process may use (conftest gives each pytest-xdist worker its own), so
# runs compared bitwise, here and in subprocesses, use the same thread count.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(CORES), "MPP_KERNELS": "torch"}
# `accelerate launch` with 2 processes; without CUDA `--multi_gpu` is torchrun, and the trainer
# joins the processes in one gloo group. Port 0: a free port of its own (not 29500), since the
# suite's workers may launch at the same time.
LAUNCH_2 = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def run_script(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV}, **kw)


def launch_2(*args, timeout=300) -> subprocess.CompletedProcess:
    """2 processes on one thread each: they share the cores this process may use."""
    return subprocess.run([*LAUNCH_2, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"})


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run) -> dict[str, torch.Tensor]:
    """Every trained tensor of a run's newest checkpoint: the ViT's and the objective's own ([mask], head)."""
    state = load_checkpoint(list_checkpoints(run)[-1])
    return {**state["model"], **{f"objective.{k}": v for k, v in state["objective"].items()}}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@contextlib.contextmanager
def threads_kept():
    """Training in this process (train(), a script's main): it sets the process's torch threads to
    its --cpu-threads, which the next test must not inherit."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
