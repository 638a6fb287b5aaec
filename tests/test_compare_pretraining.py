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

import pytest
from helpers.runs import threads_kept

from mpp.core.files import write_json
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
    # probes of MPP, supervised, scratch and the ablations: few-shot, linear and transfer each; the
    # random init and the raw pixels are every probe's references, not runs of their own
    assert sum("eval/fewshot.py" in c for c in cmds) == 2 * 6 and sum("eval/linear_probe.py" in c for c in cmds) == 6
    assert sum("--random-init" in c for c in cmds) == 0
    assert sum("--layers all" in c for c in cmds) == 2 * 6  # every block, on the main dataset
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
        assert (root / run / "fewshot.json").is_file() and (root / run / "linear-probe.json").is_file()
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
