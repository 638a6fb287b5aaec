"""Training throughput: our ViT against timm's same-config VisionTransformer, for MPP and supervised.

    python scripts/bench_train.py --model Ti/4 --batch-size 128 --dataset data/cifar10      # CPU, fp32
    python scripts/bench_train.py --model S/16 --batch-size 32 --dataset data/imagenette
    python scripts/bench_train.py --model B/16 --batch-size 128 --dtype bf16 --compile      # GPU

One training step is what `mpp/train/pretrain.py` does per batch: forward, backward, gradient clipping and
an AdamW step, here on a fixed batch of random images so that only the model is timed. The four
cases (ours and timm, each MPP and supervised) take turns, one round after another in one process,
every other round in reverse order. Every ratio is the median over pairs of rounds (one in each
order) of the pair's total time of one side over the other's, with a distribution-free 95%
interval for that median: within a pair both sides sit at the same mean time, so a slow spell or a
steady drift of a shared, noisy machine hits both alike. timm's model is wrapped only
to expose its patch embedding and its blocks to the same MPP objective; both sides run the same
objective, optimizer and clipping. Our ViT's attention and LayerNorm are decided as training decides
them (`mpp.model.kernel_policy.resolve`, `--kernels`), once per objective at the step's own shapes (the last
block computes the corrupted patches alone for MPP, the class token alone for supervised); the
verdicts, with their error and timing figures, go into the JSON.

Reported per case: step time, images/s, peak memory of a step (parameters, optimizer state and
everything the step allocates), model FLOPs per image (counted by PyTorch's FLOP counter over a
forward and backward) and MFU against a matmul of the same dtype measured in this run; with
`--profile TOP`, each case's TOP operators by self time in one profiled step. The data
pipeline is timed alone, before the models (as training starts its loader workers before its first
step): images/s delivered by the training DataLoader with the real augmentation, to show that it
outruns the model. Writes benchmarks/results/train-<device>-<model>-<size>px-<dtype>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(REPO := Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from mpp.bench.cases import (
    IMPLS,
    LEGS,
    NUM_CLASSES,
    OBJECTIVES,
    Case,
    choose_kernels,
    compared,
    leg_kernels,
    time_rounds,
)
from mpp.bench.costs import (
    flops_per_image,
    matmul_ceiling,
    profile_step,
    step_peak_bytes,
)
from mpp.bench.loader import loader_rate
from mpp.bench.report import device_name, markdown, result_name
from mpp.bench.stats import median_interval, paired_ratios
from mpp.core.config import AT_LEAST_1, NON_NEGATIVE, Parser, Range, number_flag
from mpp.core.errors import BadField, cli_main
from mpp.core.files import write_json
from mpp.core.provenance import git_commit, versions
from mpp.model.kernel_policy import KernelPolicy
from mpp.model.ops import TORCH
from mpp.model.vit import vit_config
from mpp.run.runtime import reuse_freed_memory


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Ti/4", help="ViT preset, e.g. Ti/4 (32 px), S/16, B/16 (224 px)")
    number_flag(p, "--image-size", int, NON_NEGATIVE, default=0, help="0: the preset's")
    number_flag(p, "--batch-size", int, AT_LEAST_1, default=128)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast, as --mixed-precision bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                   help="with --compile: the whole objective (one graph), or each encoder block in place as "
                        "training's --compile does (one block's compilation serves all: seconds, not minutes)")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="",
                   help="ours: attention/LayerNorm, decided per objective at this benchmark's shapes "
                        "(mpp.model.kernel_policy.resolve; default $MPP_KERNELS, else auto); MPP_KERNELS_OFF keeps "
                        "named ops on PyTorch")
    p.add_argument("--kernel-cache", default="", help="verdict cache folder; off: measure every run "
                                                      "(default $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels)")
    number_flag(p, "--rounds", int, Range(2), default=8,
                help="rounds of timing, each timing every case in turn; ratios pair them up, so even")
    number_flag(p, "--steps", int, AT_LEAST_1, default=3, help="steps per case per round")
    number_flag(p, "--warmup", int, NON_NEGATIVE, default=2,
                help="untimed steps per case first (compilation happens here)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--legs", nargs="+", choices=list(LEGS), default=[],
                   help="MPP only, instead of --impls: timm (SDPA), ours-torch (PyTorch's ops), ours-triton (every "
                        "kernel forced), ours-no-ln (LayerNorm kernels off); each ours-* leg's ratio over timm")
    p.add_argument("--dataset", default="digits", help="for the loader timing: digits | image folder | hf:NAME")
    number_flag(p, "--num-workers", int, Range(0, 256), default=2,
                help="loader worker processes, as --num-workers of training")
    number_flag(p, "--loader-batches", int, NON_NEGATIVE, default=20, help="batches timed from the loader; 0 skips it")
    number_flag(p, "--threads", int, Range(0, 4096), default=0, help="CPU: torch threads; 0: all cores")
    p.add_argument("--default-malloc", action="store_true",
                   help="CPU: leave glibc's malloc as it is instead of what training does "
                        "(mpp.run.runtime.reuse_freed_memory)")
    number_flag(p, "--profile", int, NON_NEGATIVE, default=0, metavar="TOP",
                   help="after the timing, profile one step of each case and report its TOP operators by self time")
    p.add_argument("--output", default="", help="JSON path; default benchmarks/results/train-<device>-<setup>.json")
    return p



def case_row(case: Case, batch: int, ceiling: float, flops: float) -> dict:
    """One case's figures: median step time over the rounds, throughput, memory, FLOPs and MFU."""
    step_ms = median(case.step_ms)
    images_per_s = batch / (step_ms * 1e-3)
    return {"case": case.name, "impl": case.impl, "objective": case.objective, "step_ms": step_ms,
            "step_ms_rounds": case.step_ms, "minor_faults_rounds": case.faults,
            "images_per_s": images_per_s, "peak_mb": step_peak_bytes(case) / 2**20,
            "resident_mb": case.resident_bytes() / 2**20,
            "gflops_per_image": flops / 1e9, "mfu": flops * images_per_s / ceiling}


