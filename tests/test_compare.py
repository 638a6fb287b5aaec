"""eval/compare.py: the table, the plots, TensorBoard, and bad input, on hand-written runs and one real tiny run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import run_script, threads_kept
from PIL import Image

from eval.compare import main
from mpp.report.comparison import compare
from mpp.report.curves import read_curves
from mpp.report.plots import curve_panels, mosaic
from mpp.report.posembed import pos_embed_similarity
from mpp.report.reports import Row
from mpp.run.checkpoint import save_checkpoint

# Micro/4 at 16 px: the architecture the real tiny run trains, so its random-init row and the
# hand-written runs' are the same baseline.
MICRO = {"image_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 128, "depth": 6, "num_heads": 4,
         "mlp_dim": 512, "num_classes": 0, "dropout": 0.0, "attn_dropout": 0.0, "ln_eps": 1e-6}
DASH = "–"


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def config(objective: str, **sections) -> dict:
    return {"train": {"objective": objective, "dataset": "digits", "model": "Micro/4", "image_size": 0, "seed": 0},
            "vit": {**MICRO, "num_classes": 0 if objective == "mpp" else 10}, **sections}


def fewshot(spec: str, results: dict[int, tuple[float, float]], init: str = "trained", step: int = 0) -> dict:
    """A report shaped as eval/fewshot.py writes it (only the fields compare reads, plus a few)."""
    return {"init": init, "step": step, "run_config": {"objective": "mpp", "model": "Micro/4"}, "vit": MICRO,
            "dataset": {"spec": spec, "image_size": 16}, "shots": list(results), "seeds": [0, 1],
            "results": {str(k): {"shots": k, "mean": m, "std": s, "per_seed": [m - s, m + s]}
                        for k, (m, s) in results.items()}}


def finetune(spec: str, mean: float, std: float, lr: float, init: str = "pretrained") -> dict:
    return {"pretrained": None if init == "scratch" else "runs/x/mpp", "init": init,
            "dataset": {"spec": spec, "train_size": 1437, "dev_size": 100, "test_size": 360}, "lr": lr,
            "grid": {str(lr): {"dev_accuracy": mean}}, "test_accuracy": {"mean": mean, "std": std,
                                                                          "per_seed": [mean]},
            "seeds": [0], "steps": 300, "wall_time_s": 60.0}


def one_hot_pos_embed() -> torch.Tensor:
    """[1, 17, 16]: patch p's embedding is e_p, so patches are only similar to themselves; the class
    token's is large and similar to every patch, so a plot that kept it would show it."""
    pos = torch.zeros(1, 17, 16)
    pos[0, 0] = 5.0
    pos[0, 1:] = torch.eye(16)
    return pos


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three hand-written run directories under one root: an MPP run with every kind of result, a
    supervised run with TensorBoard events, and a from-scratch fine-tune."""
    root = tmp_path_factory.mktemp("compare") / "runs"
    mpp = root / "mpp"
    mpp_cfg = config("mpp", mpp={"target": "mean_color", "corrupt_rate": 0.5})
    write(mpp / "config.json", mpp_cfg)
    write(mpp / "summary.json", {"objective": "mpp", "steps": 1500, "wall_time_s": 376.0, "eval": {}, "last_train": {}})
    write(mpp / "fewshot.json", fewshot("digits", {1: (0.2778, 0.0068), 5: (0.483, 0.022)}, step=1500))
    write(mpp / "fewshot-random-init.json", fewshot("digits", {1: (0.137, 0.021), 5: (0.275, 0.016)}, "random"))
    write(mpp / "fewshot-imagenette.json", fewshot("/data/imagenette/", {1: (0.15, 0.01), 10: (0.3, 0.02)}, step=1500))
    write(mpp / "linear-probe.json", {"init": "trained", "dataset": {"spec": "digits"}, "feature_dim": 128,
                                      "l2": 1.0, "accuracy": 0.71, "dev_accuracy": {"1.0": 0.7}})
    write(mpp / "linear-probe-random-init.json", {"init": "random", "dataset": {"spec": "digits"}, "accuracy": 0.35})
    # Probes of the mean patch token (--features avg) stay out of the table, which compares class tokens.
    write(mpp / "fewshot-avg.json",
          {**fewshot("digits", {1: (0.99, 0.0), 5: (0.99, 0.0)}, step=1500), "features": "avg"})
    write(mpp / "linear-probe-avg.json", {"init": "trained", "dataset": {"spec": "digits"}, "accuracy": 0.99,
                                          "features": "avg"})
    write(mpp / "finetune-cifar" / "finetune.json", finetune("hf:cifar10", 0.5, 0.0, 1e-4))
    write(mpp / "finetune-digits" / "finetune.json", finetune("digits", 0.9, 0.01, 1e-3))
    write(mpp / "metrics.jsonl", '{"step": 1, "train/loss": 6.0}\n{"step": 2, "train/loss": 5.0}\n{"step": 3, "tr')
    save_checkpoint(mpp, 5, {"config": mpp_cfg, "model": {"pos_embed": one_hot_pos_embed()}, "step": 5,
                             "rng": np.random.get_state()})  # numpy inside: weights_only refuses it

    sup = root / "sup"
    write(sup / "config.json", config("supervised"))
    write(sup / "summary.json", {"objective": "supervised", "steps": 200, "wall_time_s": 7300.0})
    write(sup / "fewshot.json", fewshot("digits", {1: (0.4, 0.01), 5: (0.6, 0.02), 25: (0.8, 0.005)}, step=100))
    # one row, not the same numbers
    write(sup / "fewshot-random-init.json", fewshot("digits", {1: (0.9, 0.0)}, "random"))
    write(sup / "metrics.jsonl", '{"step": 1, "train/loss": 9.0}\n')  # TensorBoard comes first
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(sup / "tensorboard")) as tb:
        for step, loss in [(1, 2.0), (2, 1.5)]:
            tb.add_scalar("train/loss", loss, step)
            tb.add_scalar("train/lr", 0.1, step)  # not a curve compare draws
        tb.add_scalar("eval/accuracy", 0.4, 2)

    scratch = root / "scratch"
    write(scratch / "config.json", {"train": {"objective": "finetune", "dataset": "digits", "model": "Micro/4"},
                                    "vit": MICRO, "finetune": {"pretrained": None}})
    write(scratch / "finetune.json", finetune("digits", 0.55, 0.02, 3e-4, init="scratch"))
    for training, loss in [("grid-lr0.001", 7.0), ("seed0", 3.0)]:  # eval/finetune.py: a folder per training
        with SummaryWriter(str(scratch / "tensorboard" / training)) as tb:
            tb.add_scalar("train/loss", loss, 10)
    return root


@pytest.fixture(scope="module")
def compared(runs) -> dict:
    return compare([runs / "mpp", runs / "sup", runs / "scratch"])  # default output: runs/compare


def rows_by_name(table: dict) -> dict[str, dict[str, str]]:
    return {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["rows"]}


def check_png(path: Path, min_size=(200, 150)) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        low, high = image.convert("L").getextrema()
        assert high - low > 50  # something is drawn, not a blank canvas
        return image.size


def test_main_table_rows(compared, runs):
    main_table = compared["tables"][0]
    assert main_table["title"] == "Runs (few-shot on digits)"
    assert main_table["columns"] == ["run", "objective", "data", "1-shot", "5-shot", "25-shot", "linear probe (digits)",
                                     "fine-tune (digits)", "steps", "wall time"]
    rows = rows_by_name(main_table)
    assert list(rows) == ["mpp", "sup", "scratch", "random init (Micro/4, 16 px)"]
    assert rows["mpp"] == {"run": "mpp", "objective": "mpp (mean_color, 50%)", "data": "digits",
                           "1-shot": "27.8 ± 0.7", "5-shot": "48.3 ± 2.2", "25-shot": DASH,
                           "linear probe (digits)": "71.0", "fine-tune (digits)": "90.0 ± 1.0, lr 0.001",
                           "steps": "1,500", "wall time": "6.3 min"}
    assert rows["sup"]["objective"] == "supervised" and rows["sup"]["25-shot"] == "80.0 ± 0.5"
    assert rows["sup"]["linear probe (digits)"] == DASH and rows["sup"]["fine-tune (digits)"] == DASH
    assert rows["sup"]["wall time"] == "2.0 h"
    # A fine-tune directory: its own result, steps and time come from finetune.json.
    assert rows["scratch"]["objective"] == "finetune (scratch)"
    assert rows["scratch"]["fine-tune (digits)"] == "55.0 ± 2.0, lr 0.0003"
    assert (rows["scratch"]["1-shot"], rows["scratch"]["steps"], rows["scratch"]["wall time"]) == (DASH, "300", "60 s")
    # The random-init baseline is shown once for both runs, with the first run's numbers.
    assert rows["random init (Micro/4, 16 px)"]["1-shot"] == "13.7 ± 2.1"
    assert rows["random init (Micro/4, 16 px)"]["linear probe (digits)"] == "35.0"
    assert len(compared["random_init"]) == 1 and compared["random_init"][0]["sources"] == ["mpp", "sup"]


def test_markdown_json_and_notes(compared, runs, capsys):
    output = runs / "compare"
    markdown = (output / "compare.md").read_text()
    assert markdown == compared["markdown"]
    assert "| mpp | mpp (mean_color, 50%) | digits | 27.8 ± 0.7 | 48.3 ± 2.2 | – | 71.0 |" in markdown
    saved = json.loads((output / "compare.json").read_text())
    assert saved["tables"] == compared["tables"] and saved["main_dataset"] == "digits"
    assert saved["runs"][0]["fewshot"]["digits"]["results"]["1"] == {"mean": 0.2778, "std": 0.0068}
    notes = "\n".join(compared["notes"])
    assert "mpp: 2 fine-tune results (finetune-cifar/finetune.json, finetune-digits/finetune.json); " \
           "shown: finetune-digits/finetune.json (it is on the run's data)" in notes
    assert "random init (Micro/4, 16 px), few-shot on digits: shown once, from mpp/fewshot-random-init.json " \
           "(the first run's, a random-init report before references); " \
           "other numbers (another draw) in sup/fewshot-random-init.json" in notes  # one architecture, two draws
    assert "sup: fewshot.json evaluated the step-100 checkpoint of 200 steps" in notes
    assert "Notes:" in markdown and "shown once" in markdown


def test_fewshot_on_a_second_dataset_gets_its_own_table_and_panel(compared):
    assert [t["title"] for t in compared["tables"]] == ["Runs (few-shot on digits)", "Few-shot on imagenette"]
    transfer = compared["tables"][1]
    assert transfer["columns"] == ["run", "objective", "1-shot", "10-shot"]
    assert transfer["rows"] == [["mpp", "mpp (mean_color, 50%)", "15.0 ± 1.0", "30.0 ± 2.0"]]
    assert compared["plots"]["fewshot"] == {"file": "fewshot.png", "panels": ["digits", "imagenette"]}
    width, _ = check_png(Path(compared["output"]) / "fewshot.png")
    assert width >= 2 * 400  # two panels side by side


def test_curves_come_from_tensorboard_events(compared, runs):
    source, curves = read_curves(runs / "sup")
    assert source == "tensorboard"
    assert curves == {"train/loss": [(1, 2.0), (2, 1.5)], "eval/accuracy": [(2, pytest.approx(0.4))]}
    source, curves = read_curves(runs / "mpp")  # no events: metrics.jsonl, its torn last line skipped
    assert source == "metrics.jsonl" and curves == {"train/loss": [(1, 6.0), (2, 5.0)]}
    assert read_curves(runs / "scratch") == ("tensorboard/seed0", {"train/loss": [(10, 3.0)]})  # the final training
    plots = compared["plots"]["curves"]
    assert plots["sources"] == {"mpp": "metrics.jsonl", "sup": "tensorboard", "scratch": "tensorboard/seed0"}
    assert plots["panels"] == 3  # train/loss per loss scale (mpp mean_color, supervised, finetune); eval/accuracy
    check_png(Path(compared["output"]) / "curves.png")  # is one final point, already in the table: no panel


def test_an_eval_tag_gets_a_panel_once_some_run_logged_it_more_than_once():
    runs = [Row("a", loss_scale="supervised"), Row("b", loss_scale="supervised")]
    once = {"a": {"train/loss": [(1, 2.0)], "eval/accuracy": [(1, 0.3)]}, "b": {"eval/accuracy": [(1, 0.4)]}}
    assert curve_panels(runs, once) == [("train/loss", "supervised")]  # a one-point train/loss still shows
    twice = {**once, "b": {"eval/accuracy": [(1, 0.4), (2, 0.5)]}}
    assert curve_panels(runs, twice) == [("train/loss", "supervised"), ("eval/accuracy", "supervised")]


def test_pos_embed_similarity_math():
    sim = pos_embed_similarity(one_hot_pos_embed(), (4, 4))
    assert sim.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(sim.reshape(16, 16), np.eye(16))  # the class token's embedding is left out
    pos = torch.randn(1, 1 + 6, 8)  # a 2×3 grid, any D
    expected = torch.nn.functional.cosine_similarity(pos[0, 1:, None], pos[0, None, 1:], dim=-1)
    np.testing.assert_allclose(pos_embed_similarity(pos, (2, 3)).reshape(6, 6), expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(pos_embed_similarity(pos[0, 1:].bfloat16(), (2, 3)).shape, (2, 3, 2, 3))
    with pytest.raises(ValueError, match="4×4"):
        pos_embed_similarity(pos, (4, 4))


def test_mosaic_tiles():
    sim = np.arange(2 * 3 * 2 * 3, dtype=float).reshape(2, 3, 2, 3)
    image = mosaic(sim)
    assert image.shape == (2 * 3 - 1, 3 * 4 - 1)
    np.testing.assert_array_equal(image[3:5, 4:7], sim[1, 1])  # tile (1, 1) after one gap row and column
    assert np.isnan(image[2]).all() and np.isnan(image[:, 3]).all()


def test_pos_embed_figure_from_the_checkpoint(compared, runs):
    found = compared["plots"]["pos_embed"]
    assert list(found) == ["mpp"]  # the other runs have no checkpoint
    assert found["mpp"]["checkpoint"] == str(runs / "mpp" / "checkpoints" / "ckpt-00000005.pt")
    assert found["mpp"]["step"] == 5 and found["mpp"]["grid"] == [4, 4]
    check_png(Path(compared["output"]) / "pos_embed-mpp.png")


def test_tensorboard_text_and_command(compared, runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(compared["output"]) / "tensorboard"
    acc = EventAccumulator(str(folder)).Reload()
    (tag,) = acc.Tags()["tensors"]
    assert tag.startswith("compare")
    assert acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() == compared["markdown"]
    assert compared["tensorboard"]["logdir"] == str(runs.resolve())
    assert compared["tensorboard"]["command"].startswith("tensorboard --logdir ")
    assert compared["tensorboard"]["command"].endswith(str(runs.resolve()).removeprefix(str(Path.cwd()) + "/"))


def test_rerun_with_names_replaces_the_tensorboard_text_and_skips_the_output_folder(compared, runs, tmp_path):
    again = compare([runs / "sup", runs / "compare"], tmp_path / "out")  # `runs/*` includes the last output
    assert [r["name"] for r in again["runs"]] == ["sup"]
    assert "skipped " + str(runs / "compare") + ": a comparison's output, not a run" in again["notes"]
    assert "--logdir_spec runs:" in again["tensorboard"]["command"]  # the output is not below the runs
    named = compare([runs / "sup"], tmp_path / "out", names=["baseline"])
    assert rows_by_name(named["tables"][0])["baseline"]["objective"] == "supervised"
    assert len(list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_clashing_directory_names_become_paths(tmp_path):
    for parent in ("a", "b"):
        write(tmp_path / parent / "mpp" / "config.json", config("mpp"))
    report = compare([tmp_path / "a" / "mpp", tmp_path / "b" / "mpp"], tmp_path / "out")
    assert [r["name"] for r in report["runs"]] == ["a/mpp", "b/mpp"]
    assert report["plots"] == {  # no files
        "fewshot": None, "layers": None, "curves": None, "fewshot_curves": None, "pos_embed": {}}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.json", "compare.md", "tensorboard"]
    assert "–" in report["tables"][0]["rows"][0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds nothing to compare: expected config.json or a result"),
    ("unwritable", "cannot write to output directory"),
    ("names", "--names has 1 name(s) for 2 run(s)"),
    ("bad-json", "cannot read"),
    ("twice", "is given twice"),
])
def test_usage_errors(case, message, tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "config.json", config("mpp"))
    argv = [str(run), "--output", str(tmp_path / "out")]
    if case == "missing":
        argv[0] = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv = [str(run), str(tmp_path / "empty")]
    elif case == "unwritable":
        write(tmp_path / "file", "x")
        argv = [str(run), "--output", str(tmp_path / "file" / "out")]  # below a file: root can't write there either
    elif case == "names":
        argv = [str(run), str(run.parent), "--names", "a"]
        write(tmp_path / "fewshot.json", fewshot("digits", {1: (0.5, 0.0)}))
    elif case == "bad-json":
        write(run / "fewshot.json", '{"results": ')
    elif case == "twice":
        argv = [str(run), str(run / ".." / "run"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert message in err
    if case in ("missing", "empty"):
        assert str(tmp_path / ("nope" if case == "missing" else "empty")) in err


def test_script_error_is_one_line(tmp_path):
    done = run_script("eval/compare.py", str(tmp_path / "nope"), timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error:") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and str(tmp_path / "nope") in done.stderr


@pytest.mark.slow
def test_real_tiny_run_end_to_end(runs, tmp_path):
    """A real 3-step MPP run, few-shot evaluated (every block, with the references) and with its random-init
    baseline, compared through the CLI with the hand-written supervised run of the same architecture."""
    from eval import fewshot
    from mpp.train.pretrain import main as pretrain

    real = runs.parent / "real" / "mpp"
    # The run and its probes in this process (their command lines have subprocess tests of their own);
    # the comparison through the CLI.
    with threads_kept():
        pretrain("mpp", ["--max-steps", "3", "--batch-size", "32", "--save-every", "3", "--log-every", "1",
                         "--num-workers", "0", "--output-dir", str(real)])
    for extra in (["--layers", "all"], ["--random-init"]):
        fewshot.main(["--run", str(real), "--shots", "1", "5", "--seeds", "2", "--max-test", "100",
                      "--num-workers", "0", *extra])
    out = tmp_path / "out"
    done = run_script("eval/compare.py", str(real), str(runs / "sup"), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("### Runs (few-shot on digits)")
    assert "overlay the runs: tensorboard --logdir" in done.stdout
    report = json.loads((out / "compare.json").read_text())
    rows = rows_by_name(report["tables"][0])
    # one random-init baseline for both runs, from the random-init file before fewshot.json's references
    assert list(rows) == ["mpp", "sup", "random init (Micro/4, 16 px)", "raw pixels (16 px)"]
    pixels = json.loads((real / "fewshot.json").read_text())["references"]["pixels"]["results"]["5"]
    assert rows["raw pixels (16 px)"]["5-shot"] == f"{100 * pixels['mean']:.1f} ± {100 * pixels['std']:.1f}"
    assert [t["title"] for t in report["layer_tables"]] == ["By block: 5-shot on digits"]
    assert report["layer_tables"][0]["columns"][2:] == [f"block {b}" for b in range(1, 7)]
    assert report["plots"]["layers"]["panels"] == ["1-shot on digits", "5-shot on digits"]
    trained = json.loads((real / "fewshot.json").read_text())["results"]["5"]
    assert rows["mpp"]["5-shot"] == f"{100 * trained['mean']:.1f} ± {100 * trained['std']:.1f}"
    assert rows["mpp"]["objective"] == "mpp (mean_color, 50%)" and rows["mpp"]["steps"] == "3"
    assert rows["mpp"]["25-shot"] == DASH and rows["mpp"]["linear probe"] == DASH  # sup has 25 shots, no run a probe
    baseline = json.loads((real / "fewshot-random-init.json").read_text())["results"]["1"]
    assert rows["random init (Micro/4, 16 px)"]["1-shot"] == (
        f"{100 * baseline['mean']:.1f} ± {100 * baseline['std']:.1f}")
    # Curves: the run's own TensorBoard events, one point per step.
    assert report["plots"]["curves"]["sources"]["mpp"] == "tensorboard"
    source, curves = read_curves(real)
    assert source == "tensorboard" and [step for step, _ in curves["train/loss"]] == [1, 2, 3] and "eval/loss" in curves
    # The position-embedding figure: the run's checkpoint, a 4×4 grid of patches (16 px, patch 4).
    pos = report["plots"]["pos_embed"]["mpp"]
    assert pos["checkpoint"].endswith("ckpt-00000003.pt") and pos["step"] == 3 and pos["grid"] == [4, 4]
    for name in ("fewshot.png", "layers.png", "curves.png", "pos_embed-mpp.png"):
        check_png(out / name)
    assert not (out / "pos_embed-sup.png").exists()  # sup has no checkpoint


def test_main_fewshot_dataset_is_the_runs_own_not_a_transfer_check():
    from mpp.report.tables import main_dataset

    # both runs probed on their own data and on a transfer set: the tie goes to the data they trained on,
    # even when the transfer report is read first
    rows = [Row(name=n, dataset="cifar10", fewshot={"imagenette": {}, "cifar10": {}}) for n in ("a", "b")]
    assert main_dataset(rows) == "cifar10"
    rows.append(Row(name="c", dataset="cifar10", fewshot={"imagenette": {}}))
    assert main_dataset(rows) == "imagenette"  # more rows were evaluated on it


# ---------------------------------------------------------------- references and per-block results

OFFSETS = {"token": 0.0, "token+norm": 0.01, "avg": 0.02, "avg+norm": 0.03}


def layer_sweep(value, probe: str = "fewshot", random=None, depth: int = 6, shots=(1, 5)) -> dict:
    """A "layers" entry as the probe CLIs write it: every block × (token, avg) × (no norm, norm);
    `value(block, variant)` is the accuracy (few-shot: at the largest shot count, 10 points less at the others)."""
    specs = [{"name": f"{b}/{pool}{'+norm' if norm else ''}", "layer": b, "pool": pool, "norm": norm}
             for b in range(1, depth + 1) for pool in ("token", "avg") for norm in (False, True)]

    def result(accuracy: float) -> dict:
        if probe == "linear_probe":
            return {"accuracy": accuracy, "l2": 1.0}
        if probe == "knn":  # k-NN: at the largest k, 5 points less at the others
            return knn_results({k: accuracy - (0.0 if k == max(shots) else 0.05) for k in shots})
        means = {k: accuracy - (0.0 if k == max(shots) else 0.1) for k in shots}
        return {str(k): {"shots": k, "mean": m, "std": 0.01, "per_seed": [m - 0.01, m + 0.01]}
                for k, m in means.items()}

    def results(fn) -> dict:
        return {s["name"]: result(fn(s["layer"], s["name"].split("/")[1])) for s in specs}

    found = {"features": [s["name"] for s in specs], "specs": specs, "results": results(value)}
    if random:
        found["random_init"] = results(random)
    return found


def references(probe: str, random: float, pixels: float) -> dict:
    if probe == "linear_probe":
        return {"random_init": {"accuracy": random, "l2": 1024.0, "feature_dim": 128, "seed": 0},
                "pixels": {"accuracy": pixels, "l2": 64.0, "feature_dim": 768, "image_size": 16}}
    shots = lambda m: {str(k): {"shots": k, "mean": m + 0.01 * k, "std": 0.0, "per_seed": [m]} for k in (1, 5)}  # noqa: E731
    return {"random_init": {"results": shots(random), "feature_dim": 128, "seed": 0},
            "pixels": {"results": shots(pixels), "feature_dim": 768, "image_size": 16}}


def mpp_value(block: int, var: str) -> float:
    return 0.9 if (block, var) == (4, "avg+norm") else 0.30 + 0.04 * block + OFFSETS[var]


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> Path:
    """Three runs of one architecture: "mpp" with references and per-block sweeps in both probes (and an
    older random-init file), "sup" with references and a few-shot sweep without random init, "old" as
    the probes wrote before either existed."""
    root = tmp_path_factory.mktemp("layers") / "runs"
    mpp = root / "mpp"
    write(mpp / "config.json", config("mpp", mpp={"target": "mean_color", "corrupt_rate": 0.5}))
    write(mpp / "fewshot.json", {**fewshot("digits", {1: (0.8, 0.01), 5: (0.9, 0.01)}),
                                 "references": references("fewshot", 0.10, 0.20),
                                 "layers": layer_sweep(mpp_value, random=lambda b, v: 0.10 + 0.01 * b)})
    write(mpp / "fewshot-random-init.json", fewshot("digits", {1: (0.05, 0.0), 5: (0.07, 0.0)}, "random"))
    write(mpp / "linear-probe.json", {"init": "trained", "dataset": {"spec": "digits"}, "vit": MICRO, "accuracy": 0.7,
                                      "l2": 1.0, "references": references("linear_probe", 0.33, 0.39),
                                      "layers": layer_sweep(lambda b, v: 0.5 + 0.02 * b, "linear_probe",
                                                            random=lambda b, v: 0.3)})
    sup = root / "sup"
    write(sup / "config.json", config("supervised"))
    write(sup / "fewshot.json", {**fewshot("digits", {1: (0.5, 0.0), 5: (0.6, 0.0)}),
                                 # pixels as mpp's, another random init
                                 "references": references("fewshot", 0.11, 0.20),
                                 "layers": layer_sweep(lambda b, v: 0.2 + 0.05 * b + OFFSETS[v], depth=6)})
    old = root / "old"
    write(old / "config.json", config("supervised"))
    write(old / "fewshot.json", fewshot("digits", {1: (0.4, 0.0), 5: (0.45, 0.0)}))
    return root


@pytest.fixture(scope="module")
def layered_report(layered) -> dict:
    return compare([layered / "mpp", layered / "sup", layered / "old"], layered / "out")


def test_reference_rows_random_init_and_raw_pixels(layered_report):
    rows = rows_by_name(layered_report["tables"][0])
    assert list(rows) == ["mpp", "sup", "old", "random init (Micro/4, 16 px)", "raw pixels (16 px)"]
    # random init: mpp's own random-init file comes before its fewshot.json's references; the linear probe's
    # is the only one there is, from linear-probe.json's references.
    assert rows["random init (Micro/4, 16 px)"]["1-shot"] == "5.0 ± 0.0"
    assert rows["random init (Micro/4, 16 px)"]["linear probe (digits)"] == "33.0"
    assert rows["raw pixels (16 px)"]["objective"] == "raw pixels"
    assert (rows["raw pixels (16 px)"]["1-shot"], rows["raw pixels (16 px)"]["5-shot"]) == ("21.0 ± 0.0", "25.0 ± 0.0")
    assert rows["raw pixels (16 px)"]["linear probe (digits)"] == "39.0"
    assert rows["old"]["5-shot"] == "45.0 ± 0.0" and rows["old"]["linear probe (digits)"] == DASH
    assert [r["sources"] for r in layered_report["random_init"]] == [["mpp", "sup"]]
    assert [r["sources"] for r in layered_report["pixels"]] == [["mpp", "sup"]]
    assert layered_report["pixels"][0]["linear_probe"]["in"] == "references.pixels"
    notes = "\n".join(layered_report["notes"])
    assert ("random init (Micro/4, 16 px), few-shot on digits: shown once, from mpp/fewshot-random-init.json (the "
            "first run's, a random-init report before references); other numbers (another draw) in "
            "mpp/fewshot.json references.random_init, sup/fewshot.json references.random_init") in notes
    assert ("raw pixels (16 px), few-shot on digits: shown once, from mpp/fewshot.json references.pixels "
            "(the first run's); the same numbers are also in sup/fewshot.json references.pixels") in notes
    assert "linear-probe on digits" not in notes  # one run has a linear probe: nothing to choose
    markdown = layered_report["markdown"]
    assert "| raw pixels (16 px) | raw pixels | – | 21.0 ± 0.0 | 25.0 ± 0.0 | 39.0 |" in markdown


def test_layer_tables_by_block_with_the_best_cell(layered_report, layered):
    tables = layered_report["layer_tables"]
    assert [t["title"] for t in tables] == ["By block: 5-shot on digits", "By block: linear probe on digits"]
    shots = tables[0]
    assert shots["columns"] == ["run", "features", *[f"block {b}" for b in range(1, 7)]]
    assert shots["names"] == ["mpp"] * 4 + ["mpp (random init)"] * 4 + ["sup"] * 4  # old has no sweep
    rows = {(r[0], r[1]): r[2:] for r in shots["rows"]}
    assert rows["mpp", "token+norm"] == ["35.0", "39.0", "43.0", "47.0", "51.0", "55.0"]
    assert rows["mpp", "avg+norm"][3] == "**90.0**"  # mpp's best: block 4's mean patch token after the norm
    assert rows["mpp (random init)", "token"] == ["11.0", "12.0", "13.0", "14.0", "15.0", "16.0"]
    assert rows["sup", "avg+norm"][5] == "**53.0**"
    assert shots["best"] == {"mpp": {"block": 4, "features": "avg+norm", "accuracy": 0.9},
                             "sup": {"block": 6, "features": "avg+norm", "accuracy": pytest.approx(0.53)}}
    assert shots["caption"] == ("Best per run (in bold): mpp block 4, avg+norm (90.0); sup block 6, avg+norm (53.0). "
                                "Reference: raw pixels (16 px) 25.0.")
    probe = tables[1]
    assert probe["names"] == ["mpp"] * 4 + ["mpp (random init)"] * 4
    # a tie: the first
    assert probe["best"]["mpp"] == {"block": 6, "features": "token", "accuracy": pytest.approx(0.62)}
    assert probe["caption"].endswith("Reference: raw pixels (16 px) 39.0.")
    markdown = (layered / "out" / "compare.md").read_text()
    assert "### By block: 5-shot on digits\n\n| run | features | block 1 |" in markdown
    assert "| mpp | avg+norm | 37.0 | 41.0 | 45.0 | **90.0** | 53.0 | 57.0 |" in markdown
    assert "Best per run (in bold): mpp block 4, avg+norm (90.0)" in markdown
    saved = json.loads((layered / "out" / "compare.json").read_text())
    assert saved["layer_tables"] == json.loads(json.dumps(tables))
    assert saved["runs"][0]["fewshot"]["digits"]["layers"]["blocks"] == [1, 2, 3, 4, 5, 6]
    assert saved["runs"][2]["fewshot"]["digits"]["layers"] is None


def test_layers_png_listed_and_deterministic(layered_report, layered, tmp_path):
    assert layered_report["plots"]["layers"] == {
        "file": "layers.png", "panels": ["1-shot on digits", "5-shot on digits", "linear probe on digits"],
        "runs": ["mpp", "sup"]}
    assert str(layered / "out" / "layers.png") in layered_report["files"]
    width, height = check_png(layered / "out" / "layers.png")
    assert width >= 3 * 400 and height >= 300  # three panels side by side, the legend below
    again = compare([layered / "mpp", layered / "sup", layered / "old"], tmp_path / "again")
    assert again["layer_tables"] == layered_report["layer_tables"]
    assert (tmp_path / "again" / "layers.png").read_bytes() == (layered / "out" / "layers.png").read_bytes()


def test_old_format_runs_alone_have_no_layer_view(layered, tmp_path):
    report = compare([layered / "old"], tmp_path / "out")
    assert report["layer_tables"] == [] and report["plots"]["layers"] is None and report["pixels"] == []
    assert "By block" not in report["markdown"] and not (tmp_path / "out" / "layers.png").exists()


def bad_layers(case: str) -> tuple[str, dict, str]:
    """(report file, report, what the error says) for one malformed case."""
    sweep = layer_sweep(mpp_value, depth=2)
    if case == "no-specs":
        sweep.pop("specs")
        return "fewshot.json", sweep, "malformed 'layers': no 'specs' list"
    if case == "spec-name":
        sweep["specs"][0]["name"] = "2/token"
        return "fewshot.json", sweep, "malformed 'layers': spec {"
    if case == "features":
        sweep["features"] = sweep["features"][::-1]
        return "fewshot.json", sweep, "'features' and 'specs' list different features"
    if case == "unknown-result":
        sweep["results"]["7/token"] = sweep["results"]["1/token"]
        return "fewshot.json", sweep, "'results' has a result for '7/token', which no spec names"
    if case == "mean":
        sweep["results"]["1/avg"]["5"]["mean"] = "high"
        return "fewshot.json", sweep, "a result in 'results' without a numeric accuracy"
    if case == "probe-random-init":
        sweep = layer_sweep(mpp_value, "linear_probe", depth=2, random=lambda b, v: 0.1)
        sweep["random_init"]["1/avg"] = {"l2": 1.0}
        return "linear-probe.json", sweep, "a result in 'random_init' without a numeric accuracy"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no-specs", "spec-name", "features", "unknown-result", "mean", "probe-random-init",
                                  "references"])
def test_a_malformed_layers_or_references_entry_is_one_line_naming_the_file(case, tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "config.json", config("mpp"))
    if case == "references":
        file, message = "fewshot.json", "references.pixels has no positive integer 'image_size'"
        refs = references("fewshot", 0.1, 0.2)
        refs["pixels"]["image_size"] = "16"
        write(run / file, {**fewshot("digits", {1: (0.5, 0.0)}), "references": refs})
    else:
        file, sweep, message = bad_layers(case)
        head = fewshot("digits", {1: (0.5, 0.0)}) if file == "fewshot.json" else {"init": "trained", "accuracy": 0.5}
        write(run / file, {**head, "layers": sweep})
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert f"'{run / file}' is not a " in err and message in err
    assert not (tmp_path / "out" / "compare.json").exists()


def test_layers_through_the_command_line(layered, tmp_path):
    out = tmp_path / "out"
    done = run_script("eval/compare.py", str(layered / "mpp"), str(layered / "old"), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "### By block: 5-shot on digits" in done.stdout and "### By block: linear probe on digits" in done.stdout
    assert "| raw pixels (16 px) | raw pixels |" in done.stdout
    assert "wrote compare.md, compare.json, fewshot.png, layers.png in" in done.stdout
    check_png(out / "layers.png")
    bad = tmp_path / "bad"
    write(bad / "fewshot.json", {**fewshot("digits", {1: (0.5, 0.0)}), "layers": {"specs": []}})
    failed = run_script("eval/compare.py", str(bad), "--output", str(out), timeout=120)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith(f"error: '{bad / 'fewshot.json'}' is not a few-shot report (malformed 'layers'")


def test_in_run_fewshot_curves_are_drawn_against_images_seen(tmp_path):
    """Runs pretrained with --fewshot-every: their curves, from step 0, in fewshot_curves.png."""
    for name, batch, rise in (("mpp", 128, 0.05), ("sup", 64, 0.2)):
        run = tmp_path / name
        cfg = config("mpp" if name == "mpp" else "supervised")
        cfg["train"]["batch_size"] = batch
        write(run / "config.json", cfg)
        lines = [{"step": 0, "train/loss": 3.0}]
        for step in (0, 100, 200):
            lines.append({"step": step, **{f"{p}/digits/{k}shot": 0.1 + rise * step / 200 + k / 100
                                           for p in ("fewshot", "fewshot_avg") for k in (1, 25)},
                          "fewshot/seconds": 1.0})
        write(run / "metrics.jsonl", "\n".join(json.dumps(m) for m in lines) + "\n")
    plain = tmp_path / "plain"
    write(plain / "config.json", config("mpp"))
    report = compare([tmp_path / "mpp", tmp_path / "sup", plain], tmp_path / "out")
    drawn = report["plots"]["fewshot_curves"]
    assert drawn == {"file": "fewshot_curves.png", "panels": ["1-shot on digits", "25-shot on digits"],
                     "runs": ["mpp", "sup"]}
    check_png(tmp_path / "out" / "fewshot_curves.png", (800, 300))
    assert str(tmp_path / "out" / "fewshot_curves.png") in report["files"]
    alone = compare([plain], tmp_path / "out2")
    assert alone["plots"]["fewshot_curves"] is None and not (tmp_path / "out2" / "fewshot_curves.png").exists()


# ---------------------------------------------------------------- k-NN reports (eval/knn.py)

def knn_results(accuracies: dict[int, float]) -> dict:
    return {str(k): {"k": k, "accuracy": a} for k, a in accuracies.items()}


def knn_report(accuracies: dict[int, float], init: str = "trained", **extra) -> dict:
    """A report shaped as eval/knn.py writes it (the fields compare reads, plus a few)."""
    return {"init": init, "step": 0, "features": "token", "model": None, "vit": MICRO,
            "dataset": {"spec": "digits", "image_size": 16, "train_used": 1437, "test_used": 360},
            "k": list(accuracies), "temperature": 0.07, "results": knn_results(accuracies), **extra}


@pytest.fixture(scope="module")
def knn_compared(tmp_path_factory) -> dict:
    """"mpp" with a k-NN report holding both references and an every-block sweep (and a mean-patch-token
    report the table leaves out), "sup" with k = 20 only and a random-init report of its own."""
    root = tmp_path_factory.mktemp("knn") / "runs"
    mpp = root / "mpp"
    write(mpp / "config.json", config("mpp", mpp={"target": "mean_color", "corrupt_rate": 0.5}))
    write(mpp / "fewshot.json", fewshot("digits", {1: (0.5, 0.01)}))
    refs = {"random_init": {"results": knn_results({10: 0.30, 20: 0.31}), "feature_dim": 128},
            "pixels": {"results": knn_results({10: 0.90, 20: 0.88}), "feature_dim": 768, "image_size": 16, "grid": 16}}
    write(mpp / "knn.json", knn_report({10: 0.60, 20: 0.62}, references=refs,
                                       layers=layer_sweep(mpp_value, "knn", random=lambda b, v: 0.2, shots=(10, 20))))
    write(mpp / "knn-avg.json", {**knn_report({10: 0.99, 20: 0.99}), "features": "avg"})
    sup = root / "sup"
    write(sup / "config.json", config("supervised"))
    write(sup / "knn.json", knn_report({20: 0.70}))
    write(sup / "knn-random-init.json", knn_report({10: 0.25, 20: 0.27}, init="random"))
    return compare([mpp, sup], root / "out")


def test_knn_columns_reference_rows_and_notes(knn_compared):
    table = knn_compared["tables"][0]
    assert table["columns"] == ["run", "objective", "data", "1-shot", "linear probe", "k-NN k=10 (digits)",
                                "k-NN k=20 (digits)", "fine-tune", "steps", "wall time"]
    rows = rows_by_name(table)
    assert list(rows) == ["mpp", "sup", "random init (Micro/4, 16 px)", "raw pixels (16 px)"]
    assert [rows["mpp"]["k-NN k=10 (digits)"], rows["mpp"]["k-NN k=20 (digits)"]] == ["60.0", "62.0"]  # not knn-avg's
    assert [rows["sup"]["k-NN k=10 (digits)"], rows["sup"]["k-NN k=20 (digits)"]] == [DASH, "70.0"]
    # the first run's random init (its report's references) is shown; sup's own draw is named in a note
    assert [rows["random init (Micro/4, 16 px)"][f"k-NN k={k} (digits)"] for k in (10, 20)] == ["30.0", "31.0"]
    assert [rows["raw pixels (16 px)"][f"k-NN k={k} (digits)"] for k in (10, 20)] == ["90.0", "88.0"]
    assert rows["raw pixels (16 px)"]["1-shot"] == DASH
    assert ("random init (Micro/4, 16 px), k-NN on digits: shown once, from mpp/knn.json references.random_init "
            "(the first run's, a random-init report before references); other numbers (another draw) in "
            "sup/knn-random-init.json") in knn_compared["notes"]
    saved = json.loads((Path(knn_compared["output"]) / "compare.json").read_text())
    assert saved["runs"][0]["knn"]["results"] == {"10": 0.6, "20": 0.62}  # {k: accuracy}
    assert "| mpp | mpp (mean_color, 50%) | digits | 50.0 ± 1.0 | – | 60.0 | 62.0 | – |" in knn_compared["markdown"]


def test_knn_by_block_table_and_panels(knn_compared):
    (table,) = knn_compared["layer_tables"]
    assert table["title"] == "By block: 20-NN on digits" and (table["probe"], table["k"]) == ("knn", 20)
    assert table["names"] == ["mpp"] * 4 + ["mpp (random init)"] * 4
    rows = {(r[0], r[1]): r[2:] for r in table["rows"]}
    assert rows["mpp", "avg+norm"][3] == "**90.0**" and rows["mpp (random init)", "token"] == ["20.0"] * 6
    assert table["caption"] == ("Best per run (in bold): mpp block 4, avg+norm (90.0). "
                                "Reference: raw pixels (16 px) 88.0.")
    assert knn_compared["plots"]["layers"]["panels"] == ["10-NN on digits", "20-NN on digits"]
    check_png(Path(knn_compared["output"]) / "layers.png")


@pytest.mark.parametrize("report, message", [
    ({"init": "trained", "k": [10]}, "is not a k-NN report (no 'results')"),
    (knn_report({10: 0.5}) | {"results": {"10": {"k": 10, "accuracy": "high"}}}, "a result without a numeric accuracy"),
    (knn_report({10: 0.5}, references={"pixels": {"results": {}}}), "no 'results' in references.pixels"),
])
def test_a_malformed_knn_report_is_one_line_naming_the_file(report, message, tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "config.json", config("mpp"))
    write(run / "knn.json", report)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: '{run / 'knn.json'}' ") and message in err
    assert not (tmp_path / "out" / "compare.json").exists()


def test_a_run_with_only_knn_reports_is_a_run(tmp_path):
    write(tmp_path / "probed" / "knn-random-init.json", knn_report({20: 0.3}, init="random", model="Micro/4"))
    found = compare([tmp_path / "probed"], tmp_path / "out")
    assert rows_by_name(found["tables"][0])["random init (Micro/4, 16 px)"]["k-NN k=20 (digits)"] == "30.0"


def test_in_run_knn_curves_are_panels_beside_the_fewshot_ones(tmp_path):
    run = tmp_path / "mpp"
    cfg = config("mpp")
    cfg["train"]["batch_size"] = 32
    write(run / "config.json", cfg)
    lines = [{"step": step, "fewshot/digits/1shot": 0.1 + step / 1000, "fewshot/seconds": 1.0,
              **{f"{p}/digits/{k}nn": 0.2 + step / 500 + k / 100 for p in ("knn", "knn_avg") for k in (10, 20)}}
             for step in (0, 50, 100)]
    write(run / "metrics.jsonl", "\n".join(json.dumps(m) for m in lines) + "\n")
    report = compare([run], tmp_path / "out")
    assert report["plots"]["fewshot_curves"] == {
        "file": "fewshot_curves.png", "panels": ["1-shot on digits", "10-NN on digits", "20-NN on digits"],
        "runs": ["mpp"]}
    check_png(tmp_path / "out" / "fewshot_curves.png", (700, 300))
