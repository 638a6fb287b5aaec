"""The second ring of faults (docs/reliability.md): a read that never returns, a stop while waiting
for it, a launcher killed under its processes, a run directory holding someone else's records, a
failure after the last step, a full disk outside a save, a step out of memory.

Each fault comes from outside the project's code where it can (a FIFO in the dataset, a signal, a
SIGKILL, a full tmpfs), and each run asserts the exit code, one line, a bounded time, no process
left and nothing earlier changed. The runs are small (Micro/4 at 16 px, a few steps)."""
import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.procs import PROMPT_S, finish, one_error_line, snapshot, start, wait_until
from helpers.runs import ENV, FAST, LAUNCH_2, REPO, read_metrics, run_script
from PIL import Image

from mpp.core.errors import cli_main, disk_refused, loader_timed_out
from mpp.core.stopping import WAIT_GRACE_S
from mpp.run.checkpoint import load_checkpoint
from mpp.run.rundir import list_checkpoints
from mpp.train.pretrain import main

IMAGES = 9  # per epoch one batch of all of them, so the first batch always holds the stuck file
STUCK = ["--image-size", "16", "--batch-size", str(IMAGES), "--max-steps", "50", "--log-every", "1"]


@pytest.fixture(scope="module")
def stuck_data(tmp_path_factory) -> Path:
    """train/{a,b}/ with 8 images and a FIFO named like an image, which no writer ever opens: reading
    it blocks in open() forever, as a file on a stalled network mount does."""
    root = tmp_path_factory.mktemp("stuck") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    os.mkfifo(root / "train" / "a" / "pipe.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--num-workers", "2"], ["--num-workers", "0", "--streaming"]],
                         ids=["loader-workers", "streamed-in-process"])
def test_a_read_that_never_returns_ends_the_run_naming_the_file(stuck_data, tmp_path, mode):
    run = tmp_path / "run"
    started = time.monotonic()
    proc = start(["--dataset", str(stuck_data), "--output-dir", str(run), *STUCK, *mode], "read-limit",
                 env={"FAULT_READ_LIMIT": "3"})
    _, err = finish(proc)
    line = one_error_line(err)
    assert proc.returncode == 2 and "pipe.png" in line and "did not finish within 3 s" in line, line
    assert line.startswith("error: reading image"), line  # not "mpp.data.readlimit.StuckRead: ..." from a worker
    assert time.monotonic() - started < PROMPT_S
    # the last whole step (0: the stuck read was in the first batch) is saved, so --resume continues
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--num-workers", "2"], ["--num-workers", "0"]], ids=["loader-workers", "in-process"])
def test_a_stop_while_a_read_never_returns_saves_and_ends_within_seconds(stuck_data, tmp_path, mode):
    # The reproduction: SIGTERM said "finishing this step and saving a checkpoint", then nothing for
    # 14 minutes; the read's own limit (120 s here) is not what ends it.
    run = tmp_path / "run"
    proc = start(["--dataset", str(stuck_data), "--output-dir", str(run), *STUCK, *mode])
    wait_until(lambda: (run / "config.json").is_file(), proc)
    time.sleep(3)  # the loop is blocked on the FIFO
    stopped = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a terminal's or a scheduler's
    out, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - stopped < WAIT_GRACE_S + 25, "the stop waited on the stuck read"
    assert f"no data came within {WAIT_GRACE_S:g} s of the stop" in out + err and "stopped at step 0" in out + err
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(run)] == [0]


