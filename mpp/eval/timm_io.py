"""Weights out to timm and the Hub, and timm weights in as our ViT: the one place that talks to timm's hub code.

Out (scripts/export.py, asked by an `ExportConfig`): a run's ViT becomes a timm `VisionTransformer` (built
from `timm_kwargs`, loaded strictly) and timm's own `save_for_hf` writes it, so the folder has timm's Hub
layout by construction: `model.safetensors` and a `config.json` naming an architecture timm can build plus
the `model_args` of our size (Micro too), so `timm.create_model("local-dir:DIR", pretrained=True)` or a
Hub repo id loads it strictly.

In: `--run` of the probe CLIs may name, besides our runs, `timm:NAME` (timm's registry, weights from the Hub),
a folder with timm's Hub layout, or a bare timm state dict (`.safetensors`, or `.pth` / `.bin` read
weights-only). It is converted once into our `ViT` with a strict load; a timm variant our ViT cannot
represent is refused with one line naming what differs. `Imported.record()` is its "run config" in reports.
The probes feed every model mpp.data.sources's normalisation; a timm model trained with another (ImageNet's
mean and std) has it folded into its patch embedding at import (`fold_normalization`, exact: the
patch projection is linear), so it sees what it was trained on.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from mpp.core.config import Range, check_ranges
from mpp.core.errors import UsageError, disk_refused
from mpp.core.files import recover_killed_folders, replace_folder
from mpp.data.sources import MEAN, STD
from mpp.eval import hub_folder
from mpp.model import weights
from mpp.model.ops import TORCH, Kernels
from mpp.model.vit import SIZES, ViT, timm_kwargs
from mpp.run import rundir

PREFIX = "timm:"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".bin")  # our own checkpoints are .pt
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub layout holds
# timm builds any size from `model_args`; the architecture name only picks the class and its defaults.
EXPORT_ARCHITECTURE = "vit_base_patch16_224"


def is_timm_source(run: str | None) -> bool:
    """Whether --run names a timm model rather than one of our runs or checkpoints."""
    if not run:
        return False
    path = Path(run)
    if run.startswith(PREFIX):
        return True
    if path.is_file():
        return path.suffix in STATE_DICT_SUFFIXES
    hub_layout = (path / "config.json").is_file() and any((path / f).is_file() for f in HUB_WEIGHTS)
    return path.is_dir() and hub_layout and not (path / "checkpoints").exists()


@dataclasses.dataclass(frozen=True)
class Imported:
    """A timm model converted into our ViT, and what reports say about it."""
    vit: ViT
    name: str  # the label in tables: the timm name, or the folder's / file's name
    source: str  # what --run said: timm:NAME, a folder or a file
    architecture: str  # timm's architecture name, or "state dict" for a bare file
    mean: tuple[float, ...]  # the model's pretrained_cfg normalisation, folded into vit (fold_normalization)
    std: tuple[float, ...]

    def rebuilt(self, kernels: Kernels = TORCH, **overrides) -> ViT:
        """A new ViT holding the imported weights, with `kernels` and `overrides` of its config
        (fields that change no parameter's shape, such as dropout)."""
        vit = ViT(dataclasses.replace(self.vit.config, **overrides), kernels)
        vit.load_state_dict(self.vit.state_dict())
        return vit

    def record(self) -> dict:
        """The documented stand-in for a run config: {name, source, architecture, mean, std}."""
        return {"name": self.name, "source": self.source, "architecture": self.architecture,
                "mean": list(self.mean), "std": list(self.std)}


# ---------------------------------------------------------------- weights out

def timm_twin(vit: ViT) -> nn.Module:
    """timm's VisionTransformer of `vit`'s architecture holding its weights (loaded strictly)."""
    import timm

    model = timm.create_model(EXPORT_ARCHITECTURE, pretrained=False, **timm_kwargs(vit.config))
    model.load_state_dict(vit.state_dict(), strict=True)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What scripts/export.py is asked to do (its flags, mpp.core.config; --run and --output are required)."""
    run: str  # run directory (its newest checkpoint) or checkpoint file
    output: str  # the folder to write (refused if not empty)
    overwrite: bool = False  # replace model.safetensors and config.json in a non-empty --output
    push_to_hub: str | None = None  # also upload the folder to this Hub repo (needs network and a login)
        # (default: none, the local export only)

    RANGES: ClassVar[dict[str, Range]] = {}  # no numbers
    FLAG_ARGS: ClassVar[dict[str, dict]] = {"run": {"metavar": "RUN"}, "output": {"metavar": "DIR"},
                                            "push_to_hub": {"metavar": "REPO"}}

    def validate(self) -> ExportConfig:
        """As every config class's: its numbers' ranges (none here; the paths are checked by the export)."""
        check_ranges(self)
        return self


def export(vit: ViT, output: Path, overwrite: bool = False) -> Path:
    """Write `vit` in timm's Hub layout to `output` (model.safetensors + config.json), whole or not at
    all (mpp.core.files.replace_folder: written beside it, then swapped in). A folder that exists and is not
    empty is refused unless `overwrite`; its other files are then kept. What a killed export left is
    put right first: the previous export back in place, a half-written one deleted, never read."""
    from timm.models import save_for_hf

    output = Path(os.path.realpath(output)) if output.is_symlink() else output  # a link: the folder it names
    if output.exists() and not output.is_dir():
        raise UsageError(f"export folder '{output}' is a file: pass a folder path as --output")
    try:
        recover_killed_folders(output)
    except OSError as e:
        raise UsageError(f"cannot clean up the killed export beside '{output}' ({e.strerror or e}): remove its "
                         f".{output.name}.* folders by hand, or pass another --output") from e
    if output.is_dir() and rundir.holds_run(output):  # --overwrite would replace the run's own config.json
        raise UsageError(f"export folder '{output}' is a run directory: pass another --output (e.g. exports/NAME)")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(f"export folder '{output}' is not empty: pass --overwrite to replace its "
                         "model.safetensors and config.json, or another --output")
    twin = timm_twin(vit)
    # Our tag, not the architecture's default pretrained tag: these weights are not timm's; and the
    # normalisation they were trained with (mpp.data.sources's), which timm's data config then applies.
    config = {"pretrained_cfg": {"tag": "mpp", "license": None, "mean": list(MEAN), "std": list(STD)}}
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(output, lambda folder: _save_for_hf(save_for_hf, twin, folder, config))
    except OSError as e:
        raise UsageError(disk_refused(e) or f"cannot write the export to '{output}' ({e.strerror or e}): pass a "
                         "writable --output") from e
    return output


def _save_for_hf(save_for_hf, twin, folder: Path, config: dict) -> None:
    """timm's writer, whose safetensors errors (a full disk among them) become the OSError they are."""
    try:
        save_for_hf(twin, str(folder), model_config=config, safe_serialization=True)
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError has no public base to catch
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(folder)) from e


