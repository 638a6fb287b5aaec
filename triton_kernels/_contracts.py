"""Each op's input contract: `<op>_supported(...)` is None when the op's kernel takes these inputs,
else a short reason why not (the caller then uses PyTorch). Public from the op's own file
(`triton_kernels.attention.attention_supported`, `triton_kernels.layer_norm.layer_norm_supported` and
`add_layer_norm_supported`), which imports it from here; the limits checked and whether the platform
can run the kernels at all are triton_kernels.gate's. Imports no triton: a contract can be read
without it.
"""
from __future__ import annotations

import torch

from triton_kernels.gate import MAX_GRID_Y, MAX_HEAD_DIM, MAX_WIDTH, interpreting, platform_problem

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every kernel computes in


def attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when the kernel handles (q, k, v), else a short reason (the caller then uses PyTorch)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D [B, H, N, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (the kernel takes fp16, bf16 or fp32, all the same)"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    problem = platform_problem(q.device)
    if problem:
        return problem
    if interpreting() and q.dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter (it runs on GPU)"
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head dim {d} (the kernel takes 1..{MAX_HEAD_DIM}; non-powers of two are padded)"
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return f"batch*heads {q.shape[0] * q.shape[1]} exceeds the grid limit {MAX_GRID_Y}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty tensor"
    return None


def layer_norm_supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """None when `layer_norm` handles these inputs, else a short reason why not."""
    if x.dim() == 0:
        return "x is a scalar: it needs a last dimension to normalize"
    if x.dtype not in DTYPES:
        return f"dtype {str(x.dtype).removeprefix('torch.')} is not supported: fp32/fp16/bf16"
    d = x.shape[-1]
    if d == 0:
        return "width 0: nothing to normalize"
    if d > MAX_WIDTH:
        return f"width {d} exceeds the {MAX_WIDTH} one-block limit"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            return f"{name} is required"
        if tuple(p.shape) != (d,):
            return f"{name} shape {tuple(p.shape)} is not ({d},)"
        if p.dtype not in (x.dtype, torch.float32):
            return f"{name} dtype {str(p.dtype).removeprefix('torch.')} is neither x's dtype nor float32"
        if p.device != x.device:
            return f"{name} is on {p.device}, x on {x.device}"
    return platform_problem(x.device)


def add_layer_norm_supported(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor) -> str | None:
    """None when `add_layer_norm` handles these inputs, else a short reason why not."""
    if residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} is not x's {tuple(x.shape)} (no broadcasting)"
    if residual.device != x.device:
        return f"residual is on {residual.device}, x on {x.device}"
    if residual.dtype not in DTYPES:
        return f"residual dtype {str(residual.dtype).removeprefix('torch.')} is not supported: fp32/fp16/bf16"
    # The LayerNorm runs on s, whose dtype is the promoted one.
    s_like = x if torch.promote_types(x.dtype, residual.dtype) == x.dtype else residual
    return layer_norm_supported(s_like, weight, bias)
