"""SIGTERM / SIGINT end a training run at the next step boundary, after a checkpoint.

Schedulers (SLURM, Kubernetes, preemptible clouds) send SIGTERM and wait a grace period; Ctrl-C
sends SIGINT. Either way the run finishes the optimizer step it is in (or the final evaluation),
saves, and exits with 128 + the signal's number, so `--resume` continues where it stopped. A second
Ctrl-C quits at once.

Loader workers get the same signals (a terminal's Ctrl-C and many schedulers signal the whole
process group) and must outlive them, or the step being finished would lose its data: they ignore
both. But at exit, multiprocessing stops its daemonic children with SIGTERM and then waits for
them, so after a crash, whose traceback keeps the loaders (and their persistent workers) alive
past that point, a run used to wait forever for workers that ignored it. `end_workers_at_exit`
ends them first, with a signal no process can ignore.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
WAIT_GRACE_S = 5.0  # after a stop, how long a wait for data may go on before it is abandoned
LAUNCHER_POLL_S = 1.0  # how often a launched process checks that its launcher is alive
ORPHAN_LIMIT_S = 60.0  # after its launcher died, how long a process may take to save and end


class StopWhileWaiting(BaseException):
    """A stop was asked for while the run waited for data that did not come within WAIT_GRACE_S.
    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way (a dataset's skip of
    unreadable images, a loader's retry) may swallow it."""


class StopRequest:
    """Installs the handlers on entry, restores the previous ones on exit; `signum` is the first
    stop signal received (None until then)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._waiting_since: float | None = None  # monotonic time the current wait for data began (None: not waiting)
        self._requested_at = 0.0
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def waiting(self, batches: Iterable) -> Iterator:
        """`batches`, with every wait for the next one bounded once a stop is asked for: a wait still
        going WAIT_GRACE_S after the stop (and after the wait began) raises StopWhileWaiting, so a read
        that never returns (a stuck file, a stalled mount) cannot hold a stop back. Waits before a stop
        are bounded by the reads' own limit (mpp.data.readlimit) and the loader's timeout."""
        it = iter(batches)
        while True:
            self._waiting_since = time.monotonic()
            if self.requested:
                self._arm()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self._waiting_since = None
            yield item

    def _arm(self) -> None:
        """A timer that, once the current wait has outlasted the grace, signals this process again
        (SIGTERM, whose handler stays ours): the signal interrupts the blocked call, and `_handle`
        raises out of it."""
        if self._timer is not None or not self._previous:
            return
        self._timer = threading.Timer(WAIT_GRACE_S, self._nudge)
        self._timer.daemon = True
        self._timer.start()

    def _nudge(self) -> None:
        self._timer = None
        since = self._waiting_since
        if since is None or not self._previous:
            return  # the data came; a later wait arms its own timer
        left = max(since, self._requested_at) + WAIT_GRACE_S - time.monotonic()
        if left > 0.05:  # a newer wait: give it its whole grace
            self._timer = threading.Timer(left, self._nudge)
            self._timer.daemon = True
            self._timer.start()
            return
        os.kill(os.getpid(), signal.SIGTERM)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGTERM and self._waiting_since is not None:
            since = max(self._waiting_since, self._requested_at)
            if time.monotonic() - since >= WAIT_GRACE_S - 0.05:  # the nudge, or a scheduler's later SIGTERM
                raise StopWhileWaiting()
        if self.signum is None:
            self.signum = signum
            self._requested_at = time.monotonic()
            if self._waiting_since is not None:
                self._arm()
            if os.environ.get("RANK", "0") == "0":  # one message, not one per process
                print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint"
                      + (" (Ctrl-C again to quit now)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        if signum == signal.SIGINT:  # the second Ctrl-C is Python's usual KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


def loader_worker_init(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: stop signals are the main process's to handle (it finishes the
    step and saves); a worker still ends when the main process does (`end_workers_at_exit`), and
    within seconds of its death (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_registered = False


def end_workers_at_exit() -> None:
    """Make this process SIGKILL its remaining daemonic children (loader workers) when it exits,
    however it exits, before multiprocessing waits for them. Idempotent; call it where loaders
    with workers are made.

    Registered after multiprocessing's own exit hook (imported with torch), so it runs first. The
    workers hold nothing to flush: multiprocessing would terminate them at this point anyway."""
    global _registered
    if not _registered:
        atexit.register(_kill_daemonic_children)
        _registered = True


def end_loader_workers() -> None:
    """SIGKILL this process's loader workers now (they ignore SIGTERM, and one stuck in a read would
    keep PyTorch's shutdown waiting on it): for a run that gives up on its data."""
    _kill_daemonic_children()


def _kill_daemonic_children() -> None:
    import multiprocessing

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # PyTorch's SIGCHLD hook would report each killed worker as a failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=5)


_watching = False


def end_with_launcher() -> None:
    """Under a launcher (`accelerate launch` on several processes, torchrun: LOCAL_RANK is set), end
    this process when the launcher dies: killed with SIGKILL, it cannot stop its children, which would
    train on as orphans writing the run directory. The check is the parent process id changing
    (the orphan was reparented), polled every LAUNCHER_POLL_S; then a SIGTERM to itself (a training
    run saves and stops, see StopRequest) and, if it has not ended ORPHAN_LIMIT_S later (a save
    waiting on a peer that is gone), an exit without cleanup. Idempotent."""
    global _watching
    if _watching or "LOCAL_RANK" not in os.environ or not hasattr(os, "getppid"):
        return
    _watching = True
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while os.getppid() == parent:
            if done.wait(LAUNCHER_POLL_S):
                return  # this process is exiting: no thread of ours is left running into its finalization
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process
            print(f"warning: the launcher (process {parent}) of this run is gone: stopping too (a training run "
                  "saves its step first), so that no process outlives it; rerun the launch with --resume to "
                  "continue", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        if not done.wait(ORPHAN_LIMIT_S):  # set as the process exits: it saved and ended in time
            os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()

    def stop_watching() -> None:
        done.set()
        thread.join(timeout=LAUNCHER_POLL_S + 1)

    atexit.register(stop_watching)
