"""The one gate that decides, per call, whether an op runs on our Triton kernel or on PyTorch, and why.

In order: `MPP_KERNELS=torch` (or `--kernels torch`) → PyTorch; an op named in `MPP_KERNELS_OFF`
(e.g. `add_layer_norm`, to measure one kernel's effect) → PyTorch; Triton not importable → PyTorch;
the tensors' device (CUDA of compute capability ≥ 8.0, or CPU only under `TRITON_INTERPRET=1`,
Triton's interpreter, which is how CI checks the kernels' numerics); then the op's own
shape/dtype check. `MPP_KERNELS=auto` (the default) falls back quietly and records the reason;
`MPP_KERNELS=triton` turns every fallback into an error, so a forced run never silently measures
the wrong thing. Nothing here imports triton unless the kernels can be used.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from mpp.errors import UsageError

ENV = "MPP_KERNELS"
MODES = ("auto", "triton", "torch")
OFF_ENV = "MPP_KERNELS_OFF"  # comma-separated ops kept on PyTorch, e.g. "add_layer_norm": one change's effect
_decisions: dict[str, str] = {}  # op → the latest decision, for logs ("triton" or "torch: <why>")


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UsageError(f"{ENV}={mode!r} is not a kernel mode: set it (or --kernels) to auto, triton or torch")
    return mode


def set_kernel_mode(mode: str) -> None:
    """What `--kernels` does: set the mode for this process and the processes it starts."""
    os.environ[ENV] = mode
    kernel_mode()  # validates


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once at import: whether Triton is installed (None) or why the kernels cannot run.
TRITON_MISSING = None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


def device_problem(t: torch.Tensor) -> str | None:
    """None when the kernels can run on `t`'s device, else why not."""
    if t.device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only"
        major, minor = torch.cuda.get_device_capability(t.device)
        if major < 8:
            return f"GPU compute capability {major}.{minor} is below 8.0 (the kernels target Ampere and newer)"
        return None
    if t.device.type == "cpu":
        return None if interpreting() else (
            "CPU tensors (the kernels run on CUDA GPUs; TRITON_INTERPRET=1 runs them on CPU through the interpreter)")
    return f"{t.device.type} tensors are not supported"


def use_triton(op: str, tensor: torch.Tensor, unsupported=lambda: None) -> bool:
    """Whether `op` runs on Triton for these inputs. `unsupported()` gives the op's own reason, if any."""
    mode = kernel_mode()
    if mode == "torch":
        reason = f"{ENV}=torch"
    elif op in {name.strip() for name in os.environ.get(OFF_ENV, "").split(",")}:
        _decisions[op] = f"torch: {OFF_ENV} names it"  # asked for by name: not a fallback, so never an error
        return False
    else:
        reason = TRITON_MISSING or device_problem(tensor) or unsupported()
    _decisions[op] = "triton" + (" (interpreter)" if interpreting() else "") if reason is None else f"torch: {reason}"
    if reason is not None and mode == "triton":
        raise UsageError(f"{ENV}=triton (--kernels triton) but {op} cannot use the Triton kernel: {reason}; "
                         "use --kernels auto to fall back to PyTorch")
    return reason is None


def decisions() -> dict[str, str]:
    """The latest decision per op, e.g. {"attention": "triton", "layer_norm": "torch: CPU tensors (...)"}."""
    return dict(_decisions)
