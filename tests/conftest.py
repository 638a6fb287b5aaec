"""Shared test set-up: the kernel mode, and small slices of the real image data in ../shared/data."""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest


def _pin_this_worker() -> None:
    """Under pytest-xdist (`-n N`), each worker on cores of its own, before torch is imported (its
    OpenMP pool is sized when the library loads, and a thread keeps the cores it was started on).
    mpp sizes its torch threads by the cores it may use, and a subprocess inherits them, so N
    workers never put more threads than cores on the machine and every run a test compares
    bitwise keeps one thread count. Oversubscribed, an idle OpenMP thread spin-waits on the core a
    busy one needs: every torch op then cost ~8 ms, and a 6-step run with probes took 170 s, not 10."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and count > 1 and cores:
        share = max(1, len(cores) // count)  # more workers than cores: one core each, shared
        start = (int(worker[2:]) * share) % len(cores)
        os.sched_setaffinity(0, cores[start:start + share])
        os.environ["OMP_NUM_THREADS"] = str(share)


_pin_this_worker()

import torch  # noqa: E402 - after the pinning above

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. Triton reads
# this when a kernel is defined, so it is set before any test module imports triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# The real data sits beside the repo, never inside it; a user's machine may not have it.
SHARED_DATA = REPO.parent / "shared" / "data"
SLICE_CACHE = REPO / ".cache" / "shared-slices"  # git-ignored (.cache/)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep imagefolder's Arrow cache (normally ~/.cache/huggingface/datasets) in the test's tmp dir,
    here and in the subprocesses the test starts."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


@pytest.fixture(autouse=True)
def torch_kernels_by_default(monkeypatch):
    """Tests run the PyTorch ops unless they ask for the kernels (MPP_KERNELS=triton): under the
    interpreter the kernels are exact but far too slow for training tests."""
    monkeypatch.setenv("MPP_KERNELS", "torch")


def shared_slice(archive: str, per_class: dict[str, int], root_in_archive: str = "") -> Path:
    """Extract at most `per_class[split]` images per class of each split in `per_class` from
    ../shared/data/<archive> (members `<root_in_archive>/<split>/<class>/<image>`), and return
    the folder holding `<split>/<class>/<image>`. Reused once complete; skips the test when absent."""
    source = SHARED_DATA / archive
    if not source.is_file():
        pytest.skip(f"../shared/data/{archive} not found: real-data tests need the shared data folder beside the repo")
    name = source.name.removesuffix(".tar.gz").removesuffix(".tgz")
    counts = "-".join(f"{split}{n}" for split, n in sorted(per_class.items()))
    final = SLICE_CACHE / f"{name}-{counts}"
    if final.is_dir():  # only ever created by the rename below, so it is complete
        return final

    SLICE_CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=SLICE_CACHE))
    prefix = root_in_archive.strip("/") + "/" if root_in_archive.strip("/") else ""
    taken: Counter[tuple[str, str]] = Counter()
    try:
        # gzip cannot seek, and the archive's order is not guaranteed: stream through it once.
        with tarfile.open(source, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.startswith(prefix):
                    continue
                parts = member.name[len(prefix):].split("/")
                if len(parts) != 3 or parts[0] not in per_class or ".." in parts:
                    continue
                split, cls, file_name = parts
                if taken[split, cls] >= per_class[split]:
                    continue
                taken[split, cls] += 1
                target = work / split / cls / file_name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        work.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(work, final)  # atomic: an interrupted extraction never looks complete
        except OSError:  # another process finished the same slice first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture
def cifar10_slice() -> Path:
    """20 train + 10 test CIFAR-10 JPEGs per class, as a `train/<class>/`, `test/<class>/` folder."""
    return shared_slice("cifar10/cifar10_jpg.tar.gz", {"train": 20, "test": 10})


@pytest.fixture
def imagenette_slice() -> Path:
    """2 train + 2 val Imagenette JPEGs (128 px) per class, as a `train/<wnid>/`, `val/<wnid>/` folder."""
    return shared_slice("imagenette/imagenette_128px.tar.gz", {"train": 2, "val": 2}, root_in_archive="imagenette")
