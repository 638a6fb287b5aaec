"""A folder in timm's Hub layout (what scripts/export.py writes): its config.json checked before
timm builds a model from it.

timm takes config.json's fields as they are: a `mean` of "abc" or a `std` of zeros fails (or
divides by zero) only when the probe folds the normalisation, a size of -16 deep inside timm, and a
`depth` of ten million builds ten million blocks. So each field that sizes the model or feeds the
images is checked here for its type, finiteness and range first (mpp.model.weights.LIMITS, the ranges of
the ViT's own config), and the sizes it states are compared with the weights file beside it
(`agree`), so that the model timm builds is the one the file holds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mpp.core.errors import UsageError
from mpp.model.weights import CHANNELS, LIMITS

CONFIG = "config.json"
FIX = "re-export the folder (scripts/export.py) or correct config.json"
# config.json's model_args (timm's VisionTransformer arguments) → the ViTConfig field each sizes
SIZE_ARGS = {"img_size": "image_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
             "depth": "depth", "num_heads": "num_heads", "num_classes": "num_classes"}
MAX_MLP_RATIO = 64.0


def read_config(folder: Path) -> dict:
    """The sizes config.json states ({ViTConfig field: value}, plus "mlp_ratio" when it says one),
    after every field timm would use to build or feed the model was checked; one line for the first
    that is missing, of another type, not finite or out of range."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # unreadable, torn, not JSON
        raise UsageError(f"'{path}' cannot be read as JSON ({type(e).__name__}): {FIX}") from e
    if not isinstance(config, dict):
        raise UsageError(f"'{path}' holds a JSON {type(config).__name__}, not an object: {FIX}")
    if not isinstance(config.get("architecture"), str) or not config["architecture"]:
        raise UsageError(f"'{path}' names no architecture (a timm model name such as vit_base_patch16_224): {FIX}")
    # timm's older layout has no pretrained_cfg: the file itself is the pretrained config
    pretrained, model_args = config.get("pretrained_cfg", config), config.get("model_args", {})
    for name, value in (("pretrained_cfg", pretrained), ("model_args", model_args)):
        if not isinstance(value, dict):
            raise UsageError(f"'{path}' has {name} {value!r}, not an object: {FIX}")
    sizes = {field: _size(path, f"model_args.{arg}", model_args[arg], field)
             for arg, field in SIZE_ARGS.items() if arg in model_args}
    for where, fields in (("", config), ("pretrained_cfg.", pretrained)):
        if "num_classes" in fields:  # timm builds the head from these when model_args does not say
            classes = _size(path, f"{where}num_classes", fields["num_classes"], "num_classes")
            if sizes.setdefault("num_classes", classes) != classes:
                raise UsageError(f"'{path}' gives {where}num_classes {classes} and elsewhere {sizes['num_classes']}: "
                                 f"{FIX}")
    if "mlp_ratio" in model_args:
        sizes["mlp_ratio"] = _number(path, "model_args.mlp_ratio", model_args["mlp_ratio"], MAX_MLP_RATIO)
    if "input_size" in pretrained:
        input_size = pretrained["input_size"]
        if not isinstance(input_size, list) or len(input_size) != 3:
            raise UsageError(f"'{path}' has pretrained_cfg.input_size {input_size!r}, not [channels, height, "
                             f"width]: {FIX}")
        _size(path, f"pretrained_cfg.input_size {input_size}: channels", input_size[0], "in_chans")
        _size(path, f"pretrained_cfg.input_size {input_size}: height and width", input_size[1:], "image_size")
    if "mean" in pretrained or "std" in pretrained:  # one not given is the architecture's: checked is the other
        normalization(pretrained.get("mean", [0.0]), pretrained.get("std", [1.0]), f"'{path}'", FIX)
    return sizes


def _size(path: Path, name: str, value, field: str) -> int:
    """A whole number within the ViT field's range; image and patch sizes may be [h, w] with h = w."""
    if field in ("image_size", "patch_size") and isinstance(value, list) and len(value) == 2:
        if value[0] != value[1]:
            raise UsageError(f"'{path}' has {name} {value}, not square: our ViT takes square images and patches; "
                             "pass a model of square ones")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"'{path}' has {name} {value!r}, not a whole number: {FIX}")
    if field == "in_chans" and value != CHANNELS:
        raise UsageError(f"'{path}' describes a model of {value}-channel images, and images here are RGB: "
                         f"pass a {CHANNELS}-channel model")
    if field in LIMITS and value not in LIMITS[field]:
        raise UsageError(f"'{path}' has {name} {value}, not {LIMITS[field].describe()}: {FIX}")
    return value


def _number(path: Path, name: str, value, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:  # NaN fails too
        raise UsageError(f"'{path}' has {name} {value!r}, not a number in (0, {high:g}]: {FIX}")
    return float(value)


def normalization(mean, std, where: str, fix: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A model's input normalisation as (mean, std) of one value per RGB channel: each given as 1 (the
    same for every channel) or 3 finite numbers, every std above 0; else one line naming `where`."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        numbers = list(value) if isinstance(value, (list, tuple)) else []
        if len(numbers) not in (1, CHANNELS) or not all(
                not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise UsageError(f"{where} gives the input {name} {value!r}, not 1 or {CHANNELS} finite numbers "
                             f"(one per channel): {fix}")
        if name == "std" and min(numbers) <= 0:
            raise UsageError(f"{where} gives the input std {value!r}, which divides by zero or flips the "
                             f"image (each must be above 0): {fix}")
        out.append(tuple(float(x) for x in numbers) * (CHANNELS // len(numbers)))
    return out[0], out[1]


def agree(stated: dict, held: dict, folder: Path, weights_file: str) -> None:
    """config.json's sizes are the weights file's: timm builds from the first and loads the second,
    so a config of ten million blocks beside a file of two builds ten million before it fails."""
    for field, value in stated.items():
        if field == "mlp_ratio":
            field, value, have = "mlp_dim", int(held["embed_dim"] * value), held["mlp_dim"]
        else:
            have = held.get(field, value)  # num_heads: no tensor says it
        if value != have:
            raise UsageError(f"'{folder / CONFIG}' gives {field} {value} but its {weights_file} holds a model "
                             f"of {field} {have}: {FIX}")
