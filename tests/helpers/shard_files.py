"""Tar shards for tests: tiny synthetic ones through mpp.data.shards.write_shards, and odd tars written
member by member."""
import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image

from mpp.data.shards import write_shards


def png(rng) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def synthetic_shards(root: Path, train: int = 96, test: int = 12, classes: int = 4, per_shard: int = 24) -> Path:
    """root/train-*.tar, test-*.tar of distinct 8x8 noise PNGs, label i % classes, and classes.txt."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        write_shards(((png(rng), "png", i % classes) for i in range(n)), root, split, per_shard)
    (root / "classes.txt").write_text("".join(f"c{c}\n" for c in range(classes)))
    return root


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
