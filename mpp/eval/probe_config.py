"""What a probe CLI is asked to do (eval/fewshot.py, eval/linear_probe.py, eval/knn.py): one frozen
dataclass per probe, each a `ProbeConfig` (the model, the data, how features are computed, where the
report goes) plus its own protocol's fields. Their fields are the CLIs' flags (mpp.core.config:
`add_dataclass_flags`, `--config FILE`), each range in the class's `RANGES`, checked whole by
`validate()` (the flags' checks, then those that span flags).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpp.core.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, Range, check_device, check_ranges, device_flag
from mpp.core.errors import UsageError
from mpp.eval import timm_io
from mpp.eval.features import DEFAULT_DEVICE, FEATURES
from mpp.eval.probe_runs import KNN_KS, KNN_TEMPERATURE
from mpp.eval.probes import DEFAULT_L2S
from mpp.model.kernel_policy import MODES

DEFAULT_RUN = "runs/mpp"  # where scripts/pretrain_mpp.py writes by default (TrainConfig.output_dir)


@dataclass(frozen=True)
class ProbeConfig:
    # The model and the data
    run: str | None = None  # run directory or checkpoint file (default: runs/mpp)
    random_init: bool = False  # evaluate an untrained ViT of the run's architecture
    model: str | None = None  # with --random-init and no --run: an untrained preset (Micro/4) (default: none)
    seed: int | None = None  # initialisation seed of --random-init (default: the run's seed, or 0)
    dataset: str | None = None  # dataset spec (default: the run's training dataset)
    image_size: int | None = None  # input pixels (default: the run's or the preset's)
    max_test: int = 0  # test on a fixed random N images; 0 = all
    # How features are computed
    batch_size: int = 256  # images per forward pass
    num_workers: int = 0  # DataLoader worker processes
    device: str = DEFAULT_DEVICE  # cpu, cuda or cuda:N (default: cuda if there is one)
    kernels: str = ""  # attention/LayerNorm: auto (ours where verified and faster) | triton | torch
        # (default: $MPP_KERNELS or auto)
    kernel_cache: str = ""  # the kernels' verdict cache; off: measure again
        # (default: $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels)
    compile: bool = False  # torch.compile the ViT's blocks
    features: str = "token"  # token: the class token's pre-logits (the paper's); avg: the mean patch token
        # (default files get an -avg suffix)
    layers: tuple[str, ...] | None = None  # also probe every block's class token and mean patch token, with
        # and without the final LayerNorm, from one forward pass: all, or block numbers (1..depth; -1 is the last)
        # (default: none)
    references: bool = True  # score the same probe on the same images for a random init of the same
        # architecture and for the raw pixels at the model's resolution (above 32 px: averaged to 32×32) (default: on)
    # Where the report goes
    output: str | None = None  # results JSON (default: RUN_DIR/<report>[-random-init].json)

    REPORT: ClassVar[str] = ""  # the report's name: its default file RUN_DIR/<REPORT>.json, its TensorBoard folder
    # What each numeric field accepts (checked at parse time and by validate(); mpp.core.config.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "seed": SEED, "image_size": AT_LEAST_1, "max_test": NON_NEGATIVE, "batch_size": AT_LEAST_1,
        "num_workers": Range(0, 256),
    }
    FLAG_ARGS: ClassVar[dict[str, dict]] = {
        "run": {"metavar": "RUN_DIR"}, "model": {"metavar": "PRESET"}, "dataset": {"metavar": "SPEC"},
        "image_size": {"metavar": "S"}, "max_test": {"metavar": "N"}, "device": {"type": device_flag},
        "kernels": {"choices": MODES}, "kernel_cache": {"metavar": "DIR"}, "features": {"choices": FEATURES},
        "layers": {"metavar": "L"}, "output": {"metavar": "PATH"},
    }

    def validate(self):
        """The flags' own checks (for a config built in code), then the checks that span flags."""
        check_ranges(self)
        for name, empty_ok in (("kernels", True), ("features", False)):  # kernels "": $MPP_KERNELS or auto
            value, choices = getattr(self, name), self.FLAG_ARGS[name]["choices"]
            if value not in choices and not (empty_ok and value == ""):
                raise UsageError(f"--{name} {value!r} is not one of {', '.join(choices)}: pass one of them")
        check_device(self.device)
        if self.model and not self.output:
            raise UsageError("--model has no run directory to write to: pass --output PATH for the results JSON")
        if timm_io.is_timm_source(self.run):
            if not self.output:
                raise UsageError(f"--run {self.run} is a timm model, with no run directory to write to: "
                                 "pass --output PATH for the results JSON")
            if self.random_init or self.model:
                raise UsageError("--random-init/--model build our own untrained ViT: drop them for a timm --run "
                                 "(its report already holds the random-init reference)")
        return self


