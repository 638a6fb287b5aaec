"""The one-command comparison: its stages, skipping finished work, archives, and a whole smoke run."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from helpers.runs import threads_kept

import mpp.data.unlabelled_view as uv
from mpp.core.files import write_json
from mpp.data.sources import load_split
from mpp.train.pretrain import parse_args

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_pretraining", REPO / "scripts" / "compare_pretraining.py")
cp = importlib.util.module_from_spec(spec)
sys.modules["compare_pretraining"] = cp  # dataclasses look their module up while the script loads
spec.loader.exec_module(cp)


def commands(capsys, argv) -> list[str]:
    cp.main(argv)
    return [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]


def test_dry_run_lists_every_stage_in_order(tmp_path, capsys):
    root = tmp_path / "root"
    cmds = commands(capsys, ["--budget", "smoke", "--root", str(root), "--transfer", "digits", "--dry-run"])
    scripts = [c.split()[1] for c in cmds]
    assert scripts[:5] == ["scripts/pretrain_mpp.py", "scripts/pretrain_supervised.py"] + ["eval/finetune.py"] * 3
    assert scripts[-1] == "eval/compare.py"
    finetunes = [c for c in cmds if "eval/finetune.py" in c]
    assert "--model Micro/4" in finetunes[0] and f"--run {root}/mpp " in finetunes[1]
    assert all("--train-fraction 0.1 " in c and "--seeds 3 " in c for c in finetunes)
    ablations = [c for c in cmds if "--target downsample" in c or "--target l2" in c or "--corrupt-rate 0.15" in c]
    assert len(ablations) == 3
    # probes of MPP, supervised, scratch and the ablations: few-shot, linear, k-NN and transfer each; the
    # random init and the raw pixels are every probe's references, not runs of their own
    assert sum("eval/fewshot.py" in c for c in cmds) == 2 * 6 and sum("eval/linear_probe.py" in c for c in cmds) == 6
    assert sum("eval/knn.py" in c for c in cmds) == 6 and all(f"--output {root}/" in c for c in cmds if "knn" in c)
    assert sum("--random-init" in c for c in cmds) == 0
    assert sum("--layers all" in c for c in cmds) == 3 * 6  # every block, on the main dataset
    pretrains = [c for c in cmds if "scripts/pretrain_" in c]
    assert len(pretrains) == 5 and all("--fewshot-every 100 " in c for c in pretrains)
    assert not any("--fewshot-dataset" in c for c in pretrains)  # the transfer set is the run's own here
    assert not root.exists()  # a dry run writes nothing
    no_ablations = commands(capsys, ["--budget", "smoke", "--root", str(root), "--no-ablations", "--dry-run"])
    assert not any("--target" in c or "--corrupt-rate" in c for c in no_ablations)


def test_finished_pretraining_with_other_settings_is_refused(tmp_path, capsys):
    root = tmp_path / "root"
    run = root / "mpp"
    run.mkdir(parents=True)
    write_json(run / "summary.json", {"steps": 1})
    pipeline = cp.Pipeline(cp.parse_args(["--budget", "smoke", "--root", str(root)]))
    trained = dataclasses.asdict(parse_args("mpp", pipeline.pretrain_flags("mpp"))[0])
    write_json(run / "config.json", {"train": {**trained, "epochs": 99.0, "num_workers": 7}})
    with pytest.raises(SystemExit) as e:
        cp.main(["--budget", "smoke", "--root", str(root), "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "was pretrained with other settings (epochs 99.0 → 0.5):" in err and "Traceback" not in err
    write_json(run / "config.json", {"train": {**trained, "num_workers": 7}})  # a setting that changes nothing
    cp.main(["--budget", "smoke", "--root", str(root), "--dry-run"])
    assert "[skip] " in capsys.readouterr().out


def test_archive_is_unpacked_once_with_or_without_a_top_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "REPO", tmp_path)
    source = tmp_path / "src"
    for split in ("train", "test"):
        (source / "pets" / split / "cat").mkdir(parents=True)
        (source / "pets" / split / "cat" / "a.jpg").write_bytes(b"x")
    with tarfile.open(tmp_path / "pets_jpg.tar.gz", "w:gz") as tar:
        tar.add(source / "pets", arcname="pets")  # one top folder around train/ and test/
    folder = cp.dataset_folder(str(tmp_path / "pets_jpg.tar.gz"))
    assert folder == str(tmp_path / "data" / "pets") and (Path(folder) / "train" / "cat" / "a.jpg").is_file()
    (Path(folder) / "train" / "cat" / "a.jpg").unlink()
    assert cp.dataset_folder(str(tmp_path / "pets_jpg.tar.gz")) == folder  # already there: not unpacked again
    assert not (Path(folder) / "train" / "cat" / "a.jpg").exists()
    with pytest.raises(cp.UsageError, match="does not exist"):
        cp.dataset_folder(str(tmp_path / "missing.tar.gz"))
    assert cp.dataset_folder("digits") == "digits"


def pets_archive(tmp_path) -> Path:
    """pets_jpg.tar.gz: train/ and test/ with one class of two images each, at the archive's top."""
    with tarfile.open(tmp_path / "pets_jpg.tar.gz", "w:gz") as tar:
        for name in ("train/cat/a.jpg", "train/cat/b.jpg", "test/cat/a.jpg", "test/cat/b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return tmp_path / "pets_jpg.tar.gz"


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_an_interrupted_unpack_is_never_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "REPO", tmp_path)
    archive, target = pets_archive(tmp_path), tmp_path / "data" / "pets"
    unpacked = ["train/cat/a.jpg", "train/cat/b.jpg", "test/cat/a.jpg", "test/cat/b.jpg"]

    # Interrupted part way (Ctrl-C after the first image): nothing in the final place, no temporary folder left.
    extract = tarfile.TarFile.extract
    seen = []

    def interrupted(self, member, *args, **kwargs):
        if member.isfile() and seen:
            raise KeyboardInterrupt
        seen.append(member.name)
        return extract(self, member, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(tarfile.TarFile, "extract", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cp.dataset_folder(str(archive))
    assert seen and not target.exists() and list((tmp_path / "data").iterdir()) == []

    # Killed (SIGKILL: no cleanup) part way: its half folder is removed, one whose unpacker lives stays.
    killed = tmp_path / "data" / f".pets{cp.UNPACKING}{dead_pid()}"
    (killed / "train" / "cat").mkdir(parents=True)
    (killed / "train" / "cat" / "a.jpg").write_bytes(b"x")
    running = tmp_path / "data" / f".pets{cp.UNPACKING}{os.getppid()}"
    running.mkdir()
    folder = cp.dataset_folder(str(archive))
    assert folder == str(target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*.jpg")) == sorted(unpacked)
    assert not killed.exists() and running.is_dir()

    # A half folder at the final place (an older version's unpack cut short) is not taken for the dataset.
    (target / "train").rename(tmp_path / "moved")
    with pytest.raises(cp.UsageError, match="exists but holds no train/ folder: remove it"):
        cp.dataset_folder(str(archive))


def test_archive_members_outside_the_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "REPO", tmp_path)
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for name in ("train/cat/a.jpg", "../escaped.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(cp.UsageError, match="has an unsafe member"):
        cp.dataset_folder(str(tmp_path / "evil.tar.gz"))
    with monkeypatch.context() as m, pytest.raises(cp.UsageError, match="has an unsafe member"):
        m.delattr(tarfile, "data_filter")  # a Python before the data filter: our own check
        cp.dataset_folder(str(tmp_path / "evil.tar.gz"))
    assert not (tmp_path / "data" / "escaped.jpg").exists() and list((tmp_path / "data").iterdir()) == []
    (tmp_path / "cut.tar.gz").write_bytes(pets_archive(tmp_path).read_bytes()[:60])  # a copy cut short
    with pytest.raises(cp.UsageError, match="cannot be read .*: it is truncated or corrupted"):
        cp.dataset_folder(str(tmp_path / "cut.tar.gz"))
    assert list((tmp_path / "data").iterdir()) == []


def stage_in_process(cmd: list[str]) -> subprocess.CompletedProcess:
    """subprocess.run for one stage (python SCRIPT ARGS...): the script run as __main__ here."""
    script, args = cmd[1], cmd[2:]
    saved = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return subprocess.CompletedProcess(cmd, code)


@pytest.mark.slow
def test_smoke_comparison_end_to_end_then_everything_is_skipped(tmp_path, monkeypatch):
    root, out = tmp_path / "root", tmp_path / "compare"
    argv = [sys.executable, "scripts/compare_pretraining.py", "--budget", "smoke", "--no-ablations", "--seeds", "1",
            "--fewshot-seeds", "1", "--root", str(root), "--output", str(out)]
    env_kw = {"cwd": REPO, "capture_output": True, "text": True, "timeout": 900}
    # The first pass runs each stage's command line in this process (runpy, with its argv), not in a
    # process of its own: 15 stages would pay torch's and timm's imports 15 times. Every
    # stage's CLI has subprocess tests of its own; the second pass below is the real command line.
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(cp, "subprocess", types.SimpleNamespace(run=stage_in_process))
    with threads_kept():  # the pretraining stages set this process's threads
        cp.main(argv[2:])
    for run in ("mpp", "supervised", "scratch"):
        assert all((root / run / name).is_file() for name in ("fewshot.json", "linear-probe.json", "knn.json"))
    assert set(json.loads((root / "mpp" / "fewshot.json").read_text())["references"]) == {"random_init", "pixels"}
    records = [json.loads(line) for line in (root / "mpp" / "metrics.jsonl").read_text().splitlines()]
    probed = [r["step"] for r in records if "fewshot/digits/1shot" in r]
    assert probed == [0, max(r["step"] for r in records)]  # the smoke budget probes at step 0 and at the end
    for run in ("mpp", "supervised"):
        results = json.loads((root / run / "finetune" / "finetune.json").read_text())
        assert results["init"] == "pretrained" and len(results["grid"]) == 2 and results["seeds"] == [0]
    assert json.loads((root / "scratch" / "finetune.json").read_text())["init"] == "scratch"
    assert (out / "compare.md").is_file() and (out / "fewshot.png").is_file()
    recorded = (root / "commands.sh").read_text()
    assert recorded.count("scripts/pretrain_") == 2 and "eval/compare.py" in recorded

    again = subprocess.run(argv, **env_kw)  # everything is there: only the table is made again
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [line for line in again.stdout.splitlines() if line.startswith("$ ")]
    assert len(ran) == 1 and "eval/compare.py" in ran[0]
    # ... and commands.sh still lists every stage: the ones found finished are recorded, not dropped
    assert (root / "commands.sh").read_text() == recorded


def labelled_folder(root: Path, per_class: int = 5, held_out: int = 2, size: int = 8) -> Path:
    """root/{train,val}/{cat,dog}/: small PNG and JPEG images, each its own random pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", held_out)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                PIL.Image.fromarray(pixels).save(root / split / name / f"{name}{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_the_unlabelled_view_holds_every_image_once_and_no_class(tmp_path):
    folder = labelled_folder(tmp_path / "pets")
    view = Path(uv.unlabelled_view(str(folder)))
    assert view == tmp_path / "pets-unlabelled"
    for split in ("train", "val"):  # every image once, the same file (a hard link here)
        originals = sorted(p for p in (folder / split).rglob("*") if p.is_file())
        names = {uv.view_name(str(p.relative_to(folder))): p for p in originals}
        assert sorted(p.name for p in (view / split).iterdir()) == sorted(names)
        assert all(os.path.samefile(view / split / name, p) for name, p in names.items())
        classes = [names[name].parent.name for name in sorted(names)]  # in the view's sorted order
        assert classes != sorted(classes) and classes != sorted(classes, reverse=True)
    inside = [str(p.relative_to(view)) for p in view.rglob("*")]
    assert not any("cat" in p or "dog" in p for p in inside), inside
    train, info = load_split(str(view), "train")  # the data layer reads it as images without labels
    test, test_info = load_split(str(view), "test")
    assert not info.labelled and not test_info.labelled and (len(train), len(test)) == (10, 4)
    with pytest.raises(cp.UsageError, match="has no labels"):
        info.require_labels("fix")
    made = (view / uv.MANIFEST).stat().st_mtime_ns
    assert uv.unlabelled_view(str(folder)) == str(view) and (view / uv.MANIFEST).stat().st_mtime_ns == made  # reused
    PIL.Image.new("RGB", (8, 8)).save(folder / "train" / "cat" / "new.png")  # the labelled folder grew
    with pytest.raises(cp.UsageError, match=r"does not match .*train 11/10/10.*: remove '.*pets-unlabelled' and rerun"):
        uv.unlabelled_view(str(folder))
    with pytest.raises(cp.UsageError, match="has no labels .*an unlabelled view is made of a labelled image folder"):
        uv.unlabelled_view(str(view))  # a view of a view


def test_an_interrupted_view_is_never_left_and_a_rerun_builds_it_whole(tmp_path, monkeypatch):
    folder = labelled_folder(tmp_path / "pets")
    linked = []

    def interrupted(src, dst):
        if len(linked) == 3:
            raise KeyboardInterrupt
        linked.append(dst)
        os.link(src, dst)

    with monkeypatch.context() as m:
        m.setattr(uv, "link_or_copy", interrupted)
        with pytest.raises(KeyboardInterrupt):
            uv.unlabelled_view(str(folder))
    assert len(linked) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["pets"]
    killed = tmp_path / f".pets-unlabelled.partial-{dead_pid()}"  # a SIGKILLed build's half view
    (killed / "train").mkdir(parents=True)
    view = Path(uv.unlabelled_view(str(folder)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets", "pets-unlabelled"]
    assert [len(list((view / s).iterdir())) for s in ("train", "val")] == [10, 4]


def test_dry_run_unlabelled_pretrains_mpp_on_the_view_and_the_rest_on_the_labels(tmp_path, capsys):
    folder, root = labelled_folder(tmp_path / "pets"), tmp_path / "root"
    view = f"{folder}-unlabelled"
    argv = ["--dataset", str(folder), "--unlabelled", "--budget", "smoke", "--root", str(root), "--transfer",
            "digits", "--dry-run"]
    cmds = commands(capsys, argv)
    pretrains = {c.split("--output-dir ")[1]: c for c in cmds if "scripts/pretrain_" in c}
    assert len(pretrains) == 5
    for run, cmd in pretrains.items():
        if run.endswith("supervised"):
            assert f"--dataset {folder} " in cmd and "--fewshot-dataset digits " in cmd
        else:  # MPP and its ablations: the view, probed in the run on the labelled folder
            assert f"--dataset {view} " in cmd and f"--fewshot-dataset {folder} " in cmd, cmd
    rest = [c for c in cmds if "scripts/pretrain_" not in c and "eval/compare.py" not in c]
    assert all(f"--dataset {folder} " in c or "--dataset digits " in c for c in rest)
    assert not any(view in c for c in rest)
    assert sum("eval/knn.py" in c and "--layers all" in c for c in cmds) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets"]  # no view, no root: a dry run writes nothing
    # A finished MPP run of the view is skipped; one pretrained on the labelled folder is refused.
    pipeline = cp.Pipeline(cp.parse_args(argv))
    (root / "mpp").mkdir(parents=True)
    write_json(root / "mpp" / "summary.json", {"steps": 1})
    trained = dataclasses.asdict(parse_args("mpp", pipeline.pretrain_flags("mpp"))[0])
    assert trained["dataset"] == view and trained["fewshot_dataset"] == str(folder)
    write_json(root / "mpp" / "config.json", {"train": trained})
    cp.main(argv)
    assert f"[skip] {root}/mpp is trained" in capsys.readouterr().out
    write_json(root / "mpp" / "config.json", {"train": {**trained, "dataset": str(folder)}})
    with pytest.raises(SystemExit):
        cp.main(argv)
    assert f"other settings (dataset {folder} → {view})" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["digits", "hf:cifar10", "shards:/nowhere", "unlabelled", "missing"])
def test_unlabelled_needs_a_labelled_image_folder(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if dataset == "unlabelled":
        (tmp_path / "photos").mkdir()
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
        dataset = "photos"
    listed = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        cp.main(["--dataset", dataset, "--unlabelled", "--budget", "smoke"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "an unlabelled view is made of a labelled image folder" in err
    assert sorted(tmp_path.iterdir()) == listed  # nothing written


def test_keep_copies_the_records_and_no_checkpoint(tmp_path):
    root, kept = tmp_path / "root", tmp_path / "kept"
    records = ["config.json", "metrics.jsonl", "fewshot.json", "knn.json", "finetune/finetune.json",
               "finetune/notes.md", "finetune/seed0/metrics.jsonl"]
    left = ["checkpoints/ckpt-10.pt", "checkpoints/meta.json", "tensorboard/events.out", "tensorboard/x.json",
            "finetune/checkpoints/state.json", "run.lock", ".config.json.tmp-1", "sample.png"]
    for name in records + left:
        (root / "mpp" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "mpp" / name).write_text(name)
    (root / "scratch").mkdir()
    write_json(root / "scratch" / "finetune.json", {"init": "scratch"})
    (root / "commands.sh").write_text("python eval/compare.py\n")
    cp.keep([root / "mpp", root / "scratch", root / "mpp-l2"], root, kept)  # mpp-l2 never ran
    found = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert found == sorted(["commands.sh", "runs/scratch/finetune.json", *(f"runs/mpp/{r}" for r in records)])
    assert all((kept / "runs" / "mpp" / r).read_text() == r for r in records)
    assert (kept / "commands.sh").read_text() == "python eval/compare.py\n"


@pytest.mark.slow
def test_unlabelled_mpp_pretraining_trains_on_the_view(tmp_path, monkeypatch):
    """The MPP stage alone, for real, at the smoke budget (one batch: 66 images): its run records the view as
    its data, and trained."""
    folder, root = labelled_folder(tmp_path / "pets", per_class=33, held_out=3, size=16), tmp_path / "root"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(cp, "subprocess", types.SimpleNamespace(run=stage_in_process))
    pipeline = cp.Pipeline(cp.parse_args(["--dataset", str(folder), "--unlabelled", "--budget", "smoke",
                                          "--root", str(root)]))
    pipeline.view()
    with threads_kept():
        pipeline.pretrain("mpp")
    config = json.loads((root / "mpp" / "config.json").read_text())
    assert config["train"]["dataset"] == f"{folder}-unlabelled" and config["train"]["fewshot_dataset"] == str(folder)
    assert json.loads((root / "mpp" / "summary.json").read_text())["steps"] >= 1
    records = [json.loads(line) for line in (root / "mpp" / "metrics.jsonl").read_text().splitlines()]
    assert any("fewshot/pets/1shot" in r for r in records)  # probed on the labelled folder
    pipeline.pretrain("mpp")  # finished: check_same accepts it, nothing runs again
