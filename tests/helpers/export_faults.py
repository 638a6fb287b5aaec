"""Run scripts/export.py with one injected fault: `python tests/helpers/export_faults.py FAULT ARGS...`.

The fault is patched into the library timm writes with, then the real script runs. Each stops the
export at one moment for good, creating the file $FAULT_MARKER, so that a test can SIGKILL it there:
- between: model.safetensors written, config.json not yet (timm's save_config_for_hf never returns);
- mid-write: half of model.safetensors written and on disk.
"""
import os
import runpy
import sys
import time
from pathlib import Path

import safetensors.torch
import timm.models._hub

REPO = Path(__file__).resolve().parents[2]


def stop_here() -> None:
    Path(os.environ["FAULT_MARKER"]).touch()
    time.sleep(600)  # until the test's SIGKILL


def between() -> None:
    timm.models._hub.save_config_for_hf = lambda *args, **kwargs: stop_here()


def mid_write() -> None:
    def torn(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        stop_here()

    safetensors.torch.save_file = torn


if __name__ == "__main__":
    {"between": between, "mid-write": mid_write}[sys.argv[1]]()
    sys.argv = [str(REPO / "scripts" / "export.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
