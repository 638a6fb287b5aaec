"""The few-shot probe inside pretraining (`--fewshot-every`): it logs the paper's probe along the run,
from step 0, scores what eval/fewshot.py scores, and never changes the training."""
import json

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.runs import read_metrics, run_script, threads_kept

from eval import fewshot
from mpp.run.checkpoint import load_checkpoint
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import TrainConfig, train

TINY = dict(max_steps=6, batch_size=32, num_workers=0, cpu_threads=2, warmup_steps=2, log_every=2, save_every=3)
SHOTS = (1, 5, 10, 25)


def tags(prefix: str, dataset: str) -> list[str]:
    return [f"{prefix}/{dataset}/{k}shot" for k in SHOTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step MPP run without and with the in-run probe (every 2 steps), the latter also
    evaluated (and its predictions drawn into TensorBoard) every 3 steps."""
    root = tmp_path_factory.mktemp("monitor")
    with threads_kept():
        plain = train(TrainConfig(output_dir=str(root / "plain"), **TINY))
        probed = train(TrainConfig(output_dir=str(root / "probed"), fewshot_every=2, eval_every=3, **TINY))
    return plain, probed


def test_the_probe_changes_no_weight_and_no_training_metric(runs):
    plain, probed = runs
    for a, b in zip(list_checkpoints(plain), list_checkpoints(probed), strict=True):
        sa, sb = load_checkpoint(a), load_checkpoint(b)
        for part in ("model", "objective"):
            assert sa[part].keys() == sb[part].keys()
            assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), f"{a.name}: {part} differs"
        assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(sa["rng"], sb["rng"], strict=True))
        exp_a, exp_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
        assert all(torch.equal(exp_a[i]["exp_avg_sq"], exp_b[i]["exp_avg_sq"]) for i in exp_a)

    def training(run):  # every logged training value, without the timing
        return [{k: v for k, v in m.items() if k != "train/images_per_s"}
                for m in read_metrics(run) if "train/loss" in m]

    assert training(plain) == training(probed) and len(training(plain)) == 3
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (plain, probed)]
    assert summaries[0]["eval"] == summaries[1]["eval"]


def test_the_curve_starts_at_step_0_and_matches_eval_fewshot(runs, tmp_path):
    _, probed = runs
    points = {m["step"]: m for m in read_metrics(probed) if "fewshot/digits/1shot" in m}
    assert sorted(points) == [0, 2, 4, 6]
    for m in points.values():
        assert set(tags("fewshot", "digits") + tags("fewshot_avg", "digits")) <= set(m)
        assert all(0 <= m[t] <= 1 for t in tags("fewshot", "digits")) and m["fewshot/seconds"] > 0
    # Step 0 is the untrained model: eval/fewshot.py's random init of the run (its seed), same draws.
    untrained = fewshot.main(["--run", str(probed), "--random-init", "--no-references", "--output",
                              str(tmp_path / "r.json"), "--num-workers", "0"])
    assert [points[0][t] for t in tags("fewshot", "digits")] == [untrained["results"][str(k)]["mean"] for k in SHOTS]
    # The last point is the final checkpoint, as eval/fewshot.py scores it (class token and mean patch token).
    for features, prefix in (("token", "fewshot"), ("avg", "fewshot_avg")):
        final = fewshot.main(["--run", str(probed), "--no-references", "--features", features, "--output",
                              str(tmp_path / f"{features}.json"), "--num-workers", "0"])
        assert [points[6][t] for t in tags(prefix, "digits")] == [final["results"][str(k)]["mean"] for k in SHOTS]
    assert points[6]["fewshot/digits/25shot"] != points[0]["fewshot/digits/25shot"]  # the curve moves


def test_the_curve_is_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, probed = runs
    found = {}
    # The run's own events (eval/fewshot.py writes its points, under the same tags, to tensorboard/fewshot/).
    for path in (p for p in (probed / "tensorboard").rglob("events.*") if p.parent.name != "fewshot"):
        acc = EventAccumulator(str(path)).Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    assert sorted(found["fewshot/digits/5shot"]) == [0, 2, 4, 6], found.keys()
    images = {}
    for path in (probed / "tensorboard").rglob("events.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0}).Reload()
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    assert images == {"mpp/predictions": [3, 6]}  # MPP's predictions at each evaluation


def image_folder(root, per_class: int = 30, test_per_class: int = 6, classes: int = 3):
    """root/{train,test}/c<k>/<i>.png: each class a different mean colour plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_transfer_set_and_the_image_cap(tmp_path):
    folder = image_folder(tmp_path / "tiles")
    done = run_script("scripts/pretrain_supervised.py", "--max-steps", "2", "--batch-size", "32", "--num-workers", "0",
                      "--warmup-steps", "1", "--fewshot-every", "2", "--fewshot-dataset", str(folder),
                      "--fewshot-max-images", "50", "--output-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("digits: 861 train + 50 test images (held in memory); tiles: 90 train + 18 test images (held in memory)"
            in done.stdout + done.stderr)
    points = [m for m in read_metrics(tmp_path / "run") if "fewshot/tiles/1shot" in m]
    assert [m["step"] for m in points] == [0, 2]
    assert all(set(tags("fewshot", "digits")) <= set(m) for m in points)
    # A supervised run's step 0 is its random init as eval/fewshot.py builds it (head included), and
    # --fewshot-max-images 50 is the same fixed subset as --max-test 50.
    untrained = fewshot.main(["--run", str(tmp_path / "run"), "--random-init", "--no-references", "--max-test", "50",
                              "--output", str(tmp_path / "r.json"), "--num-workers", "0"])
    assert [points[0][t] for t in tags("fewshot", "digits")] == [untrained["results"][str(k)]["mean"] for k in SHOTS]
    referenced = fewshot.main(["--run", str(tmp_path / "run"), "--max-test", "50", "--output", str(tmp_path / "t.json"),
                               "--num-workers", "0"])
    assert referenced["references"]["random_init"]["results"] == untrained["results"]


@pytest.mark.parametrize("extra, message", [
    (["--fewshot-dataset", "digits"], "names a dataset whose short name (digits) repeats the run's"),
    (["--streaming"], "--fewshot-every draws images by index, which a stream cannot serve: pass --fewshot-dataset"),
    (["--fewshot-max-images", "nan"], "--fewshot-max-images 'nan' is not a whole number"),
    (["--fewshot-every", "0", "--fewshot-dataset", "x"], "--fewshot-dataset x probes nothing without --fewshot-every"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, extra, message):
    from mpp.train.pretrain import main

    argv = ["--max-steps", "2", "--num-workers", "0", "--fewshot-every", "2", *extra,
            "--output-dir", str(tmp_path / "run")]
    if extra[0] == "--streaming":  # once through the real command line
        done = run_script("scripts/pretrain_mpp.py", *argv)
        code, err = done.returncode, done.stderr
    else:
        with pytest.raises(SystemExit) as stopped:
            main("mpp", argv)
        code, err = stopped.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # refused before anything is written


def test_a_resume_may_add_the_probe(tmp_path):
    run = tmp_path / "run"
    with threads_kept():
        train(TrainConfig(output_dir=str(run), **{**TINY, "max_steps": 4, "save_every": 4}))
        train(TrainConfig(output_dir=str(run), resume=True, fewshot_every=3, **{**TINY, "save_every": 4}))
    assert [m["step"] for m in read_metrics(run) if "fewshot/digits/1shot" in m] == [6]  # no step 0 on a resume


def test_images_too_large_to_hold_are_read_again_with_the_same_result(monkeypatch):
    from mpp.eval import fewshot_monitor
    from mpp.model.vit import ViT, vit_config

    torch.manual_seed(0)
    vit = ViT(vit_config("Micro/4"))
    held = fewshot_monitor.FewshotMonitor(["digits"], 16, 100)
    monkeypatch.setattr(fewshot_monitor, "CACHE_BYTES", 0)
    read = fewshot_monitor.FewshotMonitor(["digits"], 16, 100)
    assert held.sets[0].cached and not read.sets[0].cached and "held in memory" not in read.cost()
    state = torch.get_rng_state()
    assert held(vit, "cpu") == read(vit, "cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves the global generator where it was


def test_a_class_too_small_for_25_shots_is_one_line(tmp_path):
    folder = image_folder(tmp_path / "few", per_class=10)
    done = run_script("scripts/pretrain_mpp.py", "--max-steps", "2", "--num-workers", "0", "--fewshot-every", "2",
                      "--fewshot-dataset", str(folder), "--output-dir", str(tmp_path / "run"))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("error: the in-run few-shot probe of ") and "needs 25" in last
    assert "drop --fewshot-every" in last and "Traceback" not in done.stderr


def test_the_in_run_knn_scores_the_draws_union_against_the_same_test_images(runs):
    """k-NN beside few-shot, from the same features: the draws' union is its training set."""
    from mpp.eval.features import extract_feature_sets, headline_spec, vit_featurizer
    from mpp.eval.fewshot_monitor import FewshotMonitor
    from mpp.eval.probes import knn_probe_grid
    from mpp.model.vit import ViT, ViTConfig

    _, probed = runs
    points = {m["step"]: m for m in read_metrics(probed) if "knn/digits/20nn" in m}
    assert sorted(points) == [0, 2, 4, 6]
    knn_tags = [f"{p}/digits/{k}nn" for p in ("knn", "knn_avg") for k in (10, 20)]
    assert all(0 <= m[t] <= 1 for m in points.values() for t in knn_tags)
    state = load_checkpoint(list_checkpoints(probed)[-1])  # step 6
    vit = ViT(ViTConfig(**state["config"]["vit"]))
    vit.load_state_dict(state["model"])
    probe = FewshotMonitor(["digits"], vit.config.image_size, 2000).sets[0]
    assert probe.cached and len(probe.train) == len(probe.draws.union) < 1437  # the union, not the whole split
    specs = [headline_spec(vit.config.depth, "token"), headline_spec(vit.config.depth, "avg")]
    train_x, train_y = extract_feature_sets(vit_featurizer(vit, specs), vit, probe.train, progress=False)
    test_x, test_y = extract_feature_sets(vit_featurizer(vit, specs), vit, probe.test, progress=False)
    for spec, prefix in zip(specs, ("knn", "knn_avg"), strict=True):
        found = knn_probe_grid(train_x[spec.name], train_y, test_x[spec.name], test_y, (10, 20), 0.07, 10)
        assert [points[6][f"{prefix}/digits/{k}nn"] for k in (10, 20)] == [found[10], found[20]]
