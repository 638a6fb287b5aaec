"""--report-to tensorboard|wandb|all (mpp.run.trackers): the curves reach each tracker asked for, and
only those; W&B runs offline (WANDB_MODE=offline: no network, no account), its records read back
from the run's binary .wandb file by the tags it holds and the images it saved."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import ENV, FAST, REPO, run_script
from helpers.wandb_records import exit_code

from mpp.core.errors import UsageError
from mpp.report.curves import tensorboard_scalars
from mpp.run.trackers import check_report_to

pytest.importorskip("wandb", reason="--report-to wandb needs the wandb package (pip install -e '.[wandb]')")

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
PRETRAIN = ["scripts/pretrain_mpp.py", *FAST, "--max-steps", "4", "--log-every", "2", "--eval-every", "2"]


def wandb_runs(folder: Path) -> list[Path]:
    """The offline W&B runs under folder/wandb, oldest first: each one's .wandb record file."""
    return sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One pretraining reporting to both trackers, then resumed to 6 steps reporting to W&B only."""
    run = tmp_path_factory.mktemp("trackers") / "run"
    with pytest.MonkeyPatch.context() as env:
        for name, value in OFFLINE.items():  # the module's subprocesses (run_script passes os.environ on)
            env.setenv(name, value)
        first = run_script(*PRETRAIN, "--output-dir", str(run), "--report-to", "all")
        assert first.returncode == 0, first.stderr[-3000:]
        events_after_first = event_files(run / "tensorboard")
        resumed = run_script(*PRETRAIN, "--output-dir", str(run), "--report-to", "wandb", "--resume",
                             "--max-steps", "6")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        yield run, events_after_first, env


def test_report_to_all_writes_the_curves_and_the_mosaic_to_both(reported):
    run, events, _ = reported
    first = wandb_runs(run)[0]
    record = first.read_bytes()
    for tag in (b"train/loss", b"train/lr", b"eval/loss", b"eval/accuracy", b"train.lr", b"mpp.corrupt_rate"):
        assert tag in record, tag  # the scalars, and the run's config (flattened)
    images = sorted(p.name for p in first.parent.glob("files/media/images/mpp/predictions_*.png"))
    assert [name.split("_")[1] for name in images] == ["2", "4"], images  # the mosaic at each evaluation
    scalars = tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4] and [s for s, _ in scalars["eval/loss"]] == [2, 4]
    assert events, "no TensorBoard events"
    assert json.loads((run / "config.json").read_text())["train"]["report_to"] == "all"
    assert exit_code(first) == 0  # finished, not failed


def test_a_run_that_crashes_marks_its_w_and_b_run_failed(reported, tmp_path):
    out = tmp_path / "run"
    done = run_script("tests/helpers/faults.py", "step", *PRETRAIN[1:], "--output-dir", str(out),
                      "--report-to", "wandb")
    assert done.returncode != 0 and "injected fault in a training step" in done.stderr, done.stderr[-2000:]
    [crashed] = wandb_runs(out)
    assert exit_code(crashed) == 1  # W&B shows it failed, not finished


def test_a_resume_is_a_w_and_b_run_of_its_own_and_wandb_alone_writes_no_events(reported):
    run, events, _ = reported
    runs = wandb_runs(run)
    assert len(runs) == 2, runs  # W&B steps only go forward: the resumed process starts a new run
    second = runs[1].read_bytes()
    assert b"run@4" in second and b"train/loss" in second  # named after the run dir and the step resumed
    assert event_files(run / "tensorboard") == events  # --report-to wandb: TensorBoard got nothing new
    metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 6 in metrics  # metrics.jsonl is written whatever the trackers


def test_finetune_reports_each_training_to_wandb(reported, tmp_path):
    run, _, _ = reported
    out = tmp_path / "ft"
    done = run_script("eval/finetune.py", "--run", str(run), "--steps", "2", "--lrs", "0.01", "--seeds", "1",
                      "--batch-size", "16", "--warmup-steps", "1", "--log-every", "1", "--num-workers", "0",
                      "--output-dir", str(out), "--report-to", "wandb")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [p.read_bytes() for p in wandb_runs(out)]
    assert len(records) == 2  # one lr, so no grid: the seed-0 training, then the summary
    assert b"train/loss" in records[0] and b"test/accuracy" in records[0] and b"ft/seed0" in records[0]
    assert b"finetune/test_accuracy" in records[1]
    assert [exit_code(p) for p in wandb_runs(out)] == [0, 0]
    diverged = tmp_path / "diverged"  # a training that ends by an error: its W&B run is marked failed
    done = run_script("eval/finetune.py", "--run", str(run), "--steps", "4", "--lrs", "1e30", "--seeds", "1",
                      "--batch-size", "16", "--warmup-steps", "0", "--grad-clip", "0", "--num-workers", "0",
                      "--output-dir", str(diverged), "--report-to", "wandb")
    assert done.returncode == 2 and "not finite" in done.stderr, done.stderr[-2000:]
    assert [exit_code(p) for p in wandb_runs(diverged)] == [1]
    assert not (out / "tensorboard").exists()


def test_an_unknown_tracker_is_one_line(tmp_path):
    for script in ("scripts/pretrain_mpp.py", "eval/finetune.py"):
        done = run_script(script, "--report-to", "mlflow", "--output-dir", str(tmp_path / "x"))
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "error: --report-to 'mlflow' is not a tracker: pass one of tensorboard, wandb, all"], done.stderr
        assert not (tmp_path / "x").exists()


def test_wandb_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then says: not installed
    for value in ("wandb", "all"):
        with pytest.raises(UsageError, match=f"--report-to {value} needs the wandb package.*pip install"):
            check_report_to(value)
    check_report_to("tensorboard")
    # The same through the command line: a process where wandb cannot be imported.
    shadow = ("import runpy, sys; sys.modules['wandb'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    done = run_script("-c", shadow, "scripts/pretrain_mpp.py", "--report-to", "all",
                      "--output-dir", str(tmp_path / "x"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "needs the wandb package" in lines[0], done.stderr
    assert not (tmp_path / "x").exists()


def test_wandb_that_cannot_start_stops_the_run_before_its_records(tmp_path):
    """Online W&B without an account (a fresh HOME, no API key): one line, no config.json, no events."""
    env = {k: v for k, v in {**os.environ, **ENV}.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", WANDB_MODE="online")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, *PRETRAIN, "--output-dir", str(out), "--report-to", "all"], cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    error = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(error) == 1, done.stderr[-3000:]
    assert "the wandb tracker could not start" in error[0] and "--report-to tensorboard" in error[0]
    assert "Traceback" not in done.stderr
    assert not (out / "config.json").exists() and not (out / "tensorboard").exists()


def test_sigterm_with_wandb_saves_stops_and_leaves_no_process(tmp_path):
    """W&B runs a service process of its own: a stopped run still ends promptly, saved, with nothing left."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "scripts/pretrain_mpp.py", *FAST, "--max-steps", "5000", "--output-dir",
                             str(out), "--report-to", "all", "--num-workers", "2"], cwd=REPO,
                            env={**os.environ, **ENV, **OFFLINE}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training, W&B started
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run logged nothing within 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not stop within 60 s of SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM and "rerun the same command with --resume" in stdout, stderr[-2000:]
    for _ in range(100):  # its loader workers and W&B's service go with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process of the run outlived it")
    assert list((out / "checkpoints").glob("ckpt-*.pt")) and b"train/loss" in wandb_runs(out)[0].read_bytes()
    assert exit_code(wandb_runs(out)[0]) == 0  # a stop is not a failure: saved, and --resume goes on
