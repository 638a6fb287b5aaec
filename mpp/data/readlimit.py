"""A bound on each image read: a file that never answers (a FIFO, a stalled network or FUSE mount)
ends the run with one line naming it, instead of hanging it (and its loader workers) forever.

`read_limit(name)` arms a one-shot `SIGALRM` timer of `READ_LIMIT_S` around one read; when it fires
the read is interrupted (the blocked system call returns EINTR, Python runs the handler, and the
handler's exception ends the call) and `StuckRead` names the file. It works in the main thread of
any process: the trainer's (no loader workers) and each loader worker's, where the reads happen.
Elsewhere (another thread) the read is unbounded here; the loader's own timeout (`LOADER_LIMIT_S`,
mpp.run.runtime) is the bound that remains, and the one for a read the kernel will not interrupt (a
hard network mount in state D, which no signal reaches).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from mpp.core.errors import LocalError

READ_LIMIT_S = 120.0  # one image (open, read, decode) may take this long before the run gives up on it


class StuckRead(LocalError):
    """A read that did not finish within its limit: one line naming what was read."""


@contextlib.contextmanager
def read_limit(name: str, seconds: float | None = None) -> Iterator[None]:
    """Bound what runs inside to `seconds` (default READ_LIMIT_S); past it, StuckRead names `name`."""
    limit = READ_LIMIT_S if seconds is None else seconds
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield  # signals reach the main thread only
        return

    def expired(_signum, _frame):
        raise StuckRead(f"reading {name} did not finish within {limit:g} s (a FIFO or a stalled network mount "
                        "never answers): fix or remove that file (or its mount), then run the same command "
                        "again (a training run: with --resume if it saved a checkpoint)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
