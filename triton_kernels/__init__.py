"""Triton fused kernels for the ViT: attention and LayerNorm, forward and backward.

    from triton_kernels import attention, layer_norm

Each op's file holds the `@triton.jit` kernels, the launchers, the autograd wiring, a functional
API, a thin module and the pure-PyTorch reference the tests check against. `gate.use_triton`
decides per call whether the kernel or PyTorch runs (see `triton_kernels/gate.py`). Attributes
are imported lazily so `import triton_kernels` works on machines without Triton.
"""
import importlib

_EXPORTS = {
    "attention": "attention", "attention_ref": "attention", "attention_supported": "attention",
    "FlashAttention": "attention",
    "layer_norm": "layer_norm", "layer_norm_ref": "layer_norm", "layer_norm_supported": "layer_norm",
    "LayerNorm": "layer_norm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"triton_kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'triton_kernels' has no attribute {name!r}")
