"""One process at a time in a run directory.

Two runs writing one `--output-dir` would interleave their metrics and leave the config and
checkpoints of one and the metrics of both, each finishing with exit code 0. So the process that
writes a run directory holds `RUN/run.lock` for as long as it writes: a POSIX record lock on the
file (`fcntl.lockf`), which the kernel drops when the process dies however it dies (SIGKILL
included), plus a line saying who holds it (pid, host, command), for the message another process
gets. A record lock, not `flock`: an `flock` is shared with every child forked after it was taken
(the loader workers), so a killed run's workers would hold its directory for seconds after it died;
a record lock belongs to the process alone, and works over NFS.

A lock left by a process that is gone is taken over with a note. The file itself is never deleted
(deleting a locked file lets a second process lock a new file of the same name); a clean exit
empties it. On a file system without locks, the holder's line decides: a live process on this
host, or one on another host (whose liveness cannot be seen from here), keeps the run.

A probe's report (eval/fewshot.py, eval/linear_probe.py, eval/knn.py) is held the same way, by
`ReportLock` on `<report>.lock` beside it: two probes on one report would each embed for minutes,
and the later would replace the earlier's report without a word.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mpp.core.errors import UsageError

LOCK_NAME = "run.lock"


class RunLock:
    """`with RunLock(run_dir, flag):` holds the run directory, or raises a one-line UsageError."""

    def __init__(self, run_dir: str | Path, flag: str = "--output-dir"):
        self.path = Path(run_dir) / LOCK_NAME
        self.flag = flag
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = _read_holder(fd)
            if not _try_lock(fd, holder, self.path, self.flag):
                raise UsageError(self.in_use(holder))
            if holder and os.environ.get("RANK", "0") == "0":
                print(f"note: taking over the lock of {_describe(holder)}, which is no longer running",
                      file=sys.stderr, flush=True)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            except OSError as e:  # a full disk: the one line names the lock file (mpp.core.errors.disk_refused)
                e.filename = str(self.path)
                raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def in_use(self, holder: dict) -> str:
        """The refusal's line when a live process holds the lock."""
        return (f"run directory '{self.path.parent}' is in use by {_describe(holder)}: wait for that run to end, "
                f"stop it, or pass another {self.flag}")

    def release(self) -> None:
        """Empty the file (so the next run takes no note), then drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a full or gone disk must not hide the error that ended the run
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None


def holder_of(run_dir: str | Path) -> str | None:
    """Who holds `run_dir` now, described, or None (free, or no lock file); changes no file. Not for
    a directory this process holds: closing any descriptor of the file drops this process's lock."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
        return None if _try_lock(fd, holder, path, "--output-dir") else _describe(holder)
    finally:
        os.close(fd)  # drops the lock just taken, if any


class ReportLock(RunLock):
    """`with ReportLock(report):` holds one report file (its `<report>.lock`) while a probe computes
    and writes it, or raises a one-line UsageError; the report is written atomically (mpp.core.files)."""

    def __init__(self, report: str | Path, flag: str = "--output"):
        # a link to a report is locked as the report it names: both paths write one file (mpp.core.files.atomic_write)
        report = Path(os.path.realpath(report)) if os.path.islink(report) else Path(report)
        super().__init__(report.parent, flag)
        self.report = report
        self.path = self.report.with_name(f"{self.report.name}.lock")

    def in_use(self, holder: dict) -> str:
        return (f"report '{self.report}' is being written by {_describe(holder)}: wait for that probe to end, "
                f"stop it, or pass another {self.flag}")


def _read_holder(fd: int) -> dict:
    """The holder's line, {} when the file is empty (free) or torn (its writer died mid-write)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _try_lock(fd: int, holder: dict, path: Path, flag: str) -> bool:
    """True when this process now holds the lock; False when a live process does."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
            return False
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise UsageError(f"cannot lock '{path}' ({e.strerror}): pass a {flag} on a local disk") from e
    return not _holder_alive(holder)  # no locks on this file system: the holder's line decides


def _holder_alive(holder: dict) -> bool:
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here: assume it runs
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return int(holder.get("pid", 0)) > 0


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}: "
            f"{holder.get('command', '')[:80]})")
