"""Files written whole: a reader, or a run resumed after a kill, sees the old file or the new one.

Every file the project writes that something later reads (checkpoints, config and summary JSON,
reports, the kernel verdict cache, metrics rewritten on resume) goes through `atomic_write`; a
folder whose files only make sense together (an export: weights and the config.json that describes
them) goes through `replace_folder`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mpp.core.errors import UsageError
from mpp.core.layout import CHECKPOINTS, TENSORBOARD

TMP_MARK = ".tmp-"  # atomic_write's temporary files: .<name>.tmp-<pid of the writer>
PARTIAL_MARK = ".partial-"  # replace_folder's folder being written: .<name>.partial-<pid of the writer>
ASIDE_MARK = ".replaced-"  # the folder it replaces, moved aside until the new one is in: .<name>.replaced-<pid>
RECORD_SUFFIXES = (".json", ".jsonl", ".md")  # a run's small records (copy_records): configs, metrics, reports


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
    included, however the writer reports it) raises OSError and leaves no temporary file. A link is
    written through: the file it names is replaced, and the link stays."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
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
        raise UsageError(f"cannot write to output directory '{path}' ({e.strerror or e}): "
                         f"pass a writable {flag}") from e
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


def replace_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Write a folder whole: `write(tmp)` fills a temporary sibling, its files are fsynced, then it takes
    `path`'s place by renames. A reader, or the next call after a kill at any moment, finds the old
    folder or the whole new one, or (killed between the two renames) none, which the next call puts
    back (`recover_killed_folders`). Entries of the old folder that `write` did not write are carried
    into the new one (hard links where the file system allows, else copies). Any failure raises OSError
    with the old folder in place."""
    recover_killed_folders(path)
    tmp, aside = (path.with_name(f".{path.name}{mark}{os.getpid()}") for mark in (PARTIAL_MARK, ASIDE_MARK))
    try:
        tmp.mkdir()
        write(tmp)
        sync_tree(tmp)
        if path.is_dir():
            carry_over(path, tmp)
            sync_tree(tmp, files=False)  # the carried entries: old files, new directory entries
        if path.is_dir() and any(path.iterdir()):
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(aside, path)
                raise
        else:
            os.replace(tmp, path)  # none there, or an empty folder, which rename replaces
        sync_dir(path.parent)
    finally:
        remove(tmp)
    remove(aside)


def recover_killed_folders(path: Path) -> None:
    """Undo what a killed `replace_folder` of `path` left beside it (SIGKILL runs no cleanup): its
    half-written folder is deleted, never read; the old folder it had moved aside goes back when the new
    one never took its place, else is deleted. What a live writer (another process) holds stays."""
    for mark in (PARTIAL_MARK, ASIDE_MARK):
        prefix = f".{path.name}{mark}"
        for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
            pid = leftover.name[len(prefix):]
            # our own pid: a dead process's leftover whose pid this one reuses (ours are made after this)
            if not pid.isdigit() or (int(pid) != os.getpid() and process_alive(int(pid))):
                continue
            if mark == ASIDE_MARK and not os.path.lexists(path):
                os.rename(leftover, path)
                sync_dir(path.parent)
            else:
                remove(leftover)


def remove(path: Path) -> None:
    """Delete a folder and what it holds, or a link in its place (an --output that was a link), if there."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def carry_over(old: Path, new: Path) -> None:
    """Every entry of `old` that `new` lacks, into `new`: hard links, or copies where links fail
    (another file system, a file system without them); symbolic links as links."""
    for entry in old.iterdir():
        target = new / entry.name
        if os.path.lexists(target):
            continue  # written anew
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, target)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """`dst` as a hard link to `src` (no space taken), or a copy where links fail (another file system,
    a file system without them). A link `src` is followed: `dst` holds the file it names."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_records(folder: Path, dest: Path) -> list[Path]:
    """Copy the small records of the run directory `folder` (RECORD_SUFFIXES, at any depth, sub-folders
    kept) into `dest`, each written whole, and return the copies. Never what lies under checkpoints/,
    tensorboard/ or wandb/ (large, or a tracker's own files), nor hidden entries (locks, temporary files):
    what a study commits, its records without its weights."""
    copied = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in (CHECKPOINTS, TENSORBOARD, "wandb"))
        for name in sorted(names):
            if name.startswith(".") or not name.endswith(RECORD_SUFFIXES):
                continue
            source = Path(root, name)
            copied.append(copy_file(source, dest / source.relative_to(folder)))
    return copied


def copy_file(source: Path, target: Path) -> Path:
    """`source` copied to `target` (its folders made) through atomic_write: whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as f:
        atomic_write(target, lambda out: shutil.copyfileobj(f, out))
    return target


def sync_tree(folder: Path, files: bool = True) -> None:
    """fsync every file (unless not `files`) and directory under `folder`: on disk before a rename
    makes them visible."""
    for root, _, names in os.walk(folder):
        for name in names if files else ():
            if os.path.islink(os.path.join(root, name)):
                continue  # its target is not ours to sync
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
