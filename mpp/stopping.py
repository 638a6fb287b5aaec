"""SIGTERM / SIGINT end a training run at the next step boundary, after a checkpoint.

Schedulers (SLURM, Kubernetes, preemptible clouds) send SIGTERM and wait a grace period; Ctrl-C
sends SIGINT. Either way the run finishes the optimizer step it is in, saves, and exits with
128 + the signal's number, so `--resume` continues where it stopped. A second Ctrl-C quits at once.
"""
from __future__ import annotations

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
