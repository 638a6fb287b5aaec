"""Faults a long run must survive: SIGKILL at random moments, SIGTERM / Ctrl-C, a torn or corrupted
newest checkpoint, a non-finite loss. A run stopped and resumed ends with exactly the weights of
the same run never stopped (bitwise, on CPU)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.runs import ENV, FAST, REPO, final_weights, read_metrics, run_script

from mpp.model.objective import MPPObjective
from mpp.run.checkpoint import load_checkpoint, save_checkpoint
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import main

# 60 steps cross an epoch of digits (44 steps of 32), one loader worker process, a checkpoint every 7 steps.
RUN = [*FAST, "--num-workers", "1", "--max-steps", "60", "--save-every", "7"]


def pretrain(run, *extra) -> list[str]:
    return [sys.executable, "scripts/pretrain_mpp.py", "--output-dir", str(run), *RUN, *extra]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The run never stopped, trained once per module: every fault's resumed run must end with its
    weights, and a copy of it is the finished run whose checkpoints the unreadable-checkpoint test damages."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(pretrain(run), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return final_weights(uninterrupted_run)


def assert_identical(run, expected) -> None:
    got = final_weights(run)
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 60
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def wait_for(condition, proc, timeout=120.0) -> bool:
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def newest_step(run) -> int:
    saved = list_checkpoints(run)
    return int(saved[-1].stem.split("-")[1]) if saved else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path, uninterrupted):
    seed = int(os.environ.get("MPP_FAULT_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    print(f"fault seed {seed} (MPP_FAULT_SEED={seed} repeats these kill moments)")
    run, killed_at = tmp_path / "run", []
    for _ in range(3):  # three kills, each at a random moment after the newest checkpoint
        resume = ["--resume"] if list_checkpoints(run) else []
        before = newest_step(run)
        proc = subprocess.Popen(pretrain(run, *resume), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(lambda before=before: newest_step(run) > before, proc)
        time.sleep(rng.uniform(0.0, 0.6))  # anywhere in a step, a save, or an evaluation
        proc.send_signal(signal.SIGKILL)  # no handler runs: what is on disk must be enough
        proc.wait()
        if proc.returncode != -signal.SIGKILL:  # it had already finished
            break
        killed_at.append(newest_step(run))
    assert killed_at and killed_at[0] < 60, "no kill landed mid-run"
    done = subprocess.run(pretrain(run, "--resume"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical(run, uninterrupted)
    assert not list(run.glob("checkpoints/.*tmp*")), "a killed save left its temporary file behind"


@pytest.mark.slow
def test_sigterm_then_sigint_each_save_a_checkpoint_then_resume_gives_identical_weights(tmp_path, uninterrupted):
    # One run stopped twice, so that both signals cost one run to the end, not two: SIGTERM (a
    # scheduler) once the fresh run has logged, then SIGINT (Ctrl-C) once the resumed run has logged.
    run, stopped = tmp_path / "run", 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        resume = ["--resume"] if stopped else []
        # Its own process group, signalled as a whole: Ctrl-C and most schedulers reach the loader workers too.
        proc = subprocess.Popen(pretrain(run, *resume), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert wait_for(lambda before=stopped: (run / "metrics.jsonl").is_file()
                        and any(m["step"] > before for m in read_metrics(run)), proc), "never logged"
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err[-2000:]
        if stopped:  # this run was itself a resumed one
            assert f"resumed {run} at step {stopped}" in out + err, err[-2000:]
        before, stopped = stopped, load_checkpoint(list_checkpoints(run)[-1])["step"]
        assert max(5, before + 1) <= stopped < 60, (sig, before, stopped)
        assert f"stopped at step {stopped} of 60" in out + err and "--resume" in out + err
        assert "Traceback" not in err
    done = subprocess.run(pretrain(run, "--resume"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"resumed {run} at step {stopped}" in done.stdout + done.stderr, done.stderr[-2000:]
    assert_identical(run, uninterrupted)


@pytest.mark.slow
def test_unreadable_newest_checkpoints_are_reported_and_an_older_one_used(tmp_path, uninterrupted_run,
                                                                          uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)  # a finished run (--output-dir may change on --resume), not trained again
    older, previous, newest = list_checkpoints(run)  # steps 49, 56, 60: the newest 3 are kept
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # torn: a disk that filled up, a copy cut short
    previous.write_bytes(random.Random(0).randbytes(len(previous.read_bytes())))  # garbage of the right size
    (run / "summary.json").unlink()

    resumed = run_script("scripts/pretrain_mpp.py", "--output-dir", str(run), *RUN, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("falling back" in w for w in warnings), warnings
    assert newest.name in warnings[0] and previous.name in warnings[1]
    assert f"at step 49 from {older.name}" in resumed.stdout + resumed.stderr
    assert_identical(run, uninterrupted)  # the redone steps rewrote the damaged files, identically

    for path in list_checkpoints(run):  # nothing readable left: one error line, not a fresh start
        path.write_bytes(b"")
    capsys.readouterr()  # in-process: the command line of this fault was the resume above
    with pytest.raises(SystemExit) as e:
        main("mpp", ["--output-dir", str(run), *RUN, "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no readable checkpoint" in err and "Traceback" not in err
    assert [p.read_bytes() for p in list_checkpoints(run)] == [b""] * 3  # refused: nothing written


def test_non_finite_loss_names_the_step_and_keeps_the_good_checkpoints(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["--output-dir", str(run), *FAST, "--max-steps", "20", "--save-every", "5"]
    forward, calls = MPPObjective.forward, []

    def blows_up_at_step_12(self, images, labels=None):
        loss, metrics = forward(self, images, labels)
        calls.append(self.training)
        return (loss * float("nan") if self.training and sum(calls) == 12 else loss), metrics

    monkeypatch.setattr(MPPObjective, "forward", blows_up_at_step_12)
    with pytest.raises(SystemExit) as e:
        main("mpp", argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "not finite at step 12" in line and "ckpt-00000010.pt" in line and "lower --lr" in line
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [5, 10]  # kept, readable
    monkeypatch.setattr(MPPObjective, "forward", forward)
    main("mpp", [*argv, "--resume"])  # the fix applied, the run goes on from the last good step
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 20


def test_a_save_removes_what_killed_saves_left_behind(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    killed = folder / f".ckpt-00000007.pt.tmp-{int(gone.stdout)}"  # its writer has exited
    live = folder / f".ckpt-00000007.pt.tmp-{os.getppid()}"  # its writer may still be writing
    for tmp in (killed, live):
        tmp.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path, 8, {"step": 8})
    assert not killed.exists() and live.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000008.pt"]


def test_a_refused_start_changes_nothing_on_disk(tmp_path, capsys):
    run = tmp_path / "run"
    main("mpp", ["--output-dir", str(run), *FAST, "--max-steps", "5"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for bad in (["--max-steps", "5"],  # would overwrite the run: refused, asks for --resume
                ["--max-steps", "10", "--resume", "--batch-size", "16"],  # another run's settings
                ["--max-steps", "10", "--resume", "--model", "Ti/4"],  # another model shape
                ["--max-steps", "10", "--resume", "--image-size", "30"]):  # bad input
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main("mpp", ["--output-dir", str(run), *FAST, *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err, bad
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
