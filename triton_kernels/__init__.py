"""Triton fused kernels for the ViT: attention and LayerNorm (alone, or fused with the residual
add before it), forward and backward.

    from triton_kernels import attention, layer_norm

Each op's file holds the `@triton.jit` kernels, the launchers, the autograd wiring, a functional
API, a thin module and the pure-PyTorch reference the tests check against. `gate.use_triton`
decides per call whether the kernel or PyTorch runs (see `triton_kernels/gate.py`). Without
Triton installed the package still imports (the gate then always picks PyTorch).
"""
from triton_kernels.gate import TRITON_MISSING

if TRITON_MISSING is None:
    # Importing the functions binds the package attributes `attention` / `layer_norm` to them,
    # not to the submodules of the same name.
    from triton_kernels.attention import (
        FlashAttention,
        attention,
        attention_ref,
        attention_supported,
    )
    from triton_kernels.layer_norm import (
        LayerNorm,
        add_layer_norm,
        add_layer_norm_ref,
        add_layer_norm_supported,
        layer_norm,
        layer_norm_ref,
        layer_norm_supported,
    )

    __all__ = ["FlashAttention", "LayerNorm", "add_layer_norm", "add_layer_norm_ref", "add_layer_norm_supported",
               "attention", "attention_ref", "attention_supported", "layer_norm", "layer_norm_ref",
               "layer_norm_supported"]
else:
    __all__ = []

    def __getattr__(name):
        raise AttributeError(f"triton_kernels.{name} is unavailable: {TRITON_MISSING}")
