"""Weights out to timm (scripts/export.py) and timm weights in (a timm --run of the probe CLIs), offline."""
import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from eval import compare, fewshot
from mpp.core.errors import UsageError
from mpp.eval import timm_io
from mpp.model.vit import ViT, vit_config
from tests.helpers.runs import ENV, REPO, run_script

FEWSHOT = ["--dataset", "digits", "--shots", "1", "5", "--seeds", "2", "--max-test", "60", "--no-references",
           "--batch-size", "64"]


def pre_logits_timm(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, ViT]:
    """One of our checkpoint files (what a run saves: its config and timm-named weights), of a 2-block Micro."""
    torch.manual_seed(1)
    vit = ViT(vit_config("Micro/4", depth=2, num_classes=0)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-2.pt"
    torch.save({"config": {"vit": dataclasses.asdict(vit.config)}, "model": vit.state_dict(), "step": 2}, path)
    return path, vit


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, "object"]:
    """The checkpoint exported by the CLI."""
    out = tmp_path_factory.mktemp("export") / "micro"
    done = run_script("scripts/export.py", "--run", str(checkpoint[0]), "--output", str(out))
    return out, done


def test_export_cli_writes_timm_hub_layout_that_timm_loads_strictly(checkpoint, exported):
    out, done = exported
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0
    assert config["model_args"]["depth"] == 2 and config["model_args"]["embed_dim"] == 128
    assert config["pretrained_cfg"]["mean"] == config["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]  # mpp.data.sources's
    x = torch.randn(3, 3, 16, 16)
    ours = checkpoint[1].forward_features(x)["pre_logits"]
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm loads strictly by default
    by_file = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    with torch.no_grad():
        for model in (by_dir, by_file):
            torch.testing.assert_close(pre_logits_timm(model, x), ours, atol=1e-5, rtol=0)


def test_export_refusals_are_one_line(checkpoint, exported, tmp_path, monkeypatch):
    out, _ = exported
    before = (out / "model.safetensors").read_bytes()
    again = run_script("scripts/export.py", "--run", str(checkpoint[0]), "--output", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert (out / "model.safetensors").read_bytes() == before
    run = tmp_path / "run"  # one of our runs: --overwrite would replace its own config.json
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"train": {"lr": 0.1}}')
    into_run = run_script("scripts/export.py", "--run", str(checkpoint[0]), "--output", str(run), "--overwrite")
    assert into_run.returncode == 2 and into_run.stderr.count("\n") == 1 and "is a run directory" in into_run.stderr
    assert (run / "config.json").read_text() == '{"train": {"lr": 0.1}}' and not (run / "model.safetensors").exists()
    missing = run_script("scripts/export.py", "--run", str(tmp_path / "nope"), "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pushed = run_script("scripts/export.py", "--run", str(checkpoint[0]), "--output", str(tmp_path / "p"),
                        "--push-to-hub", "someone/mpp-micro")
    assert pushed.returncode == 2 and pushed.stderr.count("\n") == 1 and "local export is written" in pushed.stderr
    assert (tmp_path / "p" / "model.safetensors").is_file()


def test_import_folder_and_state_dict_equal_ours(checkpoint, exported, tmp_path):
    vit = checkpoint[1]
    x = torch.randn(2, 3, 16, 16)
    imported = timm_io.load_source(str(exported[0]))
    assert imported.vit.config == vit.config and imported.record()["name"] == "micro"
    torch.testing.assert_close(imported.vit.forward_features(x)["tokens"], vit.forward_features(x)["tokens"])
    # A timm model saved as a bare state dict (.pth, read weights-only), with its classifier head.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    imported = timm_io.load_source(str(tmp_path / "tiny.pth"))
    assert (imported.vit.config.num_heads, imported.vit.config.num_classes) == (3, 1000)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(imported.vit(x), model(x), atol=1e-5, rtol=0)


def test_a_timm_models_own_normalisation_is_folded_into_its_patch_embedding(tmp_path):
    """A model trained on ImageNet's mean and std, fed mpp.data.sources's normalisation by our probes, computes
    what timm computes on its own input; saved in timm's Hub layout, the folder says the same."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import save_for_hf

    from mpp.data.sources import normalize

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              pretrained_cfg_overlay=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)).eval()
    save_for_hf(model, tmp_path / "inet")
    pixels = torch.rand(2, 3, 32, 32)  # [B, 3, H, W] in [0, 1]
    theirs_input = (pixels - torch.tensor(IMAGENET_DEFAULT_MEAN).view(-1, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD).view(-1, 1, 1)
    with torch.no_grad():
        expected = model(theirs_input)  # [B, 1000]
        for imported in (timm_io.from_timm(model, "inet", "inet", None), timm_io.load_source(str(tmp_path / "inet"))):
            assert imported.mean == IMAGENET_DEFAULT_MEAN and imported.std == IMAGENET_DEFAULT_STD
            torch.testing.assert_close(imported.vit(normalize(pixels)), expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(imported.vit(theirs_input), expected, atol=1e-3)  # the fold did something


@pytest.mark.parametrize("variant, named", [(dict(reg_tokens=4), "register tokens"),
                                            (dict(class_token=False, global_pool="avg"), "no class token"),
                                            (dict(init_values=1e-5), "ls1.gamma")])
def test_unrepresentable_timm_vits_are_refused_naming_what_differs(variant, named):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, **variant)
    with pytest.raises(UsageError, match=named):
        timm_io.from_timm(model, "variant", "variant", None)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UsageError, match="safe state dict"):
        timm_io.load_source(str(tmp_path / "evil.pth"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(UsageError, match="no plain timm ViT"):
        timm_io.load_source(str(tmp_path / "other.bin"))
    # Through the command line a legacy (not zip) pickle stays one line: torch's protocol warning held back.
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"x": Evil()}, protocol=4))
    done = run_script("eval/fewshot.py", "--run", str(tmp_path / "legacy.pth"), "--output", str(tmp_path / "f.json"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "safe state dict" in lines[0] and "ran" not in done.stdout


def test_fewshot_on_a_timm_model_equals_the_same_weights_as_our_run(checkpoint, tmp_path, monkeypatch):
    """eval/fewshot.py (subprocess) on a timm state dict scores what it scores on our checkpoint of the same weights."""
    path, vit = checkpoint
    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                                   embed_dim=128, depth=2, num_heads=4)
    timm_model.load_state_dict(vit.state_dict(), strict=True)
    from safetensors.torch import save_file

    save_file(timm_model.state_dict(), tmp_path / "micro.safetensors")
    done = run_script("eval/fewshot.py", "--run", str(tmp_path / "micro.safetensors"), *FEWSHOT,
                      "--output", str(tmp_path / "timm-micro" / "fewshot.json"))
    assert done.returncode == 0, done.stderr
    theirs = json.loads((tmp_path / "timm-micro" / "fewshot.json").read_text())
    ours = fewshot.main(["--run", str(path), *FEWSHOT, "--output", str(tmp_path / "ours.json")])
    assert theirs["results"] == ours["results"]
    assert theirs["imported"]["name"] == "micro.safetensors" and theirs["imported"]["mean"] == [0.5, 0.5, 0.5]
    # eval/compare.py puts the folder holding its report in the table, labelled by the import.
    table = compare.main([str(tmp_path / "timm-micro"), "--output", str(tmp_path / "cmp")])
    assert "| timm-micro | timm (micro.safetensors) |" in table["markdown"]
    assert "timm (micro.safetensors)" in (tmp_path / "cmp" / "compare.md").read_text()
    # No run directory to write beside, and a Hub name offline: one line each.
    no_output = run_script("eval/fewshot.py", "--run", str(tmp_path / "micro.safetensors"), *FEWSHOT)
    assert no_output.returncode == 2 and "--output" in no_output.stderr and no_output.stderr.count("\n") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = run_script("eval/fewshot.py", "--run", "timm:vit_tiny_patch16_224.augreg_in21k", *FEWSHOT,
                         "--output", str(tmp_path / "hub.json"))
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1 and "go online" in offline.stderr


def test_finetune_starts_from_a_timm_model_identified_by_its_weights(checkpoint, exported, tmp_path):
    """The fine-tune's start (mpp.train.finetune_start) from an exported folder and from the same weights as a
    state dict: the same ViT, the same identity (so a --resume may name either), the import's record."""
    from safetensors.torch import save_file

    from mpp.train.finetune import FinetuneConfig
    from mpp.train.finetune_start import starting_model

    save_file(checkpoint[1].state_dict(), tmp_path / "same.safetensors")
    vit, record, dataset, start = starting_model(FinetuneConfig(run=str(exported[0])))
    twin, _, _, twin_start = starting_model(FinetuneConfig(run=str(tmp_path / "same.safetensors")))
    assert dataset == "digits" and record["name"] == "micro" and start["init"] == "pretrained"
    assert start["sha256"] == twin_start["sha256"] and start["checkpoint"] == str(exported[0])
    for name, tensor in checkpoint[1].state_dict().items():
        assert torch.equal(vit.state_dict()[name], tensor) and torch.equal(twin.state_dict()[name], tensor)


def test_finetune_from_an_exported_folder_runs_through_the_command_line(exported, tmp_path):
    """The whole fine-tune protocol from a timm folder: it trains, scores, and records where it started."""
    out = tmp_path / "ft"
    done = run_script("eval/finetune.py", "--run", str(exported[0]), "--steps", "2", "--lrs", "0.01", "--seeds", "1",
                      "--batch-size", "16", "--warmup-steps", "1", "--num-workers", "0", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "finetune.json").read_text())
    assert results["pretrained"] == str(exported[0]) and results["start"]["checkpoint"] == str(exported[0])
    assert 0 <= results["test_accuracy"]["mean"] <= 1 and results["dataset"]["spec"] == "digits"
    from mpp.train.finetune_start import pretrained_source

    weights = exported[0] / "model.safetensors"  # a timm file names itself, not the folder holding it
    assert pretrained_source("timm:vit_tiny_patch16_224") == "timm:vit_tiny_patch16_224"
    assert pretrained_source(str(weights)) == str(weights) and pretrained_source("") is None


