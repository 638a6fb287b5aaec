"""The Vision Transformer (ViT, arXiv 2010.11929) with timm's parameter names.

Parameter names and shapes equal timm's `VisionTransformer` (class token, learned absolute
position embeddings, pre-norm blocks, qkv bias, LayerNorm eps 1e-6), so
`ViT.load_state_dict(timm_model.state_dict())` and the reverse load strictly.
Attention and LayerNorm run the functions of the `mpp.model.ops.Kernels` the model is built with
(PyTorch's ops by default; `mpp.model.kernel_policy.resolve` decides, once, where our Triton kernels run).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mpp.core.errors import BadField, BadInput, UsageError
from mpp.model.ops import TORCH, Kernels


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224  # input height = width, in pixels; must be divisible by patch_size
    patch_size: int = 16  # P: patches are P×P pixels
    in_chans: int = 3  # RGB
    embed_dim: int = 768  # D: token width
    depth: int = 12  # number of encoder blocks
    num_heads: int = 12  # attention heads; D must be divisible by it
    mlp_dim: int = 3072  # M: hidden width of each block's MLP
    num_classes: int = 1000  # classification head outputs; 0 = no head (pre-logits out)
    dropout: float = 0.0  # after adding position embeddings, in the MLP and after attention projection
    attn_dropout: float = 0.0  # on the attention probabilities
    ln_eps: float = 1e-6  # timm's and big_vision's ViT LayerNorm epsilon

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def validate(self) -> ViTConfig:
        """This config, once every field is usable; else BadField (BadInput for two fields that disagree),
        in the fields' own names: a command line that set one by a flag words its fix in that flag."""
        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadField(f"ViT {name} {getattr(self, name)!r} must be a whole number of at least 1",
                               "pass a preset such as Ti/16 (the patch size after the slash is at least 1)",
                               field=name, value=getattr(self, name))
        if self.num_classes < 0:
            raise BadField(f"ViT num_classes {self.num_classes} is negative", "pass 0 (no head) or more",
                           field="num_classes", value=self.num_classes)
        for name in ("dropout", "attn_dropout"):
            if not 0 <= getattr(self, name) < 1:  # also false for NaN
                raise BadField(f"ViT {name} {getattr(self, name)} is outside [0, 1)", f"use {name} in [0, 1), e.g. 0.1",
                               field=name, value=getattr(self, name))
        if not 0 < self.ln_eps < 1:
            raise BadField(f"ViT ln_eps {self.ln_eps} is outside (0, 1)", "keep the default 1e-6", field="ln_eps",
                           value=self.ln_eps)
        if self.image_size < self.patch_size:
            raise BadField(f"image size {self.image_size} is smaller than the patch size {self.patch_size}",
                           f"use an image_size of {self.patch_size} or more", field="image_size",
                           value=self.image_size, suggestion=f"{self.patch_size} or more")
        if self.image_size % self.patch_size:
            fits = max(1, round(self.image_size / self.patch_size)) * self.patch_size  # the nearest multiple
            raise BadField(f"image size {self.image_size} is not divisible by the patch size {self.patch_size}",
                           f"use an image_size of {fits} or a preset with another patch size", field="image_size",
                           value=self.image_size, suggestion=f"{fits} or a preset with another patch size")
        if self.embed_dim % self.num_heads:
            raise BadInput(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                           "change one of them")
        return self


# Sizes from the paper's Table 1, plus "Micro" for the offline default run on two CPU cores.
# name: (depth, embed_dim, mlp_dim, num_heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Micro": (6, 128, 512, 4),
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}
# Default resolution when none is given: 224 for patches of 8+ pixels, CIFAR's 32 below, and 16 for
# Micro, whose job is the offline default (8×8 digits upsampled to 16: a 4×4 grid of 4×4 patches).
DEFAULT_IMAGE_SIZE = {"Micro": 16}
# The presets named in the docs; any SIZE/PATCH combination of the above also works ("B/32", "S/8").
PRESETS = ("Micro/4", "Ti/4", "S/4", "Ti/16", "S/16", "B/16", "L/16", "H/14")


