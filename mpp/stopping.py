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

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers on entry, restores the previous ones on exit; `signum` is the first
    stop signal received (None until then)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
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
