"""The ops the ViT calls for attention and LayerNorm, and `Kernels`, the fixed choice among them.

A `Kernels` is built once per process (by `mpp.model.kernel_policy.resolve`, after the run's shapes are
verified and timed, or `TORCH` for PyTorch's ops) and handed to the ViT at construction, as timm
decides `fused_attn`: each module keeps the function it was given, so there is no dispatch per
call and nothing data-dependent for `torch.compile` to trace. The Triton functions are imported
only when a `Kernels` names them.

Every op has one signature, whichever implementation runs:
- attention(q, k, v, dropout_p) → (B, H, Nq, hd); q: (B, H, Nq, hd), k, v: (B, H, Nk, hd), any strides;
- layer_norm(x, weight, bias, eps) → y, over the last dimension; x: (..., D), weight, bias: (D,);
- add_layer_norm(x, residual, weight, bias, eps) → (s, LayerNorm(s)), s = x + residual: a pre-norm
  block's residual add and the norm after it (one fused kernel on Triton).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

OPS = ("attention", "layer_norm", "add_layer_norm")
IMPLS = ("triton", "torch")


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's SDPA (it picks flash / memory-efficient / cuDNN / math itself). → (B, H, Nq, hd)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def torch_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def torch_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual  # (..., D)
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)


_TRITON: dict[str, Callable] = {}  # the kernels' functions, once imported


def _triton(name: str) -> Callable:
    """triton_kernels.<name>, imported on first use: a `Kernels` naming a kernel imports it as it is
    built, outside any torch.compile trace (torch 2.11's Dynamo cannot trace the import of our lazy
    package); a later call, traced or not, only reads the dict."""
    if not _TRITON:
        import triton_kernels

        _TRITON.update({op: getattr(triton_kernels, op) for op in OPS})
    return _TRITON[name]


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Our kernel; its output is in (B, Nq, H, hd) memory order, so the block's transpose + reshape is free."""
    if dropout_p > 0:  # mpp.model.kernel_policy never picks the kernel for a model with attention dropout
        raise ValueError("the Triton attention kernel has no dropout: build the model with PyTorch's attention")
    return _triton("attention")(q, k, v)


def triton_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _triton("layer_norm")(x, weight, bias, eps)


def triton_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton("add_layer_norm")(x, residual, weight, bias, eps)


IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "attention": {"torch": torch_attention, "triton": triton_attention},
    "layer_norm": {"torch": torch_layer_norm, "triton": triton_layer_norm},
    "add_layer_norm": {"torch": torch_add_layer_norm, "triton": triton_add_layer_norm},
}


@dataclass(frozen=True)
class Kernels:
    """Which implementation each op runs ("triton" or "torch"), fixed for the life of the model."""

    attention: str = "torch"  # (B, H, N, hd) softmax attention
    layer_norm: str = "torch"  # LayerNorm over the last dimension
    add_layer_norm: str = "torch"  # residual add + LayerNorm
    functions: Mapping[str, Callable] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        bad = {op: getattr(self, op) for op in OPS if getattr(self, op) not in IMPLS}
        if bad:
            raise ValueError(f"unknown kernel implementation(s) {bad}: each op runs 'triton' or 'torch'")
        object.__setattr__(self, "functions", {op: IMPLEMENTATIONS[op][getattr(self, op)] for op in OPS})
        if "triton" in self.names().values():
            _triton("attention")  # imported now, not inside a compiled region

    @classmethod
    def of(cls, names: Mapping[str, str]) -> Kernels:
        return cls(**{op: names.get(op, "torch") for op in OPS})

    def names(self) -> dict[str, str]:
        return {op: getattr(self, op) for op in OPS}


TORCH = Kernels()