def push(folder: Path, repo: str) -> str:
    """Upload an exported folder to the Hub repo `repo` through huggingface_hub; one line when offline."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        return api.upload_folder(repo_id=repo, folder_path=str(folder)).commit_url
    except Exception as e:  # offline, no token, no permission: all end here, after the local export
        raise UsageError(f"could not push '{folder}' to the Hub repo '{repo}' ({type(e).__name__}); the local "
                         "export is written: go online and log in (huggingface-cli login), then rerun") from e


# ---------------------------------------------------------------- weights in

def load_source(run: str, image_size: int | None = None) -> Imported:
    """Our ViT from a timm name, a folder in timm's Hub layout or a bare timm state dict."""
    path = Path(run)
    if run.startswith(PREFIX):
        name = run[len(PREFIX):]
        model = create(name, f"timm model '{name}' could not be loaded from the Hub",
                       "go online, or pass a local file or folder (scripts/export.py or timm's save_for_hf writes one)")
        return from_timm(model, name, run, image_size)
    if path.is_dir():
        check_folder(path)
        model = create(f"local-dir:{path}", f"folder '{path}' could not be loaded as a timm model",
                       "pass a folder with timm's Hub layout (config.json + model.safetensors)")
        return from_timm(model, path.name, run, image_size)
    return from_state_dict(read_state_dict(path), path.name, run, image_size)


