"""The faults a user meets, through the real command line: crashes with loader workers on, signals
at the worst moments, a full disk, two runs in one directory, torn records, a changed schedule.

Each run asserts that the process ends promptly (with every loader worker), says one clear line,
and loses nothing already written. The runs are small (Micro/4 on the digits, a few steps)."""
import json
import math
import os
import resource
import signal
import time

import pytest
from helpers.procs import WORKERS, finish, one_error_line, snapshot, start, wait_until
from helpers.runs import FAST, read_metrics, run_script

from mpp.run.checkpoint import load_checkpoint
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import TrainConfig, main


@pytest.mark.slow
@pytest.mark.parametrize("fault, expected", [("step", "injected fault in a training step"),
                                             ("worker", "injected fault in a loader worker"),
                                             ("save", "injected fault in torch.save")])
def test_a_crash_with_loader_workers_ends_the_run_and_its_workers(tmp_path, fault, expected):
    # A bug keeps its traceback, but the process must end: it used to wait forever in atexit for
    # workers that ignored the SIGTERM multiprocessing stops them with.
    proc = start(["--output-dir", str(tmp_path / "run"), *WORKERS, "--max-steps", "6", "--save-every", "3"], fault)
    _, err = finish(proc)
    assert proc.returncode == 1 and expected in err, err[-2000:]


