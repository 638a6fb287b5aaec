"""Triton fused kernels for the ViT: attention and LayerNorm (alone, or fused with the residual
add before it), forward and backward.

    from triton_kernels import attention, layer_norm

Each op's file holds the `@triton.jit` kernels, the launchers, the autograd wiring, a functional
API, a thin module, the pure-PyTorch reference the tests check against and a `*_supported` check
(None, or why the kernel cannot take given inputs). This package offers kernels, references and
checks only: it never picks between a kernel and PyTorch. That is decided once, by the caller
(`mpp.kernels`), not per call here.

Importing the package imports neither triton nor the kernel files: each public name is loaded
from its submodule on first access (module `__getattr__`), so `import triton_kernels` is cheap and
works without Triton installed; touching a kernel name then raises the ImportError.

`attention` and `layer_norm` name both a function and the submodule that defines it. The package
attribute is always the function, even after `import triton_kernels.attention` (which would
normally bind the submodule there); the submodules are `importlib.import_module(
"triton_kernels.attention")` / `sys.modules["triton_kernels.attention"]` (`import
triton_kernels.attention as m` reads the package attribute, so it gives the function).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types

# Public name -> the submodule that defines it.
_EXPORTS = {
    "FlashAttention": "attention",
    "attention": "attention",
    "attention_ref": "attention",
    "attention_supported": "attention",
    "LayerNorm": "layer_norm",
    "add_layer_norm": "layer_norm",
    "add_layer_norm_ref": "layer_norm",
    "add_layer_norm_supported": "layer_norm",
    "layer_norm": "layer_norm",
    "layer_norm_ref": "layer_norm",
    "layer_norm_supported": "layer_norm",
}
__all__ = ["FlashAttention", "LayerNorm", "add_layer_norm", "add_layer_norm_ref", "add_layer_norm_supported",
           "attention", "attention_ref", "attention_supported", "layer_norm", "layer_norm_ref",
           "layer_norm_supported"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # cached: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the functions `attention` / `layer_norm` from being shadowed by their submodules: the
    import system binds a loaded submodule as an attribute of its package (setattr), which would
    turn `from triton_kernels import attention` into the module after `import triton_kernels.attention`."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return  # the submodule stays in sys.modules; the attribute resolves to the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# ---- shared by the kernel files (private; torch is imported only when they run) ----------------

def _launch_device(t):
    """The context to launch the kernels for tensor `t` in: torch.cuda.device(t.device) for a real
    CUDA tensor, else a null context. Triton launches on the *current* device, so without it a
    tensor on cuda:1 (no torch.cuda.set_device(1)) would be handed to a kernel running on cuda:0.
    Fake and functional tensors (the triton_op bodies run as their own fake impl, and are traced by
    torch.compile / opcheck) get the null context: tracing must not call CUDA, and Inductor sets the
    device itself around the kernels it launches."""
    from torch._subclasses.fake_tensor import is_fake

    if t.device.type != "cuda" or is_fake(t):
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(t.device)


def _as_op(name: str, launcher, fake, interpreted: bool):
    """`launcher` as the custom op mpp_kernels::<name>. Compiled Triton: a triton_op, so
    torch.compile traces into the kernels (the launcher is its own fake impl: wrap_triton launches
    nothing on fake tensors). Under TRITON_INTERPRET=1 wrap_triton passes the InterpretedFunction
    through, which cannot run on fake tensors, so the launcher becomes an opaque custom_op with
    `fake` (same shapes, strides and dtypes) as its fake impl: torch.compile (e.g. backend=
    "aot_eager") and opcheck can still trace the ops on CPU."""
    import torch

    if not interpreted:
        return torch.library.triton_op(f"mpp_kernels::{name}", launcher, mutates_args=())
    op = torch.library.custom_op(f"mpp_kernels::{name}", launcher, mutates_args=())
    op.register_fake(fake)
    return op
