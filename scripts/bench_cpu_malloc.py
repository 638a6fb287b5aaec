"""What `mpp.run.runtime.reuse_freed_memory` is worth on CPU: training steps with glibc's malloc as it
comes against malloc keeping freed memory, in fresh processes taking turns.

glibc's default cannot be restored inside a process once changed, so each measurement is a new
process: build the model, warm up, time a few steps of our ViT. Rounds alternate which setting goes
first; the ratio is the median over rounds. Our ViT's kernels are decided in each process as training
decides them (`--kernels`, `mpp.model.kernel_policy.resolve` at the benchmark's shapes; on CPU without Triton's
interpreter that is PyTorch's ops). Writes benchmarks/results/cpu_malloc-<model>.json.

    python scripts/bench_cpu_malloc.py --model Ti/4 --batch-size 128
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

from mpp.bench.cases import OBJECTIVES
from mpp.core.config import AT_LEAST_1, Parser, number_flag
from mpp.core.files import write_json
from mpp.core.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, torch
from mpp.bench.cases import Case, run_shapes, time_steps
from mpp.model.kernel_policy import KernelPolicy, resolve
from mpp.model.vit import vit_config
from mpp.run.runtime import reuse_freed_memory
if {reuse}:
    assert reuse_freed_memory()
config = vit_config({model!r})
policy = KernelPolicy.from_flags({kernels!r}, {cache!r})
choice = resolve(policy, run_shapes(config, {objective!r}, {batch}, torch.float32), "cpu")
torch.manual_seed(0)
S, B = config.image_size, {batch}
case = Case("ours", {objective!r}, config, torch.rand(B, 3, S, S), torch.randint(0, 10, (B,)),
            torch.float32, compile_model=False, kernels=choice.kernels)
for _ in range(2):
    case.step()
print(json.dumps({{"ms": time_steps(case, {steps}), "kernels": choice.record()}}))
"""


def step_ms(args, reuse: bool) -> tuple[float, dict]:
    """(ms per step, the kernel verdicts) of one fresh process."""
    code = CHILD.format(reuse=reuse, model=args.model, batch=args.batch_size,
                        objective=args.objective, steps=args.steps, kernels=args.kernels, cache=args.kernel_cache)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"error: the timed process failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    line = json.loads(out.stdout.strip().splitlines()[-1])
    return line["ms"], line["kernels"]


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Ti/4")
    number_flag(p, "--batch-size", int, AT_LEAST_1, default=128)
    p.add_argument("--objective", choices=OBJECTIVES, default="mpp")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="",
                   help="attention/LayerNorm (default $MPP_KERNELS, else auto); MPP_KERNELS_OFF still applies")
    p.add_argument("--kernel-cache", default="", help="verdict cache folder, or off")
    number_flag(p, "--steps", int, AT_LEAST_1, default=2, help="timed steps per process")
    number_flag(p, "--rounds", int, AT_LEAST_1, default=5)
    p.add_argument("--output", default="", help="JSON path; default benchmarks/results/cpu_malloc-<model>.json")
    return p


def main() -> None:
    args = build_parser().parse_args()

    rounds, kernels = [], None
    for r in range(args.rounds):
        ms = {}
        for reuse in ((True, False) if r % 2 else (False, True)):
            ms["reuse" if reuse else "default"], kernels = step_ms(args, reuse)
        rounds.append(ms)
        print(f"round {r + 1}/{args.rounds}: glibc default {ms['default']:.0f} ms, reusing {ms['reuse']:.0f} ms",
              flush=True)
    speedup = median(m["default"] / m["reuse"] for m in rounds)
    result = {"args": vars(args), "cores": len(os.sched_getaffinity(0)), "rounds_ms": rounds,
              "speedup_median": speedup, "kernels": kernels,
              "commit": git_commit(REPO)}
    model = args.model.replace("/", "-").lower()
    out = Path(args.output or REPO / "benchmarks" / "results" / f"cpu_malloc-{model}.json")
    write_json(out, result)
    print("kernels: " + ", ".join(f"{op} {v['impl']}" for op, v in kernels["verdicts"].items()))
    print(f"keeping freed memory: {speedup:.3f}x the steps/s of glibc's default (median of {args.rounds} rounds)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
