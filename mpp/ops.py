"""The one place the ViT calls attention and LayerNorm through.

Every block calls these functions; `triton_kernels.gate.use_triton` decides per call whether
our Triton kernel runs or PyTorch's own op (`scaled_dot_product_attention`, which picks flash /
memory-efficient / cuDNN / math itself, and `layer_norm`, after a plain add for
`add_layer_norm`), and records why
(`triton_kernels.gate.decisions()`). `MPP_KERNELS=auto|triton|torch` or `--kernels` steers it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels.gate import use_triton


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, hd) → (B, H, N, hd); scale defaults to hd**-0.5."""

    def unsupported() -> str | None:
        if dropout_p > 0:
            return "attention dropout is not implemented in the kernel"
        from triton_kernels.attention import attention_supported

        return attention_supported(q, k, v)

    if use_triton("attention", q, unsupported):
        from triton_kernels.attention import attention as triton_attention

        return triton_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension. x: (..., D); weight, bias: (D,)."""

    def unsupported() -> str | None:
        from triton_kernels.layer_norm import layer_norm_supported

        return layer_norm_supported(x, weight, bias)

    if use_triton("layer_norm", x, unsupported):
        from triton_kernels.layer_norm import layer_norm as triton_layer_norm

        return triton_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add and the LayerNorm after it: (s, LayerNorm(s)), s = x + residual.
    x, residual: (..., D) of one shape; weight, bias: (D,). One fused kernel on Triton."""

    def unsupported() -> str | None:
        from triton_kernels.layer_norm import add_layer_norm_supported

        return add_layer_norm_supported(x, residual, weight, bias)

    if use_triton("add_layer_norm", x, unsupported):
        from triton_kernels.layer_norm import add_layer_norm as triton_add_layer_norm

        return triton_add_layer_norm(x, residual, weight, bias, eps)
    s = x + residual  # (..., D)
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)
