"""The one place the ViT calls attention and LayerNorm through.

Every block calls these two functions, so a faster implementation (the Triton kernels in
`triton_kernels/`) plugs in here without touching the model. Today both are PyTorch's own:
`scaled_dot_product_attention` (which picks flash / memory-efficient / math itself) and
`layer_norm`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, hd) → (B, H, N, hd); scale defaults to hd**-0.5."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension. x: (..., D); weight, bias: (D,)."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
