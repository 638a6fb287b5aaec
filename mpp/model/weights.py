"""What a file's model weights must be before a ViT is built from them: the tensors of the ViT its
config describes, by name and shape, in floating point, finite.

Weights come from files anyone may have written or damaged: a run's checkpoint, a bare timm state
dict, a folder in timm's Hub layout. Loading itself notices none of it: `load_state_dict` casts int8
values into float parameters (a quantized file then scores chance), NaN loads as NaN (the few-shot
probe's eigensolver fails far from the cause), and a bare file's sizes are read from its own
tensors, so a malformed one fails while they are read. Each such file is checked here first and
refused in one line naming it and its first bad tensor.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from mpp.core.config import Range
from mpp.core.errors import BadInput, UsageError
from mpp.model.vit import ViTConfig, vit_shapes

# Float parameters load these exactly (or by rounding); anything else would be cast: a quantized
# file's int8 codes are no weights without their scales.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOP_LEVEL = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
             "head.weight", "head.bias")
BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
BLOCK_TENSORS = tuple(name.split(".", 2)[2] for name in vit_shapes(ViTConfig(depth=1)) if name.startswith("blocks."))
# Sizes beyond any ViT: a config that says one is wrong, and is refused before a model that size is built.
LIMITS = {"image_size": Range(1, 16384), "patch_size": Range(1, 1024), "embed_dim": Range(1, 16384),
          "depth": Range(1, 1024), "num_heads": Range(1, 1024), "mlp_dim": Range(1, 262144),
          "num_classes": Range(0, 1_000_000), "dropout": Range(0, 1, high_open=True),
          "attn_dropout": Range(0, 1, high_open=True), "ln_eps": Range(0, 1, low_open=True, high_open=True)}
CHANNELS = 3  # the probes, fine-tuning and the trainer feed RGB images


def check_values(state: dict, source: str) -> None:
    """Every tensor of `state` in floating point and finite; else one line naming the first that is not."""
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise UsageError(f"{source} holds '{name}' as a {type(tensor).__name__}, not a tensor: pass a file "
                             "of the model's weights (a state dict of tensors)")
        if tensor.dtype not in FLOAT_DTYPES:
            raise UsageError(f"{source} holds '{name}' as {str(tensor.dtype).removeprefix('torch.')}, not floating "
                             "point (quantized or not weights at all; loaded, it would be cast and score chance): "
                             "pass the model's float32, float16 or bfloat16 weights")
        # aminmax: one pass, no copy, and NaN or ±inf anywhere shows in its result
        if tensor.numel() and not all(torch.isfinite(x) for x in torch.aminmax(tensor)):
            raise UsageError(f"{source} holds non-finite values (NaN or infinite) in '{name}': pass weights saved "
                             "before the training diverged (an earlier checkpoint) or another file")


def check(state: dict, config: ViTConfig, source: str, fix: str) -> None:
    """`state` holds exactly the tensors of ViT(config), each of its shape, floating point and finite;
    else one line naming `source` and the first tensor that is not (`fix`: what to pass instead)."""
    want = vit_shapes(config)
    if extra := [name for name in state if name not in want]:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UsageError(f"{source} holds '{extra[0]}'{more}, which the ViT its sizes describe "
                         f"({describe(config)}) has not: {fix}")
    for name, shape in want.items():
        if name not in state:
            raise UsageError(f"{source} lacks '{name}' of the ViT its sizes describe ({describe(config)}): {fix}")
        got = tuple(state[name].shape) if torch.is_tensor(state[name]) else None
        if got is not None and got != shape:
            raise UsageError(f"{source} holds '{name}' of shape {list(got)} where the ViT its sizes describe "
                             f"({describe(config)}) has {list(shape)}: {fix}")
    check_values(state, source)


def describe(config: ViTConfig) -> str:
    head = f"{config.num_classes} classes" if config.num_classes else "no head"
    return (f"{config.depth} blocks of width {config.embed_dim}, patch {config.patch_size}, "
            f"{config.image_size} px, {head}")


def plain_vit_sizes(shapes: dict[str, tuple[int, ...]], source: str, fix: str) -> dict:
    """The ViTConfig fields (all but num_heads) that a plain timm ViT's state dict says by its tensors'
    names and shapes; one line where a name is no plain ViT's or a tensor has another rank."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if missing := [name for name in needed if name not in shapes]:
        raise UsageError(f"{source} is no plain timm ViT state dict (no {', '.join(missing)}): {fix}")
    for name in shapes:
        block = BLOCK.fullmatch(name)
        if name not in TOP_LEVEL and not (block and block.group(2) in BLOCK_TENSORS):
            raise UsageError(f"{source} holds '{name}', which no plain timm ViT has: {fix}")
    blocks = sorted({int(BLOCK.fullmatch(name).group(1)) for name in shapes if name.startswith("blocks.")})
    if blocks != list(range(len(blocks))):  # the depth is their count, so no index may be skipped
        missing = next(i for i in range(blocks[-1] + 1) if i not in blocks)
        raise UsageError(f"{source} has blocks up to blocks.{blocks[-1]} but no blocks.{missing}: {fix}")
    patch, pos, fc1 = shapes["patch_embed.proj.weight"], shapes["pos_embed"], shapes["blocks.0.mlp.fc1.weight"]
    if len(patch) != 4 or patch[2] != patch[3]:
        raise UsageError(f"{source} holds 'patch_embed.proj.weight' of shape {list(patch)}, not a square "
                         f"patch convolution [width, channels, patch, patch]: {fix}")
    grid = math.isqrt(pos[1] - 1) if len(pos) == 3 and pos[1] > 1 else 0
    if grid < 1 or grid * grid != pos[1] - 1:
        raise UsageError(f"{source} holds 'pos_embed' of shape {list(pos)}, not [1, 1 + a square grid of "
                         f"patches, width] (a class token and absolute positions): {fix}")
    head = shapes.get("head.weight")
    for name, shape in (("blocks.0.mlp.fc1.weight", fc1), ("head.weight", head)):
        if shape is not None and len(shape) != 2:
            raise UsageError(f"{source} holds '{name}' of shape {list(shape)}, not a linear layer's "
                             f"[outputs, inputs]: {fix}")
    return dict(image_size=grid * patch[2], patch_size=patch[2], in_chans=patch[1], embed_dim=patch[0],
                depth=len(blocks), mlp_dim=fc1[0], num_classes=0 if head is None else head[0])