def check_folder(folder: Path) -> None:
    """What timm would build from a folder in its Hub layout, checked before it builds anything:
    config.json's fields (mpp.eval.hub_folder), the weights file's names, ranks and dtypes, and that the two
    describe one model. The values are checked again, with the shapes, once timm has loaded them (load_strict)."""
    stated = hub_folder.read_config(folder)
    weights_file = next((folder / name for name in HUB_WEIGHTS if (folder / name).is_file()), None)
    if weights_file is None:
        raise UsageError(f"folder '{folder}' holds no {' or '.join(HUB_WEIGHTS)}: pass a folder with timm's Hub layout")
    state = read_state_dict(weights_file)
    source = f"timm folder '{folder}' ({weights_file.name})"
    fix = "pass a folder that scripts/export.py or timm's save_for_hf wrote (a plain timm ViT's)"
    held = weights.plain_vit_sizes({name: tuple(t.shape) for name, t in state.items()}, source, fix)
    hub_folder.agree(stated, held, folder, weights_file.name)
    weights.check_values(state, source)  # dtypes before timm casts them into its float parameters


def create(name: str, problem: str, fix: str) -> nn.Module:
    import logging

    import timm

    # huggingface_hub logs a warning per failed request before it raises: offline, the one-line error
    # would come after several lines of retries.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True).eval()
    except Exception as e:  # no network, an unknown name, a malformed config: timm's errors are many kinds
        raise UsageError(f"{problem} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): "
                         f"{fix}") from e
    finally:
        hub_log.setLevel(level)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A bare timm state dict: safetensors, or a pickle read weights-only (never code to run)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pth", ".bin"):
            from mpp.run.checkpoint import load_weights_only

            state = load_weights_only(path)
        else:
            raise UsageError(f"'{path}' is no timm weights file: pass a .safetensors, .pth or .bin state dict")
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"'{path}' cannot be read as a safe state dict ({type(e).__name__}): pass a .safetensors "
                         "file or a .pth/.bin that holds only tensors") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # timm's training checkpoints nest it
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"'{path}' holds no state dict of tensors: pass a timm model's state_dict()")
    return state


