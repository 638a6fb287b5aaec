"""Weights and configs read from files are checked before anything is built from them (issue 31):
a bare timm state dict, a run's checkpoint and a folder in timm's Hub layout whose tensors have
unexpected names, ranks, shapes, dtypes or values, or whose config.json has fields of the wrong
type, not finite or out of range, are refused in one line naming the file and what is wrong
(mpp/model/weights.py, mpp/eval/hub_folder.py), through every entry point that takes --run."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mpp.core.errors import UsageError
from mpp.eval import timm_io
from mpp.model.vit import ViT, vit_config, vit_shapes
from mpp.run.checkpoint import load_run
from tests.helpers.runs import run_script


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, ViT]:
    """A folder for the module's files, with a 2-block Micro exported into it (timm's Hub layout)."""
    torch.manual_seed(1)
    vit = ViT(vit_config("Micro/4", depth=2, num_classes=0)).eval()
    root = tmp_path_factory.mktemp("weight-files")
    timm_io.export(vit, root / "export")
    return root, vit


def weights(vit: ViT) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in vit.state_dict().items()}


def edited(vit: ViT, edit) -> dict[str, torch.Tensor]:
    state = weights(vit)
    edit(state)
    return state


def set_value(name: str, value: float):
    def edit(state):
        state[name].view(-1)[0] = value
    return edit


def rename(old: str, new: str):
    def edit(state):
        state[new] = state.pop(old)
    return edit


def reshape(name: str, shape: tuple[int, ...]):
    def edit(state):
        state[name] = torch.zeros(shape)
    return edit


def drop_block(i: int):
    def edit(state):
        for name in [k for k in state if k.startswith(f"blocks.{i}.")]:
            del state[name]
    return edit


def to_dtype(dtype: torch.dtype):
    def edit(state):
        state.update({k: (v * 100).to(dtype) for k, v in state.items()})
    return edit


STATE_DICTS = {  # a bare timm state dict: what it is edited by → what the one line says
    "int8": (to_dtype(torch.int8), r"as int8, not floating point"),
    "nan": (set_value("blocks.0.attn.qkv.weight", float("nan")), r"non-finite values .* 'blocks.0.attn.qkv.weight'"),
    "inf": (set_value("norm.bias", float("-inf")), r"non-finite values .* 'norm.bias'"),
    "pos0": (reshape("pos_embed", (1, 0, 128)), r"'pos_embed' of shape \[1, 0, 128\], not \[1, 1 \+ a square"),
    "pos-not-square": (reshape("pos_embed", (1, 16, 128)), r"'pos_embed' of shape \[1, 16, 128\]"),
    "patch-5d": (reshape("patch_embed.proj.weight", (128, 3, 4, 4, 1)), r"\[128, 3, 4, 4, 1\], not a square patch"),
    "block-x": (rename("blocks.1.attn.qkv.weight", "blocks.x.attn.qkv.weight"),
                r"'blocks.x.attn.qkv.weight', which no"),
    "block-skipped": (drop_block(0), r"is no plain timm ViT state dict \(no blocks.0.mlp.fc1.weight\)"),
    "block-far": (rename("blocks.1.norm1.weight", "blocks.9999999.norm1.weight"), r"no blocks.2"),
    "fc1-shape": (reshape("blocks.1.mlp.fc1.weight", (512, 64)),
                  r"'blocks.1.mlp.fc1.weight' of shape \[512, 64\] where"),
    "head-1d": (reshape("head.weight", (10,)), r"'head.weight' of shape \[10\], not a linear layer's"),
    "no-final-norm": (lambda s: s.pop("norm.weight"), r"lacks 'norm.weight'"),
    "grey": (reshape("patch_embed.proj.weight", (128, 1, 4, 4)), r"1-channel images"),
    "extra": (lambda s: s.update({"fc_norm.weight": torch.ones(128)}), r"'fc_norm.weight', which no plain"),
}


@pytest.mark.parametrize("case", STATE_DICTS)
def test_a_bare_state_dict_of_unexpected_contents_is_refused_naming_the_tensor(base, tmp_path, case):
    edit, says = STATE_DICTS[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(edited(base[1], edit), path)
    with pytest.raises(UsageError, match=says) as refused:
        timm_io.load_source(str(path))
    assert "\n" not in str(refused.value) and path.name in str(refused.value)


def test_half_precision_weights_load_as_they_are(base, tmp_path):
    state = {k: v.bfloat16() for k, v in weights(base[1]).items()}
    save_file(state, tmp_path / "bf16.safetensors")
    vit = timm_io.load_source(str(tmp_path / "bf16.safetensors")).vit
    for name, tensor in vit.state_dict().items():
        assert torch.equal(tensor, state[name].float())


def test_vit_shapes_are_the_built_models():
    for config in (vit_config("Micro/4", depth=2, num_classes=0), vit_config("Ti/16", num_classes=10)):
        assert vit_shapes(config) == {k: tuple(v.shape) for k, v in ViT(config).state_dict().items()}


def save_run_checkpoint(path: Path, vit: ViT, state: dict | None = None, **vit_fields) -> Path:
    """A checkpoint as a run saves it (its config, timm-named weights), with its parts replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**dataclasses.asdict(vit.config), **vit_fields}
    torch.save({"config": {"vit": config, "train": {"dataset": "digits", "seed": 0}},
                "model": weights(vit) if state is None else state, "step": 2}, path)
    return path