def vit_config_of(fields, source: str, fix: str) -> ViTConfig:
    """The ViTConfig a file records (a checkpoint's stored config, the sizes a weights file implies):
    known fields only, each of its type and within LIMITS, then ViTConfig's own checks; else one line."""
    known = {f.name: f for f in dataclasses.fields(ViTConfig)}
    if not isinstance(fields, dict):
        raise UsageError(f"{source} records its ViT config as a {type(fields).__name__}, not a mapping: {fix}")
    if unknown := sorted(set(fields) - set(known)):
        raise UsageError(f"{source} records unknown ViT config field(s) {unknown}: {fix}")
    for name, value in fields.items():
        whole = known[name].type in ("int", int)  # a string under postponed evaluation of annotations
        kind = "a whole number" if whole else "a number"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise UsageError(f"{source} records ViT {name} {value!r}, not {kind}: {fix}")
        if name in LIMITS and value not in LIMITS[name]:
            raise UsageError(f"{source} records ViT {name} {value!r}, not {LIMITS[name].describe()}: {fix}")
    if fields.get("in_chans", CHANNELS) != CHANNELS:
        raise UsageError(f"{source} is a model of {fields['in_chans']}-channel images, and images here are "
                         f"RGB: pass a {CHANNELS}-channel model")
    config = ViTConfig(**fields)
    try:
        return config.validate()
    except BadInput as e:  # its sizes contradict each other: the file's fault, not a flag's
        raise UsageError(f"{source} records a ViT that cannot be built ({e.problem}): {fix}") from e