def test_the_hubs_retry_warnings_stay_out_of_the_one_line(monkeypatch, caplog):
    """Offline without HF_HUB_OFFLINE, huggingface_hub logs a warning per retried request before it
    raises (about 45 s of them); only the UsageError may reach the user."""
    import logging

    import timm

    from mpp.core.errors import UsageError
    from mpp.eval.timm_io import create

    def unreachable(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("'Connection refused' thrown while requesting HEAD")
        raise OSError("Connection refused")

    monkeypatch.setattr(timm, "create_model", unreachable)
    before = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(UsageError, match="go online"):
        create("vit_tiny_patch16_224", "timm model could not be loaded from the Hub", "go online")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert logging.getLogger("huggingface_hub").level == before  # restored


def visible_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but hidden ones (a killed export's leftovers), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def killed_export(fault: str, checkpoint: Path, output: Path, *flags: str) -> None:
    """scripts/export.py stopped at `fault` (tests/helpers/export_faults.py), then SIGKILLed there."""
    marker = output.parent / f"{fault}.marker"
    proc = subprocess.Popen([sys.executable, "tests/helpers/export_faults.py", fault, "--run", str(checkpoint),
                             "--output", str(output), *flags], cwd=REPO, env={**ENV, "FAULT_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the export never reached the fault"
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no cleanup of its own runs
        proc.wait()
        proc.stderr.close()
    marker.unlink()


@pytest.mark.slow
def test_an_export_killed_between_its_files_or_mid_write_leaves_the_previous_one_whole(checkpoint, exported,
                                                                                      tmp_path):
    """Killed at either moment, the folder is the previous export byte for byte (or, for a first export,
    absent); the next export cleans up what the kill left and succeeds, keeping the folder's other files."""
    exports = tmp_path / "exports"
    previous = exports / "micro"
    shutil.copytree(exported[0], previous)
    (previous / "README.md").write_text("model card\n")  # not the export's: --overwrite keeps it
    before = visible_files(exports)
    other = tmp_path / "other.pt"  # other weights, so that any byte of them in the folder shows
    torch.manual_seed(2)
    vit = ViT(checkpoint[1].config)
    torch.save({"config": {"vit": dataclasses.asdict(vit.config)}, "model": vit.state_dict(), "step": 3}, other)
    killed_export("between", other, previous, "--overwrite")
    killed_export("mid-write", other, exports / "fresh")
    assert visible_files(exports) == before and not (exports / "fresh").exists()
    assert {p.name.rsplit("-", 1)[0] for p in exports.glob(".*")} == {".micro.partial", ".fresh.partial"}
    assert not timm_io.is_timm_source(str(exports / "fresh"))
    again = run_script("scripts/export.py", "--run", str(checkpoint[0]), "--output", str(previous), "--overwrite")
    assert again.returncode == 0, again.stderr
    timm_io.export(checkpoint[1], exports / "fresh")
    assert visible_files(exports) == {**before, **{f"fresh/{k.split('/')[1]}": v for k, v in before.items()
                                                   if k.startswith("micro/") and k != "micro/README.md"}}
    assert not list(exports.glob(".*"))  # the leftovers are gone


def test_an_export_killed_between_its_renames_is_put_back(checkpoint, exported, tmp_path):
    """Killed after the previous export was moved aside and before the new one took its place: the
    next export puts the previous one back first (refused without --overwrite, replaced with it)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now
    output = tmp_path / "micro"
    shutil.copytree(exported[0], tmp_path / f".micro.replaced-{dead.pid}")
    before = visible_files(tmp_path / f".micro.replaced-{dead.pid}")
    with pytest.raises(UsageError, match="is not empty"):
        timm_io.export(checkpoint[1], output)
    assert visible_files(output) == before and not list(tmp_path.glob(".*"))
    vit = ViT(vit_config("Micro/4", depth=1, num_classes=0))
    timm_io.export(vit, output, overwrite=True)
    assert json.loads((output / "config.json").read_text())["model_args"]["depth"] == 1
    assert not list(tmp_path.glob(".*"))