def summarize(args, device: torch.device, S: int, cases: list[Case], choices: dict, reused: bool,
              ceiling: float, loader: dict | None) -> dict:
    """The result JSON: every case's figures and the ratios between them, medians over pairs of rounds."""
    flops, rows = {}, []
    for case in cases:  # each case's FLOPs, then its figures (its peak memory takes one more step)
        flops[case.name] = flops_per_image(case)
        rows.append(case_row(case, args.batch_size, ceiling, flops[case.name]))
    pairs_of = compared(cases)
    pairs = {k: paired_ratios(a.step_ms, b.step_ms) for k, (a, b) in pairs_of.items()}
    intervals = {k: median_interval(v) for k, v in pairs.items()}
    result = {
        "device": device_name(device), "versions": versions(), "args": vars(args), "image_size": S,
        "commit": git_commit(REPO),
        "kernels": {o: c.record() for o, c in choices.items()},  # our ViT's verdicts, per objective
        "malloc_reuses_freed_memory": reused, f"matmul_ceiling_{args.dtype}_TFLOPs": ceiling / 1e12,
        "cases": rows, "ratios": {k: median(v) for k, v in pairs.items()},
        "ratio_intervals": {k: {"low": lo, "high": hi, "coverage": cov} for k, (lo, hi, cov) in intervals.items()},
        "ratios_per_pair": pairs,
        # The earlier estimator, kept for comparison with results before the pairs: median of per-round ratios.
        "ratios_median_per_round": {k: median(x / y for x, y in zip(a.step_ms, b.step_ms, strict=True))
                                    for k, (a, b) in pairs_of.items()},
        "flop_ratios": {k: flops[a.name] / flops[b.name] for k, (a, b) in pairs_of.items()},
    }
    if args.profile:  # after the timing, so that the profiler's overhead touches none of it
        result["profile"] = {case.name: profile_step(case, args.profile) for case in cases}
    if loader:
        result["loader"] = loader
        result["loader_headroom"] = loader["images_per_s"] / max(r["images_per_s"] for r in rows)
    return result


def print_summary(result: dict, args, choices: dict) -> None:
    r = result["ratio_intervals"]
    print(f"\n{result['device']}, torch {torch.__version__}; {args.model} {result['image_size']} px, batch "
          f"{args.batch_size}, {args.dtype}{', compile' if args.compile else ''}; kernels (ours): "
          + ("; ".join(f"{o} {c.kernels.names()}" for o, c in choices.items()) or "n/a"))
    print(f"{'case':<16}{'images/s':>10}{'step ms':>10}{'peak MB':>10}{'GFLOP/img':>11}{'MFU':>8}")
    for c in result["cases"]:
        print(f"{c['case']:<16}{c['images_per_s']:>10.1f}{c['step_ms']:>10.1f}"
              f"{c['peak_mb']:>10.0f}{c['gflops_per_image']:>11.3f}{100 * c['mfu']:>7.1f}%")
    print("ratios (median over pairs of rounds, 95% interval): " + ", ".join(
        f"{k} {v:.3f} [{r[k]['low']:.3f}, {r[k]['high']:.3f}]" for k, v in result["ratios"].items()))
    if "loader" in result:
        print(f"loader: {result['loader']['images_per_s']:.0f} images/s with {args.num_workers} workers = "
              f"{result['loader_headroom']:.1f}× the fastest case")
    for name, ops in result.get("profile", {}).items():
        print(f"profile, {name}: " + ", ".join(f"{o['op']} {100 * o['share']:.1f}%" for o in ops))
    print(f"README rows:\n{markdown(result) if len(result['ratios']) == 4 else '(needs both impls)'}")


