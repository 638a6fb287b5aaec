"""Every block's features from one forward pass (`--layers`), and the two references every probe
table carries (a random init of the same architecture, the raw pixels)."""
import json

import pytest
import torch
from helpers.runs import run_script

from eval import fewshot, linear_probe
from mpp.core.errors import UsageError
from mpp.eval.features import FeatureSpec, layer_specs, pixel_featurizer, vit_featurizer
from mpp.model.vit import ViT, vit_config


def test_layer_specs():
    every = layer_specs(6, ["all"])
    assert len(every) == 6 * 4 and every[0] == FeatureSpec(1, "token", False) and every[-1].name == "6/avg+norm"
    assert [s.name for s in layer_specs(6, ["-1"])] == ["6/token", "6/token+norm", "6/avg", "6/avg+norm"]
    assert {s.layer for s in layer_specs(6, ["3", "-6", "3"])} == {1, 3}
    assert layer_specs(6, None) == []
    for bad, message in ((["0"], "outside the model's 6 blocks"), (["7"], "outside"), (["-7"], "outside"),
                         (["x"], "is not a block number"), (["all", "3"], "'all' stands alone")):
        with pytest.raises(UsageError, match=message):
            layer_specs(6, bad)


def test_every_feature_is_the_block_output_it_names():
    torch.manual_seed(0)
    vit = ViT(vit_config("Micro/4")).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        found = vit_featurizer(vit, layer_specs(6, ["all"]))(images)
        blocks = vit.forward_blocks(images)  # [(B, N+1, D)] × 6
        full = vit.forward_features(images)
    assert torch.equal(found["6/token+norm"], full["pre_logits"])  # the paper's feature, as before
    assert torch.equal(found["6/avg+norm"], full["tokens"][:, 1:].mean(1))  # --features avg
    assert torch.equal(found["2/token"], blocks[1][:, 0]) and torch.equal(found["4/avg"], blocks[3][:, 1:].mean(1))
    assert torch.equal(found["3/token+norm"], vit.norm(blocks[2])[:, 0])
    assert pixel_featurizer(16)(images)["pixels"].shape == (3, 3 * 16 * 16)
    assert pixel_featurizer(64)(torch.randn(2, 3, 64, 64))["pixels"].shape == (2, 3 * 32 * 32)  # capped at 32×32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("layers") / "run"
    done = run_script("scripts/pretrain_mpp.py", "--max-steps", "4", "--batch-size", "32", "--num-workers", "0",
                      "--warmup-steps", "1", "--output-dir", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def test_fewshot_layers_and_references(run, capsys):
    report = fewshot.main(["--run", str(run), "--layers", "all", "--shots", "1", "5", "--seeds", "2",
                           "--max-test", "120", "--num-workers", "0"])
    assert json.loads((run / "fewshot.json").read_text()) == json.loads(json.dumps(report))
    layers = report["layers"]
    assert len(layers["features"]) == 24 and [s["name"] for s in layers["specs"]] == layers["features"]
    assert layers["results"]["6/token+norm"] == report["results"]  # the headline is the sweep's last block
    assert set(report["references"]) == {"random_init", "pixels"}
    assert layers["random_init"]["6/token+norm"] == report["references"]["random_init"]["results"]
    assert report["references"]["pixels"]["feature_dim"] == 768 and report["reference_seed"] == 0
    # The references are what --random-init alone scores, on the same draws and test images.
    alone = fewshot.main(["--run", str(run), "--random-init", "--no-references", "--shots", "1", "5", "--seeds", "2",
                          "--max-test", "120", "--num-workers", "0", "--output", str(run / "alone.json")])
    assert alone["results"] == report["references"]["random_init"]["results"] and "references" not in alone
    out = capsys.readouterr().out
    assert "random init |" in out and "raw pixels |" in out and "by block (5-shot, %)" in out and "best: block" in out


def test_linear_probe_layers(run):
    report = linear_probe.main(["--run", str(run), "--layers", "2", "-1", "--max-train", "300", "--max-test", "100",
                                "--num-workers", "0", "--no-references"])
    assert "references" not in report and "random_init" not in report["layers"]
    assert report["layers"]["features"][0] == "2/token" and len(report["layers"]["features"]) == 8
    assert report["layers"]["results"]["6/token+norm"]["accuracy"] == report["accuracy"]


def test_a_block_the_model_lacks_is_one_line(run):
    before = (run / "fewshot.json").read_bytes() if (run / "fewshot.json").exists() else None
    done = run_script("eval/fewshot.py", "--run", str(run), "--layers", "9")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --layers 9 is outside"), \
        done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert ((run / "fewshot.json").read_bytes() if (run / "fewshot.json").exists() else None) == before