def _state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie, as good as gone), or None when there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@pytest.mark.slow
def test_a_launcher_killed_by_sigkill_takes_its_training_processes_with_it(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen([*LAUNCH_2, "scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST,
                                 "--max-steps", "100000", "--log-every", "1"], cwd=REPO,
                                env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (run / "metrics.jsonl").is_file() and read_metrics(run), launcher, timeout=180)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert len(children) == 2, children
        launcher.kill()  # SIGKILL: the launcher can pass nothing on
        launcher.wait()
        deadline = time.monotonic() + PROMPT_S
        while any(_state(p) not in (None, "Z") for p in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in children if _state(p) not in (None, "Z")]
        assert not left, f"training processes {left} outlived their launcher"
        assert list_checkpoints(run), "the stop saved no checkpoint"  # they stopped as on SIGTERM: saving first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A 2-step run whose records the tests below copy."""
    run = tmp_path_factory.mktemp("short") / "run"
    done = run_script("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_a_new_run_never_writes_into_records_that_are_not_its_own(short_run, tmp_path, capsys):
    # A run directory whose checkpoints were deleted, started again with other settings: it used to
    # run with exit 0 and append to the old metrics.jsonl (compare then drew one zig-zag curve).
    old = _copy(short_run, tmp_path / "old")
    for ckpt in list_checkpoints(old):
        ckpt.unlink()
    before = snapshot(old)
    done = run_script("scripts/pretrain_mpp.py", "--output-dir", str(old), *FAST, "--max-steps", "3", "--lr", "1e-3")
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "is not empty (checkpoints, config.json, metrics.jsonl" in line, line
    assert "a new --output-dir" in line and snapshot(old) == before
    # A folder of the user's own files: never written into, whatever the names.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(SystemExit) as e:
        main("mpp", ["--output-dir", str(mine), *FAST, "--max-steps", "1"])
    assert e.value.code == 2 and "is not empty (metrics.jsonl)" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in mine.iterdir()] == ["metrics.jsonl"]
    assert (mine / "metrics.jsonl").read_text() == "my notes\n"
    # An empty folder is a new run's, and so is one holding only the empty lock of a start that wrote
    # no record (refused by its data, stopped before its first step): else no command could use it again.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run.lock").touch()
    main("mpp", ["--output-dir", str(tmp_path / "empty"), *FAST, "--max-steps", "1"])
    assert [m["step"] for m in read_metrics(tmp_path / "empty") if "train/loss" in m] == [1]


def test_a_resume_never_joins_the_records_of_another_run(short_run, tmp_path, capsys):
    # Checkpoints of one run under another run's records (a copy into the wrong directory).
    mixed = _copy(short_run, tmp_path / "mixed")
    config = json.loads((mixed / "config.json").read_text())
    assert len(config["run_id"]) == 32
    assert load_checkpoint(list_checkpoints(mixed)[-1])["config"]["run_id"] == config["run_id"]
    config["run_id"] = "0" * 32
    (mixed / "config.json").write_text(json.dumps(config))
    before = snapshot(mixed)
    with pytest.raises(SystemExit) as e:
        main("mpp", ["--output-dir", str(mixed), *FAST, "--max-steps", "3", "--resume"])
    line = one_error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "are of run" in line and "records" in line and snapshot(mixed) == before, line


@pytest.mark.slow
def test_a_crash_after_the_last_step_keeps_it(tmp_path):
    # A bug in the final evaluation used to leave only the checkpoint of the last --save-every.
    run = tmp_path / "run"
    proc = start(["--output-dir", str(run), *FAST, "--max-steps", "3", "--save-every", "2", "--eval-every", "0"],
                 "eval")
    _, err = finish(proc)
    assert proc.returncode == 1 and "injected fault in an evaluation" in err  # a bug: its traceback is kept
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 3 and not (run / "summary.json").exists()
    done = run_script("scripts/pretrain_mpp.py", "--output-dir", str(run), *FAST, "--max-steps", "3",
                      "--save-every", "2", "--eval-every", "0", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [m["step"] for m in read_metrics(run) if "eval/loss" in m] == [3]  # evaluated once, at the end


@pytest.mark.slow
def test_running_out_of_memory_in_a_step_is_one_line_that_says_what_to_lower(tmp_path):
    proc = start(["--output-dir", str(tmp_path / "run"), *FAST, "--max-steps", "5"], "oom")
    _, err = finish(proc)
    line = one_error_line(err)
    assert proc.returncode == 2 and line.startswith("error: out of memory at step 3"), line
    assert "--batch-size (now 32)" in line and "--grad-accum-steps" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a disk that fills up (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]}): needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.slow
def test_a_full_disk_outside_a_save_is_one_line_and_keeps_what_was_written(small_disk):
    # It was three chained OSError tracebacks (TensorBoard's writer thread among them), no checkpoint,
    # and metrics.jsonl cut mid-line.
    run = small_disk / "run"
    proc = start(["--output-dir", str(run), *FAST, "--max-steps", "100000", "--log-every", "1", "--save-every", "2",
                  "--keep-checkpoints", "1", "--eval-every", "0"])
    wait_until(lambda: bool(list_checkpoints(run)) and len(read_metrics(run)) >= 3, proc, timeout=180)
    kept = {p: p.read_bytes() for p in list_checkpoints(run)}
    _fill(small_disk)
    _, err = finish(proc)
    line = one_error_line(err)
    assert proc.returncode == 2 and "could not write" in line and "No space left on device" in line, line
    assert str(run) in line and "--resume" in line
    metrics = read_metrics(run)  # every line whole
    assert metrics and all(isinstance(m["step"], int) for m in metrics)
    survivors = list_checkpoints(run)  # the newest complete checkpoint stays (a failed save deletes nothing)
    assert survivors and all(p.read_bytes() == kept[p] for p in survivors if p in kept)
    assert load_checkpoint(survivors[-1])["step"] >= 2


