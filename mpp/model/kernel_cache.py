"""The kernel verdict cache: what a measurement depends on besides the shapes (the environment), and
the cache files keyed by it, so that a run with the same shapes on the same setup starts at once.

An entry is one JSON file {"key": {"environment", "shapes"}, "measurements": {op: ...}}, named by a
hash of its key, written whole (`mpp.core.files.write_json`); an entry for another key is a miss, and a
torn one or one whose measurements break their schema is a miss with a warning. Any change of device,
driver, torch, triton, the kernels' sources or the verification's measures again.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mpp.core.config import Range
from mpp.core.files import write_json
from mpp.model.ops import OPS
from triton_kernels.gate import interpreting

# The verification's own sources (beside the kernels'): a change to how ours is checked or timed,
# or to the PyTorch ops it is judged against, measures again.
VERIFICATION_SOURCES = ("kernel_policy.py", "kernel_measure.py", "kernel_cache.py", "ops.py")


def source_hash() -> str:
    """sha256 of the kernels' sources and of this verification: any change measures again."""
    import triton_kernels

    kernels = sorted(Path(triton_kernels.__file__).parent.glob("*.py"))
    paths = [*kernels, *(Path(__file__).parent / name for name in VERIFICATION_SOURCES)]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def installed_version(package: str) -> str | None:
    """The installed distribution's version, without importing it (None: not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def driver_version() -> str:
    """The NVIDIA driver's version (e.g. 570.124.06), or the CUDA driver API's when /proc does not say."""
    try:
        words = Path("/proc/driver/nvidia/version").read_text().split()
        return next(w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit())
    except (OSError, StopIteration):
        pass
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    """What the measurements depend on besides the shapes: the cache key's first half."""
    if device.type == "cuda":
        where = {"device": torch.cuda.get_device_name(device),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                 "driver": driver_version(), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}  # one of SDPA's backends: the baseline's speed
    else:
        where = {"device": f"{device.type} (Triton interpreter)" if interpreting() else device.type}
    return {**where, "torch": torch.__version__, "triton": installed_version("triton") or "none",
            "kernel_sources": source_hash()}


def cache_file(folder: Path | None, key: dict) -> Path | None:
    """The entry for `key` in `folder` (None: the cache is off)."""
    if folder is None:
        return None
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")


def read_cache(path: Path | None, key: dict, warn: Callable[[str], None]) -> dict | None:
    """{op: measurement} of the entry at `path`, or None when it is absent or for another key. An entry
    that is torn, or whose measurements break the schema (`measurement_problem`), is ignored with one
    `warn` line: measured again, and rewritten."""
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"unreadable or torn: {type(e).__name__}"
    else:
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
            return None
        problem = entry_problem(entry.get("measurements"))
        if problem is None:
            return entry["measurements"]
    warn(f"warning: kernels: ignoring the verdict cache entry {path} ({problem}): measuring again")
    return None


# What measure_op records: a failure's cause, the check's figures, the timings. The figures only
# say what was measured; a cached entry never admits a kernel by them (mpp.model.kernel_policy rechecks).
FIGURES = {"error": Range(0), "bound": Range(0), "ours_ms": Range(0, low_open=True),
           "torch_ms": Range(0, low_open=True), "ratio": Range(0, low_open=True)}
TIMINGS = ("ours_ms", "torch_ms", "ratio")
CHECKED = ("error", "bound", "worst")


def entry_problem(measurements) -> str | None:
    """Why a cache entry's measurements are not what measure_op writes, or None."""
    if not isinstance(measurements, dict):
        return f"measurements is a {type(measurements).__name__}, not an object"
    for op, m in measurements.items():
        if op not in OPS:
            return f"{op!r} is not an op"
        if not isinstance(m, dict):
            return f"{op} is a {type(m).__name__}, not an object"
        if unknown := sorted(set(m) - {"cause", "head_dim", *FIGURES, *CHECKED}):
            return f"{op} has unknown field(s) {unknown}"
        for name, range_ in FIGURES.items():
            if name in m and range_.problem(name, m[name]) is not None:
                return f"{op}: {range_.problem(name, m[name]).split(':')[0]}"
        if "cause" in m and (not isinstance(m["cause"], str) or not m["cause"]):
            return f"{op}: cause {m['cause']!r} is not a sentence"
        if "head_dim" in m and (isinstance(m["head_dim"], bool) or not isinstance(m["head_dim"], int)):
            return f"{op}: head_dim {m['head_dim']!r} is not a whole number"
        if "worst" in m and not isinstance(m["worst"], str):
            return f"{op}: worst {m['worst']!r} is not an output's name"
        for group in (CHECKED, TIMINGS):
            if 0 < sum(name in m for name in group) < len(group):
                return f"{op} has some of {', '.join(group)} but not all"
        if "cause" not in m and "error" not in m:
            return f"{op} has neither a cause nor a check's figures"
    return None


def write_cache(path: Path | None, key: dict, measurements: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "measurements": measurements})  # atomic: never half an entry
    except OSError as e:  # an unwritable cache costs the next run a measurement, nothing more
        print(f"warning: kernels: cannot write the verdict cache {path} ({e.strerror}): the next run measures again",
              file=sys.stderr, flush=True)
