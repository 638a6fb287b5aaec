"""Whether the Triton kernels can run at all here: the platform, the install and the limits of what
they take, checked without importing triton until a kernel could be used.

This module decides nothing per call. The caller (in this repository `mpp.model.kernel_policy`) asks once,
before a model is built, then verifies and times each op at the run's shapes and hands the model
fixed functions. The ops' `*_supported` contracts (triton_kernels._contracts) and the launch
configurations (triton_kernels._configs) read the same checks and limits (the one copy of each).
Nothing here imports from outside this package.
"""
from __future__ import annotations

import importlib
import os

import torch

KERNEL_MODULES = ("triton_kernels.attention", "triton_kernels.layer_norm")
MAX_HEAD_DIM = 128  # attention: head dims 1..128 (non-powers of two are padded)
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where attention puts batch * heads
MAX_WIDTH = 65536  # LayerNorm: one row must fit one block; wider rows would need a multi-pass kernel
_TRUE = ("1", "true", "on", "yes", "y")  # the values Triton itself reads as true


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors through its interpreter (how CI checks
    their numerics). Triton reads it when a kernel is defined, so it must be set before the import;
    read here as Triton reads it, so the ops registered at that import match their kernels."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def platform_problem(device: torch.device) -> str | None:
    """None when the kernels can run on `device`, else why not (one short clause)."""
    device = torch.device(device)
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only"
        if torch.version.hip:  # ROCm builds report their GPUs as "cuda" devices
            return ("ROCm GPUs are not supported: the launch configurations assume NVIDIA shared memory "
                    "and warp sizes")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"GPU compute capability {major}.{minor} is below 8.0 (the kernels target Ampere and newer)"
        return None
    if device.type == "cpu":
        return None if interpreting() else (
            "cpu tensors (the kernels run on CUDA GPUs; TRITON_INTERPRET=1 runs them on CPU through the interpreter)")
    return f"{device.type} tensors are not supported"


def import_problem() -> str | None:
    """Import the kernel modules (and so triton); None when that works, else why not. A broken
    install (a missing shared library, a version clash) is a reason, never a crash."""
    try:
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == "triton" or (e.name or "").startswith("triton."):
            return "triton is not installed (pip install triton)"
        return f"the kernels cannot be imported ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001 - any import failure means PyTorch's ops, with the reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"triton cannot be imported ({type(e).__name__}: {first[:200]})"
    return None