def test_a_refused_write_anywhere_is_one_line(tmp_path, capsys):
    @cli_main
    def writes():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.json"))

    with pytest.raises(SystemExit) as e:
        writes()
    line = one_error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "could not write" in line and "report.json" in line and "MiB free there" in line
    assert disk_refused(OSError(errno.ENOENT, "No such file")) is None  # not a full disk: not this line
    assert loader_timed_out(RuntimeError("DataLoader timed out after 600 seconds")) is not None
    assert loader_timed_out(RuntimeError("something else")) is None


def test_the_stuck_read_bound_interrupts_a_blocked_open(stuck_data, monkeypatch):
    from mpp.data.readlimit import StuckRead, read_limit

    started = time.monotonic()
    with pytest.raises(StuckRead, match="pipe.png"):
        with read_limit("image 'pipe.png'", seconds=0.5):
            open(stuck_data / "train" / "a" / "pipe.png", "rb")
    assert time.monotonic() - started < 5
    with read_limit("x", seconds=0.2):  # a read that finishes disarms it
        pass
    time.sleep(0.4)  # no alarm left to fire



def test_a_stream_shorter_than_one_batch_is_one_line(stuck_data, tmp_path):
    # A stream's length is unknown before it is read (a test split: no carve counted it); Accelerate
    # then raised "Batch does not contain any data" as a traceback.
    data = tmp_path / "few"
    for split in ("train", "test"):
        (data / split / "a").mkdir(parents=True)
        for i in range(2):
            (data / split / "a" / f"{i}.png").write_bytes((stuck_data / "train" / "a" / f"{i}.png").read_bytes())
    done = run_script("scripts/pretrain_mpp.py", "--dataset", str(data), "--output-dir", str(tmp_path / "run"),
                      "--model", "Micro/4", "--image-size", "16", "--batch-size", "8", "--max-steps", "3",
                      "--streaming", "--num-workers", "0")
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "ended before one whole batch of 8 images" in line, line


@pytest.mark.slow
def test_a_stuck_read_under_accelerate_launch_is_named_by_the_process_that_met_it(stuck_data, tmp_path):
    # It was rank 0's gloo traceback ("Connection closed by peer"), the file named nowhere.
    done = subprocess.run([*LAUNCH_2, "tests/helpers/faults.py", "read-limit", "--dataset", str(stuck_data),
                           "--output-dir", str(tmp_path / "run"), "--image-size", "16", "--batch-size", "8",
                           "--max-steps", "20", "--num-workers", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**ENV, "OMP_NUM_THREADS": "1", "FAULT_READ_LIMIT": "3"})
    lines = re.findall(r"error: [^\r\n]*", done.stderr)  # rank 1's line may follow rank 0's progress bar
    assert done.returncode != 0 and any("pipe.png" in line and "did not finish within 3 s" in line for line in lines), \
        done.stderr[-3000:]
    assert not any("Connection closed by peer" in line and not line.startswith("error: ") for line in
                   done.stderr.splitlines() if line.startswith("[rank")), done.stderr[-3000:]


def test_a_worker_s_error_is_its_own_line():
    from mpp.core.errors import one_line
    from mpp.data.readlimit import StuckRead

    reraised = StuckRead("Caught StuckRead in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File ...\nmpp.data.readlimit.StuckRead: "
                         "reading image 'x.png' did not finish: fix it")
    assert one_line(reraised) == "reading image 'x.png' did not finish: fix it"


def test_an_export_through_a_link_replaces_the_folder_it_names(short_run, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    first = run_script("scripts/export.py", "--run", str(short_run), "--output", str(real))
    assert first.returncode == 0, first.stderr[-2000:]
    (real / "model.safetensors").write_bytes(b"stale")
    link.symlink_to(real)
    again = run_script("scripts/export.py", "--run", str(short_run), "--output", str(link), "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert link.is_symlink() and (real / "model.safetensors").read_bytes() != b"stale"


@pytest.mark.slow
def test_a_full_disk_during_an_export_is_one_line_and_leaves_no_folder(short_run, small_disk):
    _fill(small_disk)
    done = run_script("scripts/export.py", "--run", str(short_run), "--output", str(small_disk / "exp"))
    line = one_error_line(done.stderr)  # safetensors' own error, not an OSError, was a traceback
    assert done.returncode == 2 and "No space left on device" in line, line
    assert not (small_disk / "exp").exists() and not list(small_disk.glob(".exp*"))
