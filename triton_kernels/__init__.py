"""Triton fused kernels for the ViT: attention and LayerNorm (alone, or fused with the residual
add before it), forward and backward.

    from triton_kernels import attention, layer_norm

The public API is the ops and their pure-PyTorch references (what the tests check the kernels
against). Each op's file holds the `@triton.jit` kernels, the launchers, the autograd
registration, the functional API and the reference, and offers a `*_supported` check of the inputs
the kernel takes (defined in `_contracts.py`, beside the other ops'); `_launch.py` holds what every
kernel file does the same way (registration, launch device), `_configs.py` each kernel's launch
configuration (tiles, warps, stages, programs) and `gate.py` whether the kernels can run here at
all. This package offers kernels and references only: it never picks between a kernel and PyTorch.
That is decided once, by the caller (`mpp.model.kernel_policy`), not per call here.

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

import importlib
import sys
import types

# Public name -> the submodule that defines it.
_EXPORTS = {
    "attention": "attention",
    "attention_ref": "attention",
    "add_layer_norm": "layer_norm",
    "add_layer_norm_ref": "layer_norm",
    "layer_norm": "layer_norm",
    "layer_norm_ref": "layer_norm",
}
__all__ = ["add_layer_norm", "add_layer_norm_ref", "attention", "attention_ref", "layer_norm", "layer_norm_ref"]


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