def output_help(report: str) -> dict:
    """FLAG_HELP of a probe's --output: its default file."""
    return {"output": lambda: f"results JSON (default: RUN_DIR/{report}[-random-init].json)"}


@dataclass(frozen=True)
class FewshotConfig(ProbeConfig):
    shots: tuple[int, ...] = (1, 5, 10, 25)  # examples per class (default: 1 5 10 25)
    seeds: int = 3  # few-shot draws per shot count, seeds 0..N-1
    l2: tuple[float, ...] = (2.0**10,)  # ridge penalties, the first is the headline (default: 1024); the others
        # are only reported: choosing by test accuracy would leak the test set

    REPORT: ClassVar[str] = "fewshot"
    RANGES: ClassVar[dict[str, Range]] = {**ProbeConfig.RANGES, "shots": AT_LEAST_1, "seeds": Range(1, 1000),
                                          "l2": POSITIVE}
    FLAG_HELP: ClassVar[dict] = output_help(REPORT)


@dataclass(frozen=True)
class FullDataProbeConfig(ProbeConfig):
    """A probe of the whole training split (or a fixed subset of it): linear probe, k-NN."""
    max_train: int = 0  # use a fixed random N training images; 0 = all

    RANGES: ClassVar[dict[str, Range]] = {**ProbeConfig.RANGES, "max_train": NON_NEGATIVE}
    FLAG_ARGS: ClassVar[dict[str, dict]] = {**ProbeConfig.FLAG_ARGS, "max_train": {"metavar": "N"}}


@dataclass(frozen=True)
class LinearProbeConfig(FullDataProbeConfig):
    l2: tuple[float, ...] = DEFAULT_L2S  # ridge penalties to choose from on the dev split
        # (default: 2^-4, 2^-2, ..., 2^14)
    dev_fraction: float = 0.1  # fraction of each class's training images held out to choose l2, in (0, 0.5]

    REPORT: ClassVar[str] = "linear-probe"
    RANGES: ClassVar[dict[str, Range]] = {**FullDataProbeConfig.RANGES, "l2": POSITIVE,
                                          "dev_fraction": Range(0, 0.5, low_open=True)}
    FLAG_ARGS: ClassVar[dict[str, dict]] = {**FullDataProbeConfig.FLAG_ARGS, "dev_fraction": {"metavar": "F"}}
    FLAG_HELP: ClassVar[dict] = output_help(REPORT)


@dataclass(frozen=True)
class KnnConfig(FullDataProbeConfig):
    k: tuple[int, ...] = KNN_KS  # neighbours that vote, each at most the training images used (default: 10 20)
    temperature: float = KNN_TEMPERATURE  # a neighbour's vote is exp(cosine similarity / T)

    REPORT: ClassVar[str] = "knn"
    RANGES: ClassVar[dict[str, Range]] = {**FullDataProbeConfig.RANGES, "k": AT_LEAST_1, "temperature": POSITIVE}
    FLAG_ARGS: ClassVar[dict[str, dict]] = {**FullDataProbeConfig.FLAG_ARGS, "temperature": {"metavar": "T"}}
    FLAG_HELP: ClassVar[dict] = output_help(REPORT)