@pytest.mark.slow
def test_a_bad_flag_that_crashed_in_a_step_is_refused_and_a_second_ctrl_c_ends_the_run(tmp_path, capsys):
    # The reproduction of the hang: --cells 0 crashed inside the first step. It is now refused up front,
    # before any worker exists: in-process (a process of its own would only add torch's import).
    with pytest.raises(SystemExit) as e:
        main("mpp", ["--target", "downsample", "--cells", "0", "--batch-size", "16", "--max-steps", "2",
                     "--output-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--cells 0 is out of range" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    # Two Ctrl-Cs to the whole process group (a terminal's), workers on: the second quits at once.
    run = tmp_path / "run"
    proc = start(["--output-dir", str(run), *WORKERS, "--max-steps", "100000", "--save-every", "100000"])
    wait_until(lambda: (run / "metrics.jsonl").is_file() and read_metrics(run), proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode in (130, 128 + signal.SIGINT) and "Traceback" not in err, err[-2000:]


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    main("mpp", ["--output-dir", str(run), *FAST, "--max-steps", "3"])  # in-process: the fault is in the resume
    (kept,) = list_checkpoints(run)
    before = snapshot(run)
    # The resumed run may write its small records, not another checkpoint: every checkpoint file is
    # larger than the limit. Python ignores SIGXFSZ, so the write fails with an OSError.
    limit = kept.stat().st_size // 2
    proc = start(["--output-dir", str(run), *WORKERS, "--max-steps", "6", "--save-every", "1", "--resume"],
                 preexec_fn=_file_size_limit(limit))
    _, err = finish(proc)
    line = one_error_line(err)
    assert proc.returncode == 2 and "could not write the step-4 checkpoint" in line and "File too large" in line, line
    assert "MiB" in line and "free" in line and kept.name in line and "--resume" in line
    assert list_checkpoints(run) == [kept] and load_checkpoint(kept)["step"] == 3  # intact, readable
    assert not list(run.glob("checkpoints/.*tmp*"))  # the torn write is gone
    assert before.keys() <= snapshot(run).keys() and kept.read_bytes() == before[kept]  # nothing lost


@pytest.mark.slow
def test_a_stop_during_the_final_evaluation_saves_the_final_step(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "evaluating"
    proc = start(["--output-dir", str(run), *WORKERS, "--max-steps", "7", "--save-every", "5"], "slow-eval",
                 env={"FAULT_MARKER": str(marker)})
    wait_until(marker.exists, proc)  # the final evaluation has started: steps 6 and 7 are in no checkpoint yet
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert "stopped at step 7 of 7" in out + err
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 7 and not (run / "summary.json").exists()
    main("mpp", ["--output-dir", str(run), *FAST, "--max-steps", "7", "--resume"])  # in-process: only checks the save
    assert json.loads((run / "summary.json").read_text())["steps"] == 7


@pytest.mark.slow
def test_two_runs_on_one_output_directory_the_second_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    first = start(["--output-dir", str(run), *FAST, "--max-steps", "100000", "--save-every", "2"])
    wait_until(lambda: bool(list_checkpoints(run)), first)
    second = run_script("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "4", "--resume")
    line = one_error_line(second.stderr)
    assert second.returncode == 2 and f"in use by process {first.pid}" in line and "another --output-dir" in line
    os.killpg(first.pid, signal.SIGKILL)  # no handler runs: the lock file still names it
    first.communicate()
    assert str(first.pid) in (run / "run.lock").read_text()
    step = load_checkpoint(list_checkpoints(run)[-1])["step"]
    capsys.readouterr()
    # In-process: this process is another one than the dead holder, which is all the take-over needs.
    main("mpp", ["--output-dir", str(run), *FAST, "--max-steps", str(step + 1), "--resume"])
    err = capsys.readouterr().err
    assert f"taking over the lock of process {first.pid}" in err and "no longer running" in err, err[-2000:]
    assert (run / "run.lock").read_text() == ""  # a clean end leaves it free


def test_resume_with_another_max_steps_keeps_the_schedule_consistent(tmp_path):
    """The rule: --max-steps (or --epochs) may change on --resume, and from the resumed step on every
    step's learning rate is the schedule of the new length; it used to take one step at the old
    schedule's rate, then jump."""
    run, lr = tmp_path / "run", 1e-3
    argv = ["--output-dir", str(run), *FAST, "--log-every", "1", "--lr", str(lr), "--warmup-steps", "2"]
    main("mpp", [*argv, "--max-steps", "4"])
    resumed = run_script("scripts/pretrain_mpp.py", *argv, "--max-steps", "9", "--resume")  # the user's command
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(run) if "train/lr" in m}
    cfg = TrainConfig(lr=lr, warmup_steps=2)
    # step s uses factor(s - 1)
    expected = {s: lr * cfg.lr_schedule(4 if s <= 4 else 9).factor(s - 1) for s in range(1, 10)}
    assert lrs.keys() == expected.keys() and all(math.isclose(lrs[s], expected[s], rel_tol=1e-9) for s in lrs), lrs
    with pytest.raises(SystemExit) as e:  # shorter than where it stands: refused, nothing changed
        before = snapshot(run)
        main("mpp", [*argv, "--max-steps", "5", "--resume"])
    assert e.value.code == 2 and snapshot(run) == before


def test_resume_repairs_a_torn_metrics_line_and_a_missing_config(tmp_path):
    run = tmp_path / "run"
    argv = ["--output-dir", str(run), *FAST, "--log-every", "1", "--save-every", "2"]
    main("mpp", [*argv, "--max-steps", "3"])  # checkpoints at 2 and 3
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a kill in the middle of a line
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").unlink()
    resumed = run_script("scripts/pretrain_mpp.py", *argv, "--max-steps", "5", "--resume")
    err = resumed.stderr
    assert resumed.returncode == 0 and "rewriting it from the checkpoint's copy" in err and "Traceback" not in err, err
    metrics = read_metrics(run)  # every line is JSON again, each training step once
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4, 5]
    repaired = json.loads((run / "config.json").read_text())
    assert repaired["train"] == config["train"] and repaired["resumed"][0]["step"] == 3


def test_an_output_directory_inside_the_dataset_is_refused(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "a" / "x.png")
    with pytest.raises(SystemExit) as e:
        main("mpp", ["--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "data" / "train" / "runs"),
                     *FAST])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "inside the dataset's train/ folder" in one_error_line(err)
    assert not (tmp_path / "data" / "train" / "runs").exists()
