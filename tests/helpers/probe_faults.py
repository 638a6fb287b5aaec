"""Run a probe CLI with one injected fault: `python tests/helpers/probe_faults.py FAULT PROBE ARGS...`.

PROBE is fewshot, linear_probe or knn; the fault is patched into the real code, then the probe's real
`main(ARGS)` runs, so the process (its report lock, its exit path) is exactly what a user starts.
- slow: the first embedding creates the file $FAULT_MARKER, then waits until $FAULT_RELEASE exists
  (at most 120 s): the probe is mid-run, holding its report, for as long as the test needs.
"""
import os
import sys
import time
from pathlib import Path

import mpp.eval.probe_runs
from eval import fewshot, knn, linear_probe


def slow() -> None:
    embed = mpp.eval.probe_runs.Embedder.__call__
    marker, release = Path(os.environ["FAULT_MARKER"]), Path(os.environ["FAULT_RELEASE"])

    def waiting(self, *args, **kwargs):
        marker.touch()
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return embed(self, *args, **kwargs)

    mpp.eval.probe_runs.Embedder.__call__ = waiting


if __name__ == "__main__":
    {"slow": slow}[sys.argv[1]]()
    {"fewshot": fewshot.main, "linear_probe": linear_probe.main, "knn": knn.main}[sys.argv[2]](sys.argv[3:])