CHECKPOINTS = {  # a run's checkpoint: (its weights edited by, its stored ViT config's fields) → the one line
    "inf": (set_value("blocks.1.mlp.fc1.weight", float("inf")), {}, r"non-finite values .* 'blocks.1.mlp.fc1.weight'"),
    "int": (to_dtype(torch.int32), {}, r"as int32, not floating point"),
    "deeper-config": (None, {"depth": 3}, r"lacks 'blocks.2.norm1.weight' of the ViT its sizes describe \(3 blocks"),
    "shape": (reshape("cls_token", (1, 2, 128)), {}, r"'cls_token' of shape \[1, 2, 128\] where .* has \[1, 1, 128\]"),
    "string-size": (None, {"embed_dim": "128"}, r"records ViT embed_dim '128', not a whole number"),
    "huge-depth": (None, {"depth": 10**7}, r"records ViT depth 10000000, not in \[1, 1024\]"),
    "unknown-field": (None, {"register_tokens": 4}, r"unknown ViT config field\(s\) \['register_tokens'\]"),
    "indivisible": (None, {"num_heads": 3}, r"records a ViT that cannot be built \(embed_dim 128 is not divisible"),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_a_checkpoint_whose_weights_are_not_its_configs_is_refused(base, tmp_path, case):
    edit, fields, says = CHECKPOINTS[case]
    state = edited(base[1], edit) if edit else None
    path = save_run_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt-00000002.pt", base[1], state, **fields)
    with pytest.raises(UsageError, match=says) as refused:
        load_run(tmp_path / "run")
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_checkpoint_without_its_model_or_config_is_refused(base, tmp_path):
    torch.save({"config": {"vit": dataclasses.asdict(base[1].config)}, "step": 2}, tmp_path / "no-model.pt")
    with pytest.raises(UsageError, match="has no model"):
        load_run(tmp_path / "no-model.pt")
    torch.save({"config": {"vit": 3}, "model": weights(base[1])}, tmp_path / "no-config.pt")
    with pytest.raises(UsageError, match="has no ViT config"):
        load_run(tmp_path / "no-config.pt")


def with_config(base, tmp_path, edit) -> Path:
    """A copy of the module's export whose config.json is edited by edit(config)."""
    folder = tmp_path / "edited"
    shutil.copytree(base[0] / "export", folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def field(*path, value=None, drop=False):
    def edit(config):
        for key in path[:-1]:
            config = config[key]
        config.pop(path[-1]) if drop else config.__setitem__(path[-1], value)
    return edit


CONFIGS = {  # config.json's field edited → the one line
    "mean-text": (field("pretrained_cfg", "mean", value="abc"), r"input mean 'abc', not 1 or 3 finite numbers"),
    "mean-nan": (field("pretrained_cfg", "mean", value=[float("nan")] * 3), r"input mean \[nan, nan, nan\]"),
    "mean-two": (field("pretrained_cfg", "mean", value=[0.5, 0.5]), r"input mean \[0.5, 0.5\], not 1 or 3"),
    "std-zero": (field("pretrained_cfg", "std", value=[0, 0, 0]), r"input std \[0, 0, 0\], which divides by zero"),
    "std-negative": (field("pretrained_cfg", "std", value=[0.5, -0.5, 0.5]), r"each must be above 0"),
    "no-architecture": (field("architecture", drop=True), r"names no architecture"),
    "args-list": (field("model_args", value=[1, 2]), r"has model_args \[1, 2\], not an object"),
    "img-negative": (field("model_args", "img_size", value=-16), r"model_args.img_size -16, not in \[1, 16384\]"),
    "img-text": (field("model_args", "img_size", value="16"), r"model_args.img_size '16', not a whole number"),
    "width-huge": (field("model_args", "embed_dim", value=10**9), r"model_args.embed_dim 1000000000, not in"),
    "depth-huge": (field("model_args", "depth", value=10**7), r"model_args.depth 10000000, not in \[1, 1024\]"),
    "depth-other": (field("model_args", "depth", value=3), r"gives depth 3 but its model.safetensors holds .* depth 2"),
    "classes-text": (field("num_classes", value="ten"), r"has num_classes 'ten', not a whole number"),
    "classes-disagree": (field("num_classes", value=10), r"gives num_classes 10 and elsewhere 0"),
    "mlp-ratio-nan": (field("model_args", "mlp_ratio", value=float("nan")),
                      r"mlp_ratio nan, not a number in \(0, 64\]"),
    "input-size": (field("pretrained_cfg", "input_size", value=[3, 16, 17]),
                   r"height and width \[16, 17\], not square"),
    "grey": (field("model_args", "in_chans", value=1), r"a model of 1-channel images"),
    "bool-size": (field("model_args", "patch_size", value=True), r"model_args.patch_size True, not a whole number"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_an_exported_folders_config_is_checked_before_timm_builds_it(base, tmp_path, case):
    edit, says = CONFIGS[case]
    folder = with_config(base, tmp_path, edit)
    with pytest.raises(UsageError, match=says) as refused:
        timm_io.load_source(str(folder))
    assert "\n" not in str(refused.value) and str(folder) in str(refused.value)


def test_a_torn_config_and_a_one_value_normalisation(base, tmp_path):
    folder = with_config(base, tmp_path, field("pretrained_cfg", "std", value=[0.25]))
    imported = timm_io.load_source(str(folder))  # one value is every channel's
    assert imported.std == (0.25, 0.25, 0.25) and imported.mean == (0.5, 0.5, 0.5)
    (folder / "config.json").write_text('{"architecture": "vit_base')
    with pytest.raises(UsageError, match=r"cannot be read as JSON \(JSONDecodeError\)"):
        timm_io.load_source(str(folder))
    (folder / "config.json").write_text("[1]")
    with pytest.raises(UsageError, match="holds a JSON list, not an object"):
        timm_io.load_source(str(folder))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused_in_one_line(done, *words: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
def test_the_entry_points_refuse_such_files_in_one_line_writing_nothing(base, tmp_path_factory):
    """Through the command line: the entry points that take --run, each kind of file (eval/finetune.py's
    own way in is the next test's)."""
    root, vit = base
    work = tmp_path_factory.mktemp("cli")
    save_file(edited(vit, set_value("blocks.0.attn.qkv.weight", float("nan"))), work / "nan.safetensors")
    run = work / "run"
    save_run_checkpoint(run / "checkpoints" / "ckpt-00000002.pt", vit,
                        edited(vit, set_value("blocks.1.mlp.fc1.weight", float("inf"))))
    save_run_checkpoint(work / "deep.pt", vit, depth=10**7)
    folder = with_config(base, work, field("pretrained_cfg", "std", value=[0, 0, 0]))
    before = files_under(work)
    probe = ["--dataset", "digits", "--shots", "1", "--seeds", "1", "--no-references", "--batch-size", "16"]
    refused_in_one_line(run_script("eval/fewshot.py", "--run", str(work / "nan.safetensors"), *probe,
                                   "--output", str(work / "out" / "fewshot.json")),
                        "nan.safetensors", "'blocks.0.attn.qkv.weight'")
    refused_in_one_line(run_script("eval/knn.py", "--run", str(folder), "--dataset", "digits", "--output",
                                   str(work / "out" / "knn.json")), "config.json", "std [0, 0, 0]")
    refused_in_one_line(run_script("eval/linear_probe.py", "--run", str(run), "--dataset", "digits"),
                        "ckpt-00000002.pt", "'blocks.1.mlp.fc1.weight'")
    refused_in_one_line(run_script("scripts/export.py", "--run", str(work / "deep.pt"), "--output",
                                   str(work / "out" / "export")), "deep.pt", "depth 10000000")
    assert files_under(work) == before and not (work / "out").exists()


def test_finetuning_refuses_them_before_its_output_directory_exists(base, tmp_path):
    """eval/finetune.py's start (mpp.train.finetune_start) reads a checkpoint file and a timm source its own way."""
    from mpp.train.finetune import FinetuneConfig
    from mpp.train.finetune_start import starting_model

    path = save_run_checkpoint(tmp_path / "int.pt", base[1], edited(base[1], to_dtype(torch.int32)))
    with pytest.raises(UsageError, match=r"int.pt' holds .* as int32, not floating point"):
        starting_model(FinetuneConfig(run=str(path), output_dir=str(tmp_path / "ft")))
    folder = with_config(base, tmp_path, field("model_args", "depth", value=10**7))
    with pytest.raises(UsageError, match=r"model_args.depth 10000000"):
        starting_model(FinetuneConfig(run=str(folder), output_dir=str(tmp_path / "ft")))
    assert not (tmp_path / "ft").exists()
