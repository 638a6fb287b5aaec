"""Files written whole: a reader, or a run resumed after a kill, sees the old file or the new one.

Every file the project writes that something later reads (checkpoints, config and summary JSON,
reports, the kernel verdict cache, metrics rewritten on resume) goes through `atomic_write`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mpp.errors import UsageError

TMP_MARK = ".tmp-"  # atomic_write's temporary files: .<name>.tmp-<pid of the writer>


class _WriteErrors:
    """A binary file whose write errors are remembered: torch.save's zip writer turns an OSError
    from the file (a full disk, a quota) into a RuntimeError that no longer says which, and the
    caller needs the OSError to say what to free."""

    def __init__(self, f) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # flush, tell, seek, ...
        return getattr(self._f, name)


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: a reader (or a resumed run)
    sees the old file or the whole new one, never a torn one. Any failure to write (a full disk
    included, however the writer reports it) raises OSError and leaves no temporary file."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            f = _WriteErrors(raw)
            try:
                write(f)
            except Exception as e:
                if f.error is not None and f.error is not e:
                    raise f.error from e
                raise
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)  # the file meant, not its temporary name
        raise
    finally:
        tmp.unlink(missing_ok=True)


def writable_dir(path: Path, flag: str) -> Path:
    """Create `path` and prove it takes files now, not after hours of work; else a one-line error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output directory '{path}' ({e.strerror or e}): pass a writable {flag}") from e
    return path


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def append_line(f, line: str) -> None:
    """Append `line` and a newline to `f` (opened "ab", unbuffered) whole or not at all: a write the
    disk refuses part-way (full) is cut back off, so the file never ends in half a line."""
    data = (line + "\n").encode()
    fd = f.fileno()
    start = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as e:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # the error that matters is the write's
        e.filename = e.filename or getattr(f, "name", None)
        raise


def remove_killed_writes(folder: Path) -> None:
    """Delete the temporary files of `atomic_write`s that a kill cut short (SIGKILL runs no cleanup).
    They are never read, only take space, a checkpoint's worth each. A file whose writer may still
    be alive stays."""
    for tmp in folder.glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True
