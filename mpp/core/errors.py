"""One-line errors for bad input, and the wrapper that prints them without a traceback."""
from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UsageError(ValueError):
    """Bad input the user can fix. The message is one line: the problem, then what to do."""


class BadInput(UsageError, ValueError):
    """Input a library function cannot use, said in the library's terms: `problem` states what is
    wrong with the values given, `fix` (or None) what would work, as fields and values, never as a
    command-line flag. Uncaught, it is the one line "problem: fix" (a UsageError).

    A command line knows which of its flags gave the value: it catches the error where it parses
    them and says its own fix in its flags (`advised`), as mpp.eval.probe_setup.flag_advice does for
    the probe CLIs. A ValueError, as a Python caller of the library expects of a bad argument."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem, self.fix = problem, fix

    def advised(self, fix: str) -> UsageError:
        """A command line's one-line error: this problem, then `fix` in that command's flags."""
        return UsageError(f"{self.problem}: {fix}")


class BadField(BadInput):
    """A config field whose value cannot be used (a ViTConfig's image_size, ...): the `field`'s name,
    its `value`, and `suggestion`, what would work as the value of the flag that set it ("96 or a
    preset with another patch size"; None: no value alone would), for `flag_advised`."""

    def __init__(self, problem: str, fix: str, *, field: str, value, suggestion: str | None = None):
        super().__init__(problem, fix)
        self.field, self.value, self.suggestion = field, value, suggestion

    def flag_advised(self, flag: str) -> UsageError:
        """The one line of the command line whose `flag` set the field: "problem: pass FLAG suggestion"."""
        if self.suggestion is None:
            return self.advised(self.fix)
        return self.advised(f"pass {flag} {self.suggestion}")


class TooFewImages(BadInput):
    """A class with fewer images than a draw from it needs: `who` (how the class is named: "class 3",
    "class 3 ('cat')") has `have` training images, the draw needs `need`. The problem is those facts
    (`facts`) unless a caller that knows what the draw is for restates it (`problem`)."""

    def __init__(self, who: str, have: int, need: int, fix: str | None = None, *, problem: str | None = None):
        self.who, self.have, self.need = who, have, need
        super().__init__(problem or self.facts(), fix)

    def facts(self) -> str:
        return f"{self.who} has {self.have} training images, fewer than {self.need}"


class TooFewShots(TooFewImages):
    """A class with fewer training images than a few-shot draw takes of it (`need` shots)."""

    def facts(self) -> str:
        return f"{self.who} has {self.have} training examples, fewer than {self.need} shots"


class LocalError(UsageError):
    """A failure of one process's own work (its share of the data: a stuck read, an unreadable image
    under --strict-images), which the other processes of a launch do not meet: every process prints
    its own, where a UsageError they all raise alike is printed by the main process alone."""


class MissingSplit(UsageError):
    """A dataset without the split asked for (a test split): pretraining carves a held-out split from
    its training images instead (mpp.data.holdout), saying why (`problem`); everything else stops with
    this one line."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}: {fix}")
        self.problem = problem


def one_line(error: UsageError) -> str:
    """The error's own line. Raised in a DataLoader worker, it comes back re-raised by PyTorch with
    the worker's traceback in front ("Caught UsageError in DataLoader worker ... Traceback ...")."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return str(error)
    for cls in type(error).__mro__:  # "mpp.data.readlimit.StuckRead: ..." as PyTorch re-raises a worker's error
        lines[-1] = lines[-1].removeprefix(f"{cls.__module__}.{cls.__name__}: ")
    return lines[-1]


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing: the reason inside a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# A write the disk refused: no room, a quota, a file-size limit, a read-only mount. Never a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def disk_refused(error: BaseException) -> str | None:
    """The one line for a write the disk refused (`DISK_ERRNOS`), wherever it was made (metrics,
    TensorBoard events, a report); None for any other error. Files written whole (mpp.core.files) are
    left as they were, so what is on disk stays consistent."""
    if not isinstance(error, OSError) or error.errno not in DISK_ERRNOS:
        return None
    import shutil

    where = str(error.filename or "")
    try:
        folder = os.path.dirname(os.path.abspath(where)) if where else "."
        free = f"; {shutil.disk_usage(folder).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = ""
    return (f"could not write {repr(where) if where else 'a file'} ({error.strerror or error}{free}): free space "
            "on that disk (or lift the quota, or mount it writable), then run again (a training run: the same command "
            "with --resume if it saved a checkpoint, else with a new --output-dir)")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: CUDA's (torch.OutOfMemoryError) or the CPU's."""
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)


# What a collective says when a process of the group is gone (gloo; NCCL's watchdog).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def loader_timed_out(error: BaseException) -> UsageError | None:
    """PyTorch's "DataLoader timed out" (its `timeout`, mpp.run.runtime.LOADER_LIMIT_S) as one line; None
    for any other error."""
    if not isinstance(error, RuntimeError) or not str(error).startswith("DataLoader timed out"):
        return None
    return LocalError(f"the loader workers sent no batch in time ({first_line(error)}: a read stuck where no "
                      "signal reaches it, e.g. a hung network mount, or a worker that stopped answering): check "
                      "the dataset's disk or mount, then run again (a training run: with --resume)")


def environment_line(error: BaseException) -> str | None:
    """The one line for a failure of the machine, not of the code nor of the input: a write the disk
    refused, a loader that sent nothing, memory that ran out. None for anything else (a bug)."""
    timed_out = loader_timed_out(error)
    if timed_out is not None:
        return str(timed_out)
    if any(s in str(error) for s in PEER_GONE):
        return ("another process of this run ended (a collective lost its peer): its own line above says why; fix "
                "that, then launch again (a training run: with --resume if it saved a checkpoint)")
    if out_of_memory(error):
        return (f"out of memory ({first_line(error)[:160]}): pass a smaller --batch-size (or a smaller model or "
                "image size)")
    return disk_refused(error)


def _quiet_disk_errors(args) -> None:
    """A write the disk refused in a background thread (TensorBoard's event writer) is raised again
    in the main thread at its next write, where it becomes the one line: no traceback here too."""
    if disk_refused(args.exc_value) is None:
        threading.__excepthook__(args)


def cli_main(main: F) -> F:
    """Wrap an entry point so a `UsageError` ends the process with its one line and exit code 2.

    Ctrl-C ends it with one line and exit code 130; a failure of the machine (`environment_line`: a
    full disk, no batch in time, out of memory) with one line and exit code 2 too. Anything else is a
    bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        threading.excepthook = _quiet_disk_errors
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            rank = os.environ.get("RANK", "0")
            if rank == "0":  # one line, not one per process under accelerate launch
                print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            elif isinstance(e, LocalError):  # its own (re-raised from a loader worker too)
                print(f"error: process {rank}: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except (OSError, RuntimeError) as e:
            line = environment_line(e)
            if line is None:
                raise
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {line}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop's handler, or a second one inside it
            if os.environ.get("RANK", "0") == "0":
                print("\ninterrupted (Ctrl-C): stopped without saving", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
