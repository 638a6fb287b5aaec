"""What the probe CLIs (eval/fewshot.py, eval/linear_probe.py, eval/knn.py) share: their flags (from
their config classes, mpp.eval.probe_config), the model they evaluate (a run's newest checkpoint, a
named checkpoint, or a random init of a run's architecture or of a preset), the head of their report
(what was probed: mpp.run.records.ProbeHead), and where the report goes (a JSON file beside the run,
and its headline scalars in the run's TensorBoard at the checkpoint's step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import TypeVar

import torch

from mpp.core.config import Parser, add_dataclass_flags, dataclass_from_args
from mpp.core.errors import BadField, BadInput, TooFewImages, TooFewShots, UsageError, disk_refused
from mpp.core.files import write_json
from mpp.core.runlock import ReportLock
from mpp.data.sources import DEFAULT_DATASET
from mpp.eval import timm_io
from mpp.eval.features import is_main_process, process_device, process_group
from mpp.eval.probe_config import DEFAULT_RUN, ProbeConfig
from mpp.eval.probe_runs import Embedder
from mpp.model.kernel_policy import KernelPolicy, RunShapes
from mpp.model.vit import ViT, ViTConfig, vit_config
from mpp.run.checkpoint import KernelsFor, load_checkpoint, load_run
from mpp.run.records import ImportedModel, LayerSweep, ProbeHead, Report
from mpp.run.rundir import CONFIG, TENSORBOARD, run_dir_of, step_of_name
from mpp.run.runtime import choose_kernels, compile_blocks

P = TypeVar("P", bound=ProbeConfig)


def build_probe_parser(cls: type[ProbeConfig], description: str) -> Parser:
    """A probe CLI's flags: one per field of its config class (mpp.eval.probe_config), `--config FILE` too."""
    parser = Parser(description=description)
    add_dataclass_flags(parser, cls)
    return parser


def parse_probe_args(cls: type[P], parser: Parser, argv: list[str] | None) -> P:
    """A probe CLI's config from its flags, each checked as parsed, then the checks that span flags."""
    return dataclass_from_args(cls, parser.parse_args(argv)).validate()


# The probe CLIs' flag for each config field a library error names (mpp.core.errors.BadField).
FIELD_FLAGS = {"image_size": "--image-size"}


def flag_advice(error: BadInput) -> UsageError:
    """The probe CLIs' one line for an error the library raised in its own terms: its problem, then
    what to do in these CLIs' flags; `error` itself when they have nothing to add."""
    if isinstance(error, TooFewShots):  # eval/fewshot.py's draws
        return error.advised("pass smaller --shots or a dataset with more examples per class")
    if isinstance(error, TooFewImages):  # eval/linear_probe.py's dev split; its fix says why a class needs 2
        return error.advised("; ".join(filter(None, [error.fix, "pass a larger --max-train or a dataset with "
                                                                  "more images"])))
    if isinstance(error, BadField) and error.field in FIELD_FLAGS:  # --image-size
        return error.flag_advised(FIELD_FLAGS[error.field])
    return error


def with_flag_advice(main):
    """A probe CLI's `main` (under `cli_main`), whose library errors end in its flags (`flag_advice`)."""

    @functools.wraps(main)
    def advised(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BadInput as e:
            worded = flag_advice(e)
            if worded is e:
                raise
            raise worded from e

    return advised


# How a probe CLI's printed table names a report's reference rows.
REFERENCE_NAMES = {"random_init": "random init", "pixels": "raw pixels"}


def embedder(config: ProbeConfig) -> Embedder:
    """How a probe computes its features: --batch-size images at a time on --device, --num-workers loaders."""
    return Embedder(config.batch_size, config.device, config.num_workers)


def probe_kernels(config: ProbeConfig) -> KernelsFor:
    """The kernels of a probe's ViT, decided once at its shapes: forward only, fp32, --batch-size images."""
    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)
    state = process_group()

    def kernels_for(vit_config: ViTConfig):
        # under --compile, our kernels are weighed against compiled PyTorch (Inductor fuses its norms)
        shapes = RunShapes.of(vit_config, config.batch_size, "float32", backward=False, compiled=config.compile)
        return choose_kernels(policy, shapes, process_device(config.device, state), state).kernels

    return kernels_for


