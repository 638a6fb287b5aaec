"""nn.Module forms of the Triton kernels, for the tests that check the kernels behave as PyTorch's
modules do (the model itself calls the functions `mpp.model.ops.Kernels` hands it, not modules)."""
from __future__ import annotations

import torch
from torch import nn

from triton_kernels import add_layer_norm, attention, layer_norm


class FlashAttention(nn.Module):
    """Module form of `attention`: forward(q, k, v) with a fixed softmax scale (default D**-0.5)."""

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) over the last dim, running the Triton kernels."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1 or not elementwise_affine or not bias:
            raise ValueError("LayerNorm: needs a single normalized dim with weight and bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this LayerNorm of it), fused."""
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)
