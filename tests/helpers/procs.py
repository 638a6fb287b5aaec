"""Running the pretraining entry point as a user's process, for tests that fault it from outside: in
a session of its own (its process group is it and its loader workers), waited on with a bound, and
checked for its one error line and for what it left on disk."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runs import ENV, FAST, REPO

WORKERS = [*FAST, "--num-workers", "2"]  # FAST has none; the hangs needed workers
PROMPT_S = 60  # "within seconds", with a 2-core machine's start-up (torch, accelerate) included


def start(args: list[str], fault: str | None = None, **kw) -> subprocess.Popen:
    """The pretraining entry point (with a fault from tests/helpers/faults.py) in a session of its own,
    so that its process group is its loader workers and it."""
    cmd = [sys.executable, "tests/helpers/faults.py", fault] if fault else [sys.executable, "scripts/pretrain_mpp.py"]
    return subprocess.Popen([*cmd, *args], cwd=REPO, env={**ENV, **kw.pop("env", {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = PROMPT_S) -> tuple[str, str]:
    """Wait for the run; fail (after killing it) if it, or any of its loader workers, outlives `timeout`."""
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run hung for {timeout:.0f} s; stderr tail:\n{err[-1500:]}")
    while time.monotonic() - started < timeout:  # its workers go with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return out, err
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("loader workers outlived their run")


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-1500:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the condition never held")
        time.sleep(0.1)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