def leg_cases(args, config, images, labels, dtype, device) -> tuple[list[Case], dict, dict[str, str]]:
    """(the legs' MPP cases, our legs' kernel choices, {leg: why it was not timed})."""
    cases, choices, skipped = [], {}, {}
    for leg in args.legs:
        choice = None if LEGS[leg] is None else leg_kernels(leg, config, args.batch_size, dtype, device, args.compile)
        if isinstance(choice, str):
            print(f"{leg}: not timed: {choice}", flush=True)
            skipped[leg] = choice
            continue
        if choice is not None:
            choices[leg] = choice
            for line in choice.lines():
                print(f"{leg}: {line}", flush=True)
        cases.append(Case("timm" if choice is None else "ours", "mpp", config, images, labels, dtype, args.compile,
                          TORCH if choice is None else choice.kernels, args.compile_scope,
                          label="" if choice is None else leg))
    return cases, choices, skipped


@cli_main  # --kernels triton meeting a failed check, or too small a --dataset: one line, exit code 2
def main() -> None:
    args = build_parser().parse_args()
    policy = KernelPolicy.from_flags(args.kernels, args.kernel_cache)  # also reads MPP_KERNELS_OFF
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As the trainer does on CPU; process-wide, so it applies to both sides of every ratio.
    reused = device.type == "cpu" and not args.default_malloc and reuse_freed_memory()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        config = vit_config(args.model, image_size=args.image_size or None)
    except BadField as e:  # the model's own terms: said in this script's flag
        if e.field != "image_size":
            raise
        raise e.flag_advised("--image-size") from e
    S = config.image_size
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, S, S, device=device)  # float32 [B, 3, S, S] in [0, 1], as the loader's
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)  # int64 [B]

    # The loader first, as training starts its workers before its first step. Workers forked later,
    # from a process whose heap the steps have grown, spend their first batches faulting in copies
    # of the pages they inherited: timed after the four cases, CIFAR-10 delivered 349 images/s
    # over 20 batches instead of 1,300-1,750.
    loader = loader_rate(args.dataset, S, args.batch_size, args.num_workers, args.loader_batches) \
        if args.loader_batches > 0 else None

    ceiling = matmul_ceiling(device, dtype)
    # Our ViT's kernels, decided once per objective at this benchmark's shapes, as training decides them.
    if args.legs:
        cases, choices, skipped = leg_cases(args, config, images, labels, dtype, device)
    else:
        choices = (choose_kernels(policy, config, args.batch_size, dtype, device, compiled=args.compile)
                   if "ours" in args.impls else {})  # under --compile, against compiled PyTorch (as training)
        cases, skipped = [Case(i, o, config, images, labels, dtype, args.compile,
                               choices[o].kernels if i == "ours" else TORCH, args.compile_scope)
                          for i in args.impls for o in OBJECTIVES], {}
    name = result_name(device, args.model, S, args.dtype, args.compile, args.compile_scope, args.default_malloc)
    out = Path(args.output or REPO / "benchmarks" / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def partial(rounds_done: int) -> None:  # rewritten after every round: a time limit keeps what was timed
        write_json(out, {"partial": True, "rounds_done": rounds_done, "device": device_name(device),
                         "args": vars(args), "commit": git_commit(REPO), "versions": versions(),
                         "kernels": {o: c.record() for o, c in choices.items()},
                         "step_ms_rounds": {c.name: c.step_ms for c in cases}})

    time_rounds(cases, args.rounds, args.steps, args.warmup, after_round=partial)
    ceiling = max(ceiling, matmul_ceiling(device, dtype))  # before and after the rounds
    result = summarize(args, device, S, cases, choices, reused, ceiling, loader)
    if skipped:
        result["legs_skipped"] = skipped  # a forced kernel that failed its check: that leg was not timed
    write_json(out, result)
    print_summary(result, args, choices)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