def vit_config(name: str, **overrides) -> ViTConfig:
    """A preset by name, "SIZE/PATCH" (e.g. "B/16", "Ti/4"), with field overrides.

    The default image size is 224 for patches of 8 pixels or more, 32 (CIFAR-sized) below, 16 for Micro.
    """
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", name.strip())
    if not match or match.group(1) not in SIZES:
        raise BadInput(f"unknown model preset '{name}'",
                       f"use one of {', '.join(PRESETS)} (or SIZE/PATCH with SIZE in {', '.join(SIZES)})")
    depth, dim, mlp, heads = SIZES[match.group(1)]
    patch = int(match.group(2))
    config = ViTConfig(
        image_size=DEFAULT_IMAGE_SIZE.get(match.group(1), 224 if patch >= 8 else 32),
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
    )
    unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
    if unknown:
        raise BadInput(f"unknown ViTConfig field(s) {sorted(unknown)}",
                       f"valid ones are {list(ViTConfig.__dataclass_fields__)}")
    return replace(config, **{k: v for k, v in overrides.items() if v is not None}).validate()


class PatchEmbed(nn.Module):
    """Non-overlapping P×P patches, flattened and projected to D (a strided convolution)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise BadInput(f"image size {H}x{W} is not divisible by the patch size {self.patch_size}",
                           "resize the images to a multiple of the patch size")
        x = self.proj(images)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) running the kernels' LayerNorm it was built with."""

    def __init__(self, dim: int, eps: float, kernels: Kernels = TORCH):
        super().__init__(dim, eps=eps)
        self._norm = kernels.functions["layer_norm"]
        self._add_norm = kernels.functions["add_layer_norm"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.bias, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this LayerNorm of it): on Triton, one fused kernel instead of two passes."""
        return self._add_norm(x, residual, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig, kernels: Kernels = TORCH):
        super().__init__()
        self._attention = kernels.functions["attention"]
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.attn_dropout = config.attn_dropout
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) → (B, N, D). With `queries` (B, n) token indices, only those tokens' outputs
        are computed → (B, n, D); keys and values still come from every token."""
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        if queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, H, hd)  # (B, N, 3, H, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, hd)
        else:  # the rows of qkv's weight are [q; k; v]: project queries for the chosen tokens only
            w, b = self.qkv.weight, self.qkv.bias  # (3D, D), (3D,)
            q = F.linear(gather_tokens(x, queries), w[:D], b[:D])  # (B, n, D)
            q = q.reshape(B, -1, H, hd).transpose(1, 2)  # (B, H, n, hd)
            kv = F.linear(x, w[D:], b[D:]).reshape(B, N, 2, H, hd)  # (B, N, 2, H, hd)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 × (B, H, N, hd)
        dropout = self.attn_dropout if self.training else 0.0
        x = self._attention(q, k, v, dropout)  # (B, H, n, hd)
        x = x.transpose(1, 2).reshape(B, -1, D)  # (B, n, D): a view when x is in (B, n, H, hd) order (ours)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: z' = MSA(LN(z)) + z ; z = MLP(LN(z')) + z'."""

    def __init__(self, config: ViTConfig, kernels: Kernels = TORCH):
        super().__init__()
        self.norm1 = LayerNorm(config.embed_dim, config.ln_eps, kernels)
        self.attn = Attention(config, kernels)
        self.norm2 = LayerNorm(config.embed_dim, config.ln_eps, kernels)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) → (B, N, D), or with `keep` (B, n) token indices only those tokens → (B, n, D)."""
        if keep is None:
            x, h = self.norm2.add(x, self.attn(self.norm1(x)))  # z' and LN(z'): (B, N, D) each
        else:
            x, h = self.norm2.add(gather_tokens(x, keep), self.attn(self.norm1(x), queries=keep))  # (B, n, D)
        return x + self.mlp(h)


class ViT(nn.Module):
    """ViT with a class token. `model(images)` → logits (B, num_classes), or pre-logits if num_classes == 0.

    `kernels` fixes, at construction, which implementation of attention and LayerNorm every block
    runs (`mpp.model.ops.Kernels`; PyTorch's by default). It is not part of the weights or the config."""

    def __init__(self, config: ViTConfig, kernels: Kernels = TORCH):
        super().__init__()
        self.config = config.validate()
        self.kernels = kernels
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, D))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, kernels) for _ in range(config.depth))
        self.norm = LayerNorm(D, config.ln_eps, kernels)
        self.head = nn.Linear(D, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # timm's default ViT init: truncated normal 0.02 for linears and position embeddings,
        # a near-zero class token, zero biases; LayerNorms start at identity.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Patch projection as a linear layer over the flattened patch (lecun normal, as big_vision).
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a zero-initialised linear layer (the paper's fine-tuning head)."""
        self.config = replace(self.config, num_classes=num_classes)
        if num_classes > 0:
            self.head = nn.Linear(self.config.embed_dim, num_classes, device=self.cls_token.device)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, as timm's ViT: lets timm's layer-wise lr decay read this model."""
        return {"stem": r"^cls_token|pos_embed|patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → patch embeddings (B, N, D), before class token and positions.

        MPP corrupts these (the [mask] embedding lives in this space) before `forward_tokens`.
        """
        return self.patch_embed(images)

    def with_positions(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, N, D) → the first block's input (B, N+1, D): the class token prepended,
        position embeddings added (resampled in 2-D for another grid), position dropout."""
        B, N, D = patches.shape
        pos_embed = self.pos_embed
        if N + 1 != pos_embed.shape[1]:
            pos_embed = resample_pos_embed(pos_embed, math.isqrt(N))
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, N+1, D)
        return self.pos_drop(x + pos_embed)

    def forward_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (B, N, D) → the final-norm tokens: (B, N+1, D), or with `keep` (B, n, D).

        keep: (B, n) indices of the tokens whose outputs are wanted (0: the class token, i: patch i−1),
        returned in that order. The last block computes queries, MLP and norm for them alone; its keys
        and values still span every token, so the values are the same. Supervised training needs only
        the class token and MPP only the corrupted patches: the last block costs 1/(N+1) or about half.
        """
        x = self.with_positions(patches)  # (B, N+1, D)
        for i, block in enumerate(self.blocks):
            x = block(x, keep if i == len(self.blocks) - 1 else None)
        return self.norm(x)  # (B, N+1, D) | (B, n, D)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (B, 3, H, W) → {"tokens": (B, N+1, D) after the final norm, "pre_logits": (B, D), the
        class token}: always both, what the probes pool from."""
        tokens = self.forward_tokens(self.embed_patches(images))  # (B, N+1, D)
        return {"tokens": tokens, "pre_logits": tokens[:, 0]}

    def forward_blocks(self, images: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Images (B, 3, H, W) → the output of each of the first `depth` blocks (default all), before
        the final norm: [(B, N+1, D)] × depth. One forward pass serves every layer's probe."""
        x = self.with_positions(self.embed_patches(images))  # (B, N+1, D)
        outputs = []
        for block in self.blocks[: len(self.blocks) if depth is None else depth]:
            x = block(x)  # (B, N+1, D)
            outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.embed_patches(images)  # (B, N, D)
        cls = torch.zeros(len(patches), 1, dtype=torch.long, device=patches.device)  # (B, 1): the class token
        pre_logits = self.forward_tokens(patches, keep=cls)[:, 0]  # (B, D)
        return self.head(pre_logits)  # (B, num_classes)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load ours or timm's weights; position embeddings of another grid are resampled in 2-D."""
        state_dict = dict(state_dict)
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape and pos.shape[-1] == self.pos_embed.shape[-1]:
            state_dict["pos_embed"] = resample_pos_embed(pos, self.config.grid_size)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, ...), index: (B, n) → (B, n, ...): each row's chosen tokens, in index order."""
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1, 1 + g², D) → (1, 1 + new_grid², D): bicubic 2-D resampling of the patch positions,
    the class token's embedding kept as is (the paper's recipe for a new resolution)."""
    from timm.layers import resample_abs_pos_embed

    old_grid = math.isqrt(pos_embed.shape[1] - 1)
    if old_grid**2 != pos_embed.shape[1] - 1:
        raise UsageError(
            f"position embeddings of length {pos_embed.shape[1]} are not 1 + a square grid: "
            "this checkpoint is not from a square-image ViT with a class token"
        )
    return resample_abs_pos_embed(
        pos_embed, new_size=(new_grid, new_grid), old_size=(old_grid, old_grid), num_prefix_tokens=1
    )


def vit_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of `ViT(config).state_dict()`, in its order, without building it: what a
    file's weights are checked against (mpp.model.weights) before a model of a size read from a file is built."""
    D, M, C, P = config.embed_dim, config.mlp_dim, config.in_chans, config.patch_size
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, config.num_patches + 1, D),
              "patch_embed.proj.weight": (D, C, P, P), "patch_embed.proj.bias": (D,)}
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
             "mlp.fc1.weight": (M, D), "mlp.fc1.bias": (M,), "mlp.fc2.weight": (D, M), "mlp.fc2.bias": (D,)}
    for i in range(config.depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    if config.num_classes > 0:
        shapes.update({"head.weight": (config.num_classes, D), "head.bias": (config.num_classes,)})
    return shapes


def timm_kwargs(config: ViTConfig) -> dict:
    """Arguments for timm's `VisionTransformer` with the same architecture (for export and tests)."""
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.embed_dim,
        qkv_bias=True,
        class_token=True,
        global_pool="token",
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        attn_drop_rate=config.attn_dropout,
    )
