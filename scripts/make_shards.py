"""Write an image folder (`train/<class>/<image>` plus `test/` or `val/`) as tar shards in the
webdataset layout (`<key>.jpg` + `<key>.cls`), with the class names in classes.txt, for
`--dataset shards:OUT`; an unlabelled folder (mpp.data.folders' layouts) gives shards of `<key>.jpg`
only. Each split's images are shuffled once (by --seed) before sharding, so a stream's shard order
and buffer mix classes from the first step. The image files are copied as they
are, not re-encoded. They are written into a hidden folder beside OUT, renamed to OUT when every
shard and classes.txt are written: an interrupted run (Ctrl-C, SIGTERM, a full disk) leaves no
partial OUT that would train on part of the data.

    python scripts/make_shards.py data/cifar10 data/cifar10-shards --per-shard 5000
"""
from __future__ import annotations

import random
import shutil
import signal
import sys
from pathlib import Path

from mpp.core.config import AT_LEAST_1, Parser, Range, number_flag
from mpp.core.errors import UsageError, cli_main
from mpp.core.files import atomic_write, writable_dir
from mpp.data.folders import folder_layout, folder_listing
from mpp.data.shards import CLASS_FILES, write_shards


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the image folder: train/<class>/<image> plus test/ or val/, or unlabelled images")
    p.add_argument("out", help="an empty (or new) folder for train-*.tar, test-*.tar and classes.txt")
    number_flag(p, "--per-shard", int, AT_LEAST_1, default=10_000, help="images per tar shard")
    number_flag(p, "--seed", int, Range(0), default=0, help="the shuffle of each split before sharding")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root, out = Path(args.folder).expanduser(), Path(args.out).expanduser()
    if not root.is_dir():
        raise UsageError(f"'{root}' is not a folder: pass a folder of images (train/<class>/<image> for classes)")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"'{out}' is not empty: pass an empty or new output folder")
    if out.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"'{out}' is inside the image folder '{root}': pass an output folder outside it")
    _, test_folder = folder_layout(root, str(root))
    listings = {split: folder_listing(root, str(root), split)
                for split in ("train", "test") if split == "train" or test_folder}
    writable_dir(out.parent, "OUT's parent folder")
    staging = out.parent / f".{out.name}.partial"  # ours by name: a stale one is an interrupted run's
    shutil.rmtree(staging, ignore_errors=True)
    signal.signal(signal.SIGTERM, stopped)  # as Ctrl-C: the staging folder goes, OUT was never there
    try:
        for split, listing in listings.items():
            order = list(zip(listing.paths, listing.labels or [None] * len(listing.paths), strict=True))
            random.Random(args.seed).shuffle(order)
            samples = ((Path(p).read_bytes(), Path(p).suffix[1:].lower(), label) for p, label in order)
            shards = write_shards(samples, staging, split, args.per_shard)
            print(f"{split}: {len(order)} images in {len(shards)} shards")
        names = listings["train"].class_names
        if names is not None:
            atomic_write(staging / CLASS_FILES[0], lambda f: f.write("".join(f"{n}\n" for n in names).encode()))
        staging.replace(out)  # atomic; onto OUT only when it is absent or empty (checked above)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    what = f"{len(names)} classes in {CLASS_FILES[0]}" if names is not None else "unlabelled (no cls members)"
    print(f"wrote {out}: {what}; train with --dataset shards:{out}")


def stopped(signum, frame) -> None:
    print(f"stopped by signal {signum}: no shards written", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
