"""Memory of a streamed pretraining run over a large generated image folder: flat, not growing
with the images read.

Generates N tiny PNGs as `train/<class>/<i>.png` (kept under --folder for the next run), then runs
`scripts/pretrain_mpp.py --streaming` over them for one pass and samples the proportional set
size (PSS: shared pages split fairly) of the run and its loader workers. Prints a table and writes
benchmarks/results/streaming_memory.json.

    python scripts/bench_streaming_memory.py --images 100000
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from mpp.core.config import AT_LEAST_1, Parser, Range, number_flag
from mpp.core.files import write_json
from mpp.core.provenance import git_commit
from mpp.run.rundir import METRICS

REPO = Path(__file__).resolve().parents[1]


def generate(folder: Path, images: int, classes: int = 10) -> float:
    """Seconds spent writing the images (0 when the folder already holds them)."""
    done = folder / f".complete-{images}"
    if done.is_file():
        return 0.0
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("test", 10 * classes)):
        for c in range(classes):
            (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)  # uint8 [n, 16, 16, 3]
        for i in range(count):
            PIL.Image.fromarray(pixels[i]).save(folder / split / f"c{i % classes}" / f"{i}.png")
    done.touch()
    return time.perf_counter() - started


def pss_mb(pid: int) -> float:
    """PSS of a process and all its descendants, in MB (0 for one that just exited)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def last_step(run: Path) -> int:
    try:
        lines = (run / METRICS).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    number_flag(p, "--images", int, AT_LEAST_1, default=100_000, help="training images to generate and stream once")
    p.add_argument("--folder", default=".cache/bench-stream", help="where the images go (reused; git-ignored)")
    number_flag(p, "--batch-size", int, AT_LEAST_1, default=128)
    number_flag(p, "--num-workers", int, Range(0, 256), default=2)
    p.add_argument("--output", default="benchmarks/results/streaming_memory.json")
    return p


def main() -> None:
    args = build_parser().parse_args()

    folder = (REPO / args.folder / str(args.images)).resolve()
    gen_s = generate(folder, args.images)
    steps = args.images // args.batch_size  # one pass over the images
    run = REPO / ".cache" / "bench-stream-run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [sys.executable, "scripts/pretrain_mpp.py", "--dataset", str(folder), "--streaming", "--model", "Micro/4",
           "--image-size", "16", "--batch-size", str(args.batch_size), "--max-steps", str(steps),
           "--num-workers", str(args.num_workers), "--log-every", "5", "--save-every", str(10 * steps),
           "--shuffle-buffer", "10000", "--output-dir", str(run)]
    started = time.perf_counter()
    # stderr (progress bar, warnings) to a file: a pipe nobody reads fills up and stalls the run.
    log = run.with_suffix(".stderr")
    stderr = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    samples = []  # (seconds, step, PSS MB)
    while proc.poll() is None:
        samples.append((time.perf_counter() - started, last_step(run), pss_mb(proc.pid)))
        time.sleep(0.25)
    stderr.close()
    err = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"the streamed run failed ({proc.returncode}):\n{err[-3000:]}")
    wall = time.perf_counter() - started
    first = next((t for t, s, _ in samples if s > 0), wall)
    marks = {}
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):  # the largest PSS seen up to each point of the pass
        upto = [m for _, s, m in samples if 0 < s <= frac * steps]
        marks[f"{int(frac * 100)}%"] = round(max(upto), 1) if upto else None
    result = {
        "images": args.images, "image_size": 16, "generation_s": round(gen_s, 1), "steps": steps,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "shuffle_buffer": 10000,
        "seconds_to_first_logged_step": round(first, 1), "wall_s": round(wall, 1),
        "images_per_s": round(steps * args.batch_size / max(wall - first, 1e-9), 1),
        "peak_pss_mb_up_to": marks, "growth_10_to_100_mb": round(marks["100%"] - marks["10%"], 1),
        "command": " ".join(cmd[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "python": platform.python_version()},
        "commit": git_commit(REPO),
    }
    out = REPO / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"{args.images} images streamed once in {steps} steps ({result['images_per_s']} images/s); "
          f"first step after {result['seconds_to_first_logged_step']} s")
    print("progress | peak PSS (MB), run + loader workers")
    for k, v in marks.items():
        print(f"{k:>8} | {v}")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
