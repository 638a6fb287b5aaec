"""How a training entry point runs on this machine: the Accelerator (processes, precision, CPU
threads), DataLoader settings, the kernels its ViT is built with, and `torch.compile`. Shared by
pretraining, fine-tuning and the benchmarks; the probes use `choose_kernels` and `compile_blocks` too.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mpp.core.errors import UsageError, first_line
from mpp.core.stopping import end_with_launcher, end_workers_at_exit, loader_worker_init
from mpp.model.kernel_policy import KernelChoice, KernelPolicy, RunShapes, resolve

PRECISIONS = ("no", "fp16", "bf16")
AUTOCAST_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def default_precision(flag: str = "", environ: dict | None = None) -> str | None:
    """The mixed precision of a run: `--mixed-precision` when given; else Accelerate's own choice when
    `accelerate config` wrote one or `accelerate launch --mixed_precision` set one other than its
    default "no" (None: the Accelerator reads it); else bf16 on a CUDA GPU that supports it, fp32
    elsewhere. (`accelerate launch` without a config says "no" whether or not it was asked, so
    to force fp32 under it pass --mixed-precision no to the script.)"""
    env = os.environ if environ is None else environ
    if flag:
        return flag
    launched = env.get("ACCELERATE_MIXED_PRECISION", "")
    if launched and (launched != "no" or _accelerate_config_exists()):
        return None
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:  # native bf16, not emulated
        return "bf16"
    return "no"


def _accelerate_config_exists() -> bool:
    """Whether `accelerate config` wrote a default config (`accelerate launch --config_file F` cannot be
    told apart from launch's own defaults: pass --mixed-precision to the script with it)."""
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return False
    return Path(default_config_file).is_file()


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (Linux, glibc); True when done.

    By default glibc serves each large block (above 128 KB, rising to at most 32 MB) with fresh
    pages from the OS and hands them back when freed, so on CPU every activation of every step is
    page-faulted and zeroed by the kernel again: a bias broadcast into a new 6304 x 1536 tensor
    takes 11.9 ms instead of 0.9 ms. Raising the mmap and trim thresholds serves large blocks from
    the heap and keeps them there. The process then holds its peak memory, which training
    needs again at the next step anyway.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def make_accelerator(mixed_precision: str = "", cpu_threads: int = 0, **kwargs):
    """An Accelerator for this machine: processes of one launch form one group, CPU threads are shared
    fairly, and the precision is `default_precision(mixed_precision)`."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    refuse_sharding(os.environ)  # before the Accelerator: an FSDP or DeepSpeed one may fail on its own first
    end_with_launcher()  # a process of a launch never outlives its launcher (even one killed by SIGKILL)
    accelerator = Accelerator(
        # Processes started by torchrun (`accelerate launch --multi_gpu`) on a machine without CUDA
        # would each train alone; cpu=True makes them one gloo process group instead.
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        mixed_precision=default_precision(mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    if accelerator.device.type == "cpu":
        # `accelerate launch` without --cpu pins OMP_NUM_THREADS=1, which halves a 2-core machine.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # processes on this machine
        torch.set_num_threads(cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
        reuse_freed_memory()  # CPU steps are otherwise dominated by page faults on fresh activations
    return accelerator


# What `accelerate launch --use_fsdp` / `--use_deepspeed` (or a config file asking for them) set
# for the processes it starts (accelerate/commands/launch.py); the Accelerator reads the same ones.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "--use_fsdp", "ACCELERATE_USE_DEEPSPEED": "--use_deepspeed"}


def refuse_sharding(environ) -> None:
    """Refuse a sharded launch (FSDP, DeepSpeed) at start, before anything is written: checkpoints,
    resume and the probes save and load the whole model's state_dict from one process, which sharded
    weights would break silently."""
    for name, flag in SHARDED_LAUNCHES.items():
        if str(environ.get(name, "")).lower() in ("1", "true", "yes"):
            raise UsageError(f"accelerate launch {flag} is not supported: checkpoints hold whole weights; "
                             f"launch without {flag} (DDP, e.g. accelerate launch --multi_gpu)")


# The longest the main process waits for one batch from its loader workers. Each image read has its own
# limit (mpp.data.readlimit); this one bounds what no signal interrupts (a read stuck in the kernel, a hung
# network mount), and a worker that stopped answering.
LOADER_LIMIT_S = 600


def loader_kwargs(micro_batch: int, num_workers: int) -> dict:
    """DataLoader settings of training and evaluation (also what scripts/bench_train.py times). Workers
    persist across epochs and end with the process, however it ends (mpp.core.stopping)."""
    if num_workers:
        end_workers_at_exit()  # a crash must not leave the process waiting for its workers
    return {"batch_size": micro_batch, "num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": num_workers > 0, "worker_init_fn": loader_worker_init,
            "timeout": LOADER_LIMIT_S if num_workers else 0}


def out_of_memory_line(error: BaseException, config, step: int) -> str:
    """The one line for a training step that ran out of memory: what to lower (in a new run: the
    batch, the model and the image size are the run's settings, which a resume keeps)."""
    return (f"out of memory at step {step} ({first_line(error)[:160]}): start a new run (another --output-dir) "
            f"with a smaller --batch-size (now {config.batch_size}), or the same batch in more --grad-accum-steps "
            f"(now {config.grad_accum_steps}), a smaller --image-size or --model, or --mixed-precision bf16 on a GPU")


def autocast_dtype(accelerator) -> str:
    """The dtype the run's matmuls and attention run in: float32, or the autocast dtype."""
    return AUTOCAST_DTYPES.get(str(accelerator.mixed_precision), "float32")


def broadcast(obj):
    """The main process's `obj`, in every process of the group."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def choose_kernels(policy: KernelPolicy, shapes: RunShapes, device, state=None) -> KernelChoice:
    """`mpp.model.kernel_policy.resolve` for one run: the main process decides, every process runs its verdict,
    and its lines are printed once (above the progress bar). state: the run's Accelerator or
    accelerate PartialState when it has several processes; None for one."""
    main = state is None or state.is_main_process
    several = state is not None and state.num_processes > 1
    choice = resolve(policy, shapes, device, main=main, share=broadcast if several else (lambda x: x))
    if main:
        for line in choice.lines():
            print(line, flush=True)
    return choice


def compile_blocks(vit: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` the ViT's encoder blocks in place (regional compilation: the repeated block is
    compiled once and reused, so compiling takes seconds, not minutes). Parameter names and the
    state_dict are unchanged (no `_orig_mod.` prefix), and the MPP corruption, drawn outside the
    model, stays eager, so its random draws are those of an eager run. fullgraph: a graph break is an
    error, never a silent slowdown."""
    import torch._dynamo

    # One code object (Block.forward) serves every block of every model in the process, and each
    # variant is a graph of its own: all tokens or the last block's few, with or without grad, the
    # first and later batch sizes, and a probe's or fine-tune's model beside the run's. Past the
    # default limit of 8, fullgraph makes a recompile a hard error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in vit.blocks:
        block.compile(fullgraph=True)
    return vit


def on_main(accelerator, check) -> None:
    """Run `check` on the main process (it may raise UsageError); every process learns the verdict,
    so a refusal stops them all instead of leaving the others waiting."""
    from accelerate.utils import broadcast_object_list

    verdict = [None]
    if accelerator.is_main_process:
        try:
            check()
        except UsageError as e:
            verdict[0] = str(e)
    broadcast_object_list(verdict)
    if verdict[0]:
        raise UsageError(verdict[0])