def representable(model: nn.Module) -> None:
    """Refuse, in one line, a timm model our ViT cannot represent (what a strict load would not notice)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UsageError(f"timm model of class {type(model).__name__} is not a ViT: pass a timm VisionTransformer")
    block = model.blocks[0] if len(model.blocks) else None
    differences = [
        (model.cls_token is None, "no class token"),
        (getattr(model, "reg_token", None) is not None, "register tokens"),
        (getattr(model, "no_embed_class", False), "position embeddings without the class token's"),
        (model.pos_embed is None, "no absolute position embeddings"),
        (getattr(model, "dynamic_img_size", False), "a dynamic image size"),
        (model.global_pool != "token", f"global pool '{model.global_pool}' (ours: the class token)"),
        (not isinstance(model.norm_pre, nn.Identity), "a LayerNorm before the blocks"),
        (not isinstance(model.fc_norm, nn.Identity), "a norm on the pooled features (fc_norm)"),
        (getattr(model.patch_embed, "norm", nn.Identity()).__class__ is not nn.Identity,
         "a norm in the patch embedding"),
        (block is not None and type(block).__name__ != "Block", f"blocks of type {type(block).__name__}"),
        (block is not None and not isinstance(block.mlp.act, nn.GELU), "an MLP activation other than GELU"),
        (block is not None and getattr(block.mlp.act, "approximate", "none") != "none", "tanh-approximated GELU"),
        (block is not None and not isinstance(block.attn.q_norm, nn.Identity), "query/key norms"),
        (block is not None and block.attn.qkv.bias is None, "no qkv bias"),
        (block is not None and not isinstance(block.norm1, nn.LayerNorm), f"{type(block.norm1).__name__} norms"),
    ]
    named = [what for bad, what in differences if bad]
    if named:
        raise UsageError(f"this timm ViT has {', '.join(named)}, which our ViT cannot represent: "
                         "pass a plain timm ViT (class token, pre-norm LayerNorm blocks, absolute positions)")


def from_timm(model: nn.Module, name: str, source: str, image_size: int | None) -> Imported:
    representable(model)
    _, h, w = model.pretrained_cfg.get("input_size", (3, *model.patch_embed.img_size))
    if h != w:
        raise UsageError(f"timm model '{name}' takes {h}x{w} images: our ViT takes square ones; pass a square model")
    first = model.blocks[0]
    sizes = dict(image_size=int(model.patch_embed.img_size[0]), patch_size=int(model.patch_embed.patch_size[0]),
                 in_chans=model.patch_embed.proj.in_channels, embed_dim=model.embed_dim, depth=len(model.blocks),
                 num_heads=first.attn.num_heads, mlp_dim=first.mlp.fc1.out_features, num_classes=model.num_classes,
                 ln_eps=first.norm1.eps)
    vit = load_strict(sizes, model.state_dict(), name, image_size)
    cfg = model.pretrained_cfg
    mean, std = hub_folder.normalization(cfg.get("mean", MEAN), cfg.get("std", STD), f"timm model '{name}'",
                                         "pass a model whose pretrained_cfg gives its input normalisation")
    fold_normalization(vit, mean, std)
    return Imported(vit, name, source, getattr(model, "default_cfg", {}).get("architecture", type(model).__name__),
                    mean, std)


@torch.no_grad()
def fold_normalization(vit: ViT, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Make `vit` on mpp.data.sources's input x = (p - MEAN) / STD compute what it computed on its own
    (p - mean) / std: that input is x * STD / std + (MEAN - mean) / std per channel, and the patch
    projection (a convolution with stride = kernel, no padding) is linear, so the scale goes into its
    weight and the shift into its bias. Nothing changes when the two normalisations agree."""
    if len(mean) != len(MEAN) or len(std) != len(STD):
        raise UsageError(f"the timm model normalises {len(mean)} channels: pass a 3-channel (RGB) model")
    if tuple(mean) == MEAN and tuple(std) == STD:
        return
    proj = vit.patch_embed.proj
    scale = torch.tensor([a / s for a, s in zip(STD, std, strict=True)], dtype=proj.weight.dtype)  # [3]
    shift = torch.tensor([(a - m) / s for a, m, s in zip(MEAN, mean, std, strict=True)], dtype=proj.weight.dtype)  # [3]
    proj.bias += (proj.weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))  # [D]
    proj.weight *= scale.view(1, -1, 1, 1)  # [D, 3, P, P]


def from_state_dict(state: dict, name: str, source: str, image_size: int | None) -> Imported:
    """A bare state dict says every size but the number of heads: that is read from our size table
    (the ViT paper's sizes, 64-wide heads, and Micro); any other width needs a folder with config.json."""
    sizes = weights.plain_vit_sizes({k: tuple(v.shape) for k, v in state.items()}, f"'{source}'",
                                    "pass a timm VisionTransformer's state_dict() or a folder with timm's Hub layout")
    heads = {d: h for _, d, _, h in SIZES.values()}.get(sizes["embed_dim"])
    if heads is None:
        raise UsageError(f"'{source}' has width {sizes['embed_dim']}, whose number of heads a bare state dict does "
                         "not say: pass a folder with timm's config.json (timm's save_for_hf or scripts/export.py "
                         "writes one)")
    # a bare state dict says nothing of its normalisation: mpp.data.sources's is assumed (timm's augreg ViTs use it)
    vit = load_strict({**sizes, "num_heads": heads}, state, source, image_size)
    return Imported(vit, name, source, "state dict", MEAN, STD)


def load_strict(sizes: dict, state: dict, source: str, image_size: int | None = None) -> ViT:
    """Our ViT of `sizes` holding `state`, both checked first (mpp.model.weights: every tensor of that ViT, of its
    shape, floating point and finite); at `image_size`, when given, its position embeddings resampled."""
    from mpp.run.checkpoint import load_vit_weights

    what = f"timm model '{source}'"
    fix = "pass a plain timm ViT (class token, pre-norm LayerNorm blocks, absolute positions)"
    config = weights.vit_config_of(sizes, what, fix)
    weights.check(state, config, what, fix)
    vit = ViT(dataclasses.replace(config, image_size=image_size or config.image_size))
    load_vit_weights(vit, state, what, fix)
    return vit.eval()