def build_model(config: ProbeConfig) -> tuple[dict | None, torch.nn.Module, Path | None, Path | None]:
    """(run config or None, ViT, run dir or None, checkpoint path or None) from the probe's config."""
    kernels_for = probe_kernels(config)
    if config.model:  # a preset: the random-init baseline without any run
        if not config.random_init or config.run:
            raise UsageError("--model builds an untrained preset: add --random-init and drop --run "
                             "(a trained model comes from --run alone)")
        torch.manual_seed(config.seed or 0)
        vit_cfg = vit_config(config.model, image_size=config.image_size)
        return None, ViT(vit_cfg, kernels_for(vit_cfg)), None, None
    run = Path(config.run or DEFAULT_RUN)
    size = {"image_size": config.image_size} if config.image_size else {}
    if not config.random_init:
        run_config, vit, path = load_run(run, kernels_for, **size)
        return run_config, vit, run_dir_of(run), path
    if run.is_dir() and (run / CONFIG).is_file():  # a run that has not saved a checkpoint yet
        run_config = json.loads((run / CONFIG).read_text())
    else:
        run_config = load_run(run)[0]  # the run's errors for a missing dir or a run without checkpoints
    torch.manual_seed(run_config["train"]["seed"] if config.seed is None else config.seed)
    vit_cfg = ViTConfig(**{**run_config["vit"], **size})
    return run_config, ViT(vit_cfg, kernels_for(vit_cfg)), run_dir_of(run), None


def reference_seed(config: ProbeConfig, run_config: dict | None) -> int:
    """The random-init reference's seed: --seed, else the run's, else 0 (what --random-init uses)."""
    return config.seed if config.seed is not None else (run_config or {}).get("train", {}).get("seed", 0)


def random_init_like(config: ProbeConfig, target: "ProbeTarget") -> torch.nn.Module | None:
    """The random-init reference for `target`: an untrained ViT of its architecture, seeded as
    `--random-init` seeds it (--seed, else the run's seed, else 0); None when the target is one."""
    if config.random_init or not config.references:
        return None
    torch.manual_seed(reference_seed(config, target.config))
    # The same config, head included: building the head draws from the generator, so a headless twin
    # would be another network than the one `--random-init` (and the run's own step 0) evaluates.
    vit = ViT(target.vit.config, target.vit.kernels)
    if config.compile:
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
    """What a probe CLI evaluates, from its config: the model, where it came from, where results go."""
    config: dict | None  # the run's config (None for a bare --model preset)
    vit: torch.nn.Module
    run_dir: Path | None
    checkpoint: Path | None
    dataset: str  # --dataset, else the run's training dataset
    prefix: str  # e.g. "fewshot" or "fewshot_random_init": TensorBoard tag and default file name
    step: int  # the checkpoint's step (0 for a random init)
    imported: ImportedModel | None = None  # a timm --run's record (mpp.eval.timm_io.Imported.record), else None

    def report_head(self, config: ProbeConfig) -> ProbeHead:
        return ProbeHead(init="random" if config.random_init else "trained",
                         run=str(self.run_dir) if self.run_dir else None,
                         checkpoint=str(self.checkpoint) if self.checkpoint else None, step=self.step,
                         features=config.features, kernels=self.vit.kernels.names(),  # which ops computed the features
                         reference_seed=reference_seed(config, self.config)
                         if config.references and not config.random_init else None,
                         imported=self.imported)  # written for a timm --run only

    def output(self, config: ProbeConfig) -> Path:  # RUN_DIR/<prefix with dashes>.json unless --output
        return Path(config.output) if config.output else self.run_dir / f"{self.prefix.replace('_', '-')}.json"


def probe_target(config: ProbeConfig, name: str) -> ProbeTarget:
    """The model and settings a probe CLI (`name`: fewshot, linear_probe, knn) evaluates."""
    if timm_io.is_timm_source(config.run):
        return timm_target(config, name)
    run_config, vit, run_dir, ckpt_path = build_model(config)
    if config.compile:
        compile_blocks(vit)
    dataset = config.dataset or (run_config or {}).get("train", {}).get("dataset", DEFAULT_DATASET)
    prefix = f"{name}_random_init" if config.random_init else name
    prefix += "_avg" if config.features == "avg" else ""
    step = checkpoint_step(ckpt_path) if ckpt_path else 0
    return ProbeTarget(run_config, vit, run_dir, ckpt_path, dataset, prefix, step)


def timm_target(config: ProbeConfig, name: str) -> ProbeTarget:
    """A timm --run (mpp.eval.timm_io): converted once into our ViT, built with the probe's kernels. The probe
    normalises with mpp.data.sources's mean/std as for our runs; the model's own is recorded in the report."""
    imported = timm_io.load_source(config.run, config.image_size)
    vit = imported.rebuilt(probe_kernels(config)(imported.vit.config))
    if config.compile:
        compile_blocks(vit)
    prefix = name + ("_avg" if config.features == "avg" else "")
    return ProbeTarget(None, vit.eval(), None, None, config.dataset or DEFAULT_DATASET, prefix, 0,
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
