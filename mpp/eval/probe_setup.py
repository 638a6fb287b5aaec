"""What the probe CLIs (eval/fewshot.py, eval/linear_probe.py) share: their model and runtime flags,
the model they evaluate (a run's newest checkpoint, a named checkpoint, or a random init of a run's
architecture or of a preset), the head of their report (what was probed: mpp.run.records.ProbeHead),
and where the report goes (a JSON file beside the run, and its headline scalars in the run's
TensorBoard at the checkpoint's step).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch

from mpp.core.config import AT_LEAST_1, NON_NEGATIVE, SEED, Range, device_flag, number_flag
from mpp.core.errors import UsageError, disk_refused
from mpp.core.files import write_json
from mpp.core.runlock import ReportLock
from mpp.data.sources import DEFAULT_DATASET
from mpp.eval import timm_io
from mpp.eval.features import FEATURES, is_main_process, process_device, process_group
from mpp.model.kernel_policy import MODES, KernelPolicy, RunShapes
from mpp.model.vit import ViT, ViTConfig, vit_config
from mpp.run.checkpoint import KernelsFor, load_checkpoint, load_run
from mpp.run.records import ImportedModel, LayerSweep, ProbeHead, Report
from mpp.run.rundir import CONFIG, TENSORBOARD, run_dir_of, step_of_name
from mpp.run.runtime import choose_kernels, compile_blocks

DEFAULT_RUN = "runs/mpp"  # where scripts/pretrain_mpp.py writes by default (TrainConfig.output_dir)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that pick the model and the data."""
    p.add_argument("--run", metavar="RUN_DIR", help=f"run directory or checkpoint file (default: {DEFAULT_RUN})")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained ViT of the run's architecture")
    p.add_argument("--model", metavar="PRESET", help="with --random-init and no --run: an untrained preset (Micro/4)")
    number_flag(p, "--seed", int, SEED, help="initialisation seed of --random-init (default: the run's seed, or 0)")
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (default: the run's training dataset)")
    number_flag(p, "--image-size", int, AT_LEAST_1, metavar="S", help="input pixels (default: the run's or the preset's)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say how features are computed."""
    number_flag(p, "--batch-size", int, AT_LEAST_1, default=256, help="images per forward pass (256)")
    number_flag(p, "--num-workers", int, Range(0, 256), default=0, help="DataLoader worker processes (0)")
    p.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if there is one)")
    p.add_argument("--kernels", default="", choices=MODES,
                   help="attention/LayerNorm: auto (ours where verified and faster) | triton | torch ($MPP_KERNELS or auto)")
    p.add_argument("--kernel-cache", default="", metavar="DIR", help="the kernels' verdict cache; off: measure again "
                   "($MPP_KERNEL_CACHE or ~/.cache/mpp/kernels)")
    p.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks")
    p.add_argument("--features", default="token", choices=FEATURES, help="token: the class token's pre-logits (the "
                   "paper's); avg: the mean patch token (default files get an -avg suffix)")
    p.add_argument("--layers", nargs="+", metavar="L", help="also probe every block's class token and mean patch "
                   "token, with and without the final LayerNorm, from one forward pass: all, or block numbers "
                   "(1..depth; -1 is the last)")
    p.add_argument("--references", default=True, action=argparse.BooleanOptionalAction,
                   help="score the same probe on the same images for a random init of the same architecture "
                   "and for the raw pixels at the model's resolution (above 32 px: averaged to 32×32) (default: on)")


def add_subset_flags(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    """--max-train (with `train`) and --max-test: fixed random subsets of the splits."""
    if train:
        number_flag(p, "--max-train", int, NON_NEGATIVE, default=0, metavar="N",
                    help="use a fixed random N training images; 0 = all (0)")
    number_flag(p, "--max-test", int, NON_NEGATIVE, default=0, metavar="N",
                help="test on a fixed random N images; 0 = all (0)")


def add_output_flag(p: argparse.ArgumentParser, report: str) -> None:
    p.add_argument("--output", metavar="PATH", help=f"results JSON (default: RUN_DIR/{report}[-random-init].json)")


def parse_probe_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A probe CLI's flags, each checked as parsed, then the checks that span flags."""
    args = parser.parse_args(argv)
    check_flags(args)
    return args


# How a probe CLI's printed table names a report's reference rows.
REFERENCE_NAMES = {"random_init": "random init", "pixels": "raw pixels"}


def check_flags(args: argparse.Namespace) -> None:
    """The checks that span flags (each flag's own range is checked as it is parsed)."""
    if args.model and not args.output:
        raise UsageError("--model has no run directory to write to: pass --output PATH for the results JSON")
    if timm_io.is_timm_source(args.run):
        if not args.output:
            raise UsageError(f"--run {args.run} is a timm model, with no run directory to write to: "
                             "pass --output PATH for the results JSON")
        if args.random_init or args.model:
            raise UsageError("--random-init/--model build our own untrained ViT: drop them for a timm --run "
                             "(its report already holds the random-init reference)")


def probe_kernels(args) -> KernelsFor:
    """The kernels of a probe's ViT, decided once at its shapes: forward only, fp32, --batch-size images."""
    policy = KernelPolicy.from_flags(args.kernels, args.kernel_cache)
    state = process_group()

    def kernels_for(vit_config: ViTConfig):
        # under --compile, our kernels are weighed against compiled PyTorch (Inductor fuses its norms)
        shapes = RunShapes.of(vit_config, args.batch_size, "float32", backward=False, compiled=args.compile)
        return choose_kernels(policy, shapes, process_device(args.device, state), state).kernels

    return kernels_for


def build_model(args) -> tuple[dict | None, torch.nn.Module, Path | None, Path | None]:
    """(run config or None, ViT, run dir or None, checkpoint path or None) from the flags."""
    kernels_for = probe_kernels(args)
    if args.model:  # a preset: the random-init baseline without any run
        if not args.random_init or args.run:
            raise UsageError("--model builds an untrained preset: add --random-init and drop --run "
                             "(a trained model comes from --run alone)")
        torch.manual_seed(args.seed or 0)
        vit_cfg = vit_config(args.model, image_size=args.image_size)
        return None, ViT(vit_cfg, kernels_for(vit_cfg)), None, None
    run = Path(args.run or DEFAULT_RUN)
    size = {"image_size": args.image_size} if args.image_size else {}
    if not args.random_init:
        config, vit, path = load_run(run, kernels_for, **size)
        return config, vit, run_dir_of(run), path
    if run.is_dir() and (run / CONFIG).is_file():  # a run that has not saved a checkpoint yet
        config = json.loads((run / CONFIG).read_text())
    else:
        config = load_run(run)[0]  # the run's errors for a missing dir or a run without checkpoints
    torch.manual_seed(config["train"]["seed"] if args.seed is None else args.seed)
    vit_cfg = ViTConfig(**{**config["vit"], **size})
    return config, ViT(vit_cfg, kernels_for(vit_cfg)), run_dir_of(run), None


def reference_seed(args, config: dict | None) -> int:
    """The random-init reference's seed: --seed, else the run's, else 0 (what --random-init uses)."""
    return args.seed if args.seed is not None else (config or {}).get("train", {}).get("seed", 0)


def random_init_like(args, target: "ProbeTarget") -> torch.nn.Module | None:
    """The random-init reference for `target`: an untrained ViT of its architecture, seeded as
    `--random-init` seeds it (--seed, else the run's seed, else 0); None when the target is one."""
    if args.random_init or not args.references:
        return None
    torch.manual_seed(reference_seed(args, target.config))
    # The same config, head included: building the head draws from the generator, so a headless twin
    # would be another network than the one `--random-init` (and the run's own step 0) evaluates.
    vit = ViT(target.vit.config, target.vit.kernels)
    if args.compile:
        compile_blocks(vit)
    return vit


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint: from its file name when that says it, else from its "step" entry (0 if none)."""
    if (step := step_of_name(path)) is not None:  # no second load needed
        return step
    try:  # weights-only like every load; mmap: reads the small "step" entry, not the tensors
        return int(load_checkpoint(path, mmap=True).get("step", 0))
    except (UsageError, TypeError, ValueError):  # unreadable, or a step that is no number
        return 0


@dataclasses.dataclass
class ProbeTarget:
    """What a probe CLI evaluates, from its flags: the model, where it came from, where results go."""
    config: dict | None  # the run's config (None for a bare --model preset)
    vit: torch.nn.Module
    run_dir: Path | None
    checkpoint: Path | None
    dataset: str  # --dataset, else the run's training dataset
    prefix: str  # e.g. "fewshot" or "fewshot_random_init": TensorBoard tag and default file name
    step: int  # the checkpoint's step (0 for a random init)
    imported: ImportedModel | None = None  # a timm --run's record (mpp.eval.timm_io.Imported.record), else None

    def report_head(self, args) -> ProbeHead:
        return ProbeHead(init="random" if args.random_init else "trained",
                         run=str(self.run_dir) if self.run_dir else None,
                         checkpoint=str(self.checkpoint) if self.checkpoint else None, step=self.step,
                         features=args.features, kernels=self.vit.kernels.names(),  # which ops computed the features
                         reference_seed=reference_seed(args, self.config) if args.references and not args.random_init
                         else None, imported=self.imported)  # written for a timm --run only

    def output(self, args) -> Path:  # RUN_DIR/<prefix with dashes>.json unless --output
        return Path(args.output) if args.output else self.run_dir / f"{self.prefix.replace('_', '-')}.json"


def probe_target(args, name: str) -> ProbeTarget:
    """The model and settings a probe CLI (`name`: fewshot, linear_probe) evaluates."""
    if timm_io.is_timm_source(args.run):
        return timm_target(args, name)
    config, vit, run_dir, ckpt_path = build_model(args)
    if args.compile:
        compile_blocks(vit)
    dataset = args.dataset or (config or {}).get("train", {}).get("dataset", DEFAULT_DATASET)
    prefix = f"{name}_random_init" if args.random_init else name
    prefix += "_avg" if args.features == "avg" else ""
    return ProbeTarget(config, vit, run_dir, ckpt_path, dataset, prefix, checkpoint_step(ckpt_path) if ckpt_path else 0)


def timm_target(args, name: str) -> ProbeTarget:
    """A timm --run (mpp.eval.timm_io): converted once into our ViT, built with the probe's kernels. The probe
    normalises with mpp.data.sources's mean/std as for our runs; the model's own is recorded in the report."""
    imported = timm_io.load_source(args.run, args.image_size)
    vit = imported.rebuilt(probe_kernels(args)(imported.vit.config))
    if args.compile:
        compile_blocks(vit)
    prefix = name + ("_avg" if args.features == "avg" else "")
    return ProbeTarget(None, vit.eval(), None, None, args.dataset or DEFAULT_DATASET, prefix, 0,
                       ImportedModel(**imported.record()))


def claim_report(output: Path) -> contextlib.AbstractContextManager:
    """Check that `output` can be written, then hold it (a `with` block) until the report is written:
    a second probe on the same report meanwhile is refused in one line. The main process holds it;
    the other processes of a launch write nothing."""
    check_writable(output)
    return ReportLock(output) if is_main_process() else contextlib.nullcontext()


def check_writable(output: Path) -> None:
    """Fail before the embedding, not after it, when the results cannot be written."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write '{output}' ({e.strerror}): pass a writable --output") from e
    if output.is_dir() or not os.access(output.parent, os.W_OK):
        problem = "is a directory" if output.is_dir() else "is in a read-only folder"
        raise UsageError(f"cannot write '{output}' ({problem}): pass a writable --output")


def save_report(target: ProbeTarget, output: Path, report: Report, scalars: dict[str, float], folder: str) -> None:
    """Write the JSON report (`report.to_json()`), and its headline scalars to TensorBoard beside the run's own curves
    (RUN/tensorboard/<folder>), at the checkpoint's step so probes of successive checkpoints line up."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, report.to_json())
    except OSError as e:
        raise UsageError(disk_refused(e) or f"cannot write '{output}' ({e.strerror}): pass a writable --output") from e
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str((target.run_dir or output.parent) / TENSORBOARD / folder)) as tb:
        for tag, value in scalars.items():
            tb.add_scalar(tag, value, global_step=target.step)
    print(f"wrote {output}")


def layer_lines(layers: LayerSweep, value, what: str, pixels=None) -> list[str]:
    """A printed table of a layer sweep: one row per feature variant (pool, norm), one column per
    block, `value(result)` in % in each cell; the same rows for the random init when the sweep has
    them, the raw `pixels` reference's result as a row, then the model's best cell; `what` names the
    number shown."""
    blocks = layers.blocks
    lines = [f"by block ({what}, %):", f"{'feature':>24} | " + " ".join(f"{b:>6}" for b in blocks)]
    for results, label in ((layers.results, ""), (layers.random_init, " (random init)")):
        for variant in layers.variants if results is not None else []:
            cells = []
            for b in blocks:
                result = results.get(f"{b}/{variant}")
                cells.append(f"{100 * value(result):6.1f}" if result is not None else f"{'–':>6}")
            lines.append(f"{variant + label:>24} | " + " ".join(cells))
    if pixels is not None:
        lines.append(f"{'raw pixels':>24} | " + " ".join(f"{100 * value(pixels):6.1f}" for _ in blocks))
    best = max(layers.results, key=lambda n: value(layers.results[n]))
    lines.append(f"best: block {best} ({100 * value(layers.results[best]):.1f}%)")
    return lines
