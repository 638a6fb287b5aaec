"""Where a ViT attends: each block's attention weights, the last block's class-token attention,
attention rollout (Abnar & Zuidema 2020), and a picture of both over the images.

The fused kernels (mpp.model.ops) return no weights, so the blocks are recomputed here on PyTorch's ops
from the ViT's own parameters, whatever kernels it was built with: LayerNorm by
torch.nn.functional.layer_norm with each norm's weight, bias and eps, softmax(q kᵀ/√d) written out.
The recomputed tokens equal `ViT.forward_tokens`' (tests/test_visualize.py checks it), so the maps
are the model's. Images are in [0, 1] and normalised here, as the objectives do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mpp.data.sources import normalize
from mpp.eval.features import evaluating
from mpp.eval.visualize import tile
from mpp.model.vit import Block, ViT

HEAT_STOPS = torch.tensor([  # the overlay's colour scale, low to high: black, purple, red, orange, pale yellow
    [0.0, 0.0, 0.0], [0.34, 0.06, 0.43], [0.80, 0.20, 0.27], [0.99, 0.57, 0.10], [0.99, 0.98, 0.64]])
OVERLAY = 0.6  # the heat map's share of an overlay; the image (in grey) has the rest
PANELS = ("image", "class attention (last block)", "attention rollout")
LEGEND = ("columns: the image | the last block's class-token attention over the patches, averaged over heads | "
          "attention rollout through every block (each map from its own minimum, dark, to its maximum, pale yellow)")


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _block(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block on PyTorch's ops: x (B, T, D) → (its output (B, T, D), weights (B, H, T, T))."""
    B, T, D = x.shape
    attn = block.attn
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(_layer_norm(block.norm1, x)).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, hd)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(hd)).softmax(-1)  # (B, H, T, T)
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))  # (B, T, D)
    return x + block.mlp(_layer_norm(block.norm2, x)), weights


def attention_pass(vit: ViT, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """images (B, 3, H, W) in [0, 1] → (the final-norm tokens (B, N+1, D), as `vit.forward_tokens`
    gives them, and every block's attention weights [(B, heads, N+1, N+1)] × depth), in eval mode
    under no_grad (the ViT's modes are restored)."""
    with evaluating(vit):
        images = images.to(vit.cls_token.device, vit.cls_token.dtype)
        x = vit.with_positions(vit.embed_patches(normalize(images)))  # (B, N+1, D); eval mode: no dropout
        weights = []
        for block in vit.blocks:
            x, w = _block(block, x)  # (B, N+1, D), (B, H, N+1, N+1)
            weights.append(w)
        return _layer_norm(vit.norm, x), weights


def attention_weights(vit: ViT, images: torch.Tensor) -> list[torch.Tensor]:
    """images (B, 3, H, W) in [0, 1] → each block's attention weights [(B, heads, N+1, N+1)] × depth;
    token 0 is the class token, token i + 1 patch i; each row sums to 1."""
    return attention_pass(vit, images)[1]


def _grid(row: torch.Tensor) -> torch.Tensor:
    """(B, N) → (B, g, g): patches in row-major order."""
    g = math.isqrt(row.shape[1])
    return row.reshape(-1, g, g)


def class_attention(weights: list[torch.Tensor]) -> torch.Tensor:
    """The last block's class-token row over the patches, averaged over heads → (B, grid, grid).
    Not renormalised: the patches' share sums to 1 minus the class token's attention to itself."""
    return _grid(weights[-1][:, :, 0, 1:].mean(1))  # (B, g, g)


def rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) → (B, grid, grid): per block the heads' mean plus
    the identity (the residual path), rows renormalised to 1, multiplied through the blocks from
    the first; the class token's row over the patches."""
    joint = None
    for w in weights:
        a = w.double().mean(1)  # (B, T, T); float64: a deep product of small numbers
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint  # (B, T, T): token i's share of every input token
    return _grid(joint[:, 0, 1:]).to(weights[-1].dtype)  # (B, g, g)


def heat_colors(x: torch.Tensor) -> torch.Tensor:
    """(...) values in [0, 1] → (..., 3) colours along HEAT_STOPS (linear between stops)."""
    stops = HEAT_STOPS.to(x.device)
    pos = x.clamp(0, 1) * (len(stops) - 1)
    low = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def overlay(images: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1], heat (B, g, g) → (B, 3, H, W): each map stretched from its own
    minimum to its maximum (a flat one is all low), enlarged to the image (nearest: one block per
    patch), coloured over the image in grey."""
    low, high = heat.flatten(1).aminmax(dim=1)  # (B,) each
    span = (high - low).clamp_min(1e-6)[:, None, None]  # below that, float noise: drawn flat
    heat = (heat - low[:, None, None]) / span  # (B, g, g) in [0, 1]
    big = F.interpolate(heat[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0]  # (B, H, W)
    grey = images.mean(1, keepdim=True)  # (B, 1, H, W)
    return (1 - OVERLAY) * grey + OVERLAY * heat_colors(big).permute(0, 3, 1, 2)  # (B, 3, H, W)


def attention_mosaic(vit: ViT, images: torch.Tensor) -> torch.Tensor:
    """One row per image of `images` (B, 3, H, W) in [0, 1], three panels (PANELS): the image, the
    last block's class attention over it, the attention rollout over it → (3, H', W') float in [0, 1]
    on the CPU, laid out by mpp.eval.visualize.tile."""
    weights = attention_weights(vit, images)
    images = images.float().cpu()
    maps = [overlay(images, m.float().cpu()) for m in (class_attention(weights), rollout(weights))]
    return tile([[images[b], *(m[b] for m in maps)] for b in range(len(images))])
