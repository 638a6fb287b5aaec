"""A run directory's JSON reports as dataclasses, one class per kind, each with `to_json()` (the dict
its writer writes, key for key and in the order written) and `from_json(dict)` (checked, so a file
the readers cannot use is refused in one line that names it):

    FewshotReport      fewshot*.json        eval/fewshot.py       (mpp.eval.probe_runs.run_fewshot)
    LinearProbeReport  linear-probe*.json   eval/linear_probe.py  (mpp.eval.probe_runs.run_linear_probe)
    KnnReport          knn*.json            eval/knn.py           (mpp.eval.probe_runs.run_knn)
    FinetuneReport     finetune.json        eval/finetune.py      (mpp.train.finetune)
    Summary            summary.json         scripts/pretrain_*.py (mpp.train.trainer, as a run ends)

Writers build a record and write `record.to_json()` (mpp.core.files.write_json); readers (mpp.report)
call `read_record(path, cls)`. How fields map to keys, and what is kept of keys no class knows, is
mpp.run.record_base's. Reading is as lenient as the readers always were (anything but the results a
reader shows may be missing) and strict on what they rely on: accuracies are finite numbers in
[0, 1], counts are integers, penalties, rates and durations are non-negative, every result is an
object, and a raw-pixels reference has a resolution.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

from mpp.core.layout import FEWSHOT_GLOB, FINETUNE, KNN_GLOB, LINEAR_PROBE_GLOB, SUMMARY
from mpp.run.probe_records import (  # the probes' records, listed here with the rest
    DatasetUsed,
    FewshotLayers,
    FewshotReference,
    FewshotReferences,
    FewshotReport,
    ImportedModel,
    KnnLayers,
    KnnReference,
    KnnReferences,
    KnnReport,
    KnnResult,
    L2Point,
    LinearProbeLayers,
    LinearProbeReferences,
    LinearProbeReport,
    LinearProbeResult,
    ProbeHead,
    RunBrief,
    ShotResult,
)
from mpp.run.record_base import (
    AT_LEAST_1,
    COUNT,
    FRACTION,
    INTEGER,
    NUMBER,
    POSITIVE,
    SECONDS,
    LayerSpec,
    LayerSweep,
    MalformedReport,
    Record,
    References,
    Report,
    counted,
    kept,
    list_of,
    map_of,
    obj,
    parse_record,
    part,
    read_json,
    read_record,
    record_of,
    text,
    worded,
)

# The readers' API, beside the classes (the base's other names are for classes of reports).
__all__ = ["MalformedReport", "read_json", "read_record", "parse_record", "counted", "LayerSpec", "LayerSweep",
           "References", "DatasetUsed", "L2Point", "ShotResult", "KnnResult", "LinearProbeResult", "FewshotReference",
           "KnnReference", "FewshotReferences", "KnnReferences", "LinearProbeReferences", "FewshotLayers", "KnnLayers",
           "LinearProbeLayers", "ImportedModel", "RunBrief", "ProbeHead", "FewshotReport", "LinearProbeReport",
           "KnnReport", "FinetuneStart", "Training", "GridPoint", "AccuracyOverSeeds", "FinetuneReport",
           "SkippedImages", "Summary", "REPORTS", "report_class", "TEST_ACCURACY_MISSING"]

# ---------------------------------------------------------------- fine-tuning and pretraining

@dataclass(kw_only=True)
class FinetuneStart(Record):
    """What every training of a fine-tune started from (a --resume must start there too)."""

    init: str | None = part(text, null=True)  # "pretrained" | "scratch"
    checkpoint: str | None = part(text, null=True)  # the checkpoint (or timm source) loaded; None from scratch
    step: int | None = part(COUNT, null=True)  # its step; None from scratch or for a timm model
    sha256: str | None = part(text, null=True)  # the loaded file's digest; None from scratch
    extra: dict = kept()


@dataclass(kw_only=True)
class Training(Record):
    """One training of a fine-tune: a point of the lr grid ("grid-lr<lr>": scored on dev) or a final
    seed ("seed<n>": scored on test)."""

    lr: float | None = part(POSITIVE)
    seed: int | None = part(INTEGER)
    dev_accuracy: float | None = part(NUMBER)  # grid points only
    test_accuracy: float | None = part(NUMBER)  # final seeds only
    scored: int | None = part(COUNT)  # images scored
    wall_time_s: float | None = part(SECONDS)
    extra: dict = kept()


@dataclass(kw_only=True)
class GridPoint(Record):
    """One lr of the grid, as the choice saw it."""

    dev_accuracy: float = part(NUMBER, required=True)  # on the dev split held out of the labelled images
    extra: dict = kept()


@dataclass(kw_only=True)
class AccuracyOverSeeds(Record):
    """A fine-tune's result: test accuracy over the final trainings' seeds."""

    mean: float = part(FRACTION, required=True)  # in [0, 1]
    std: float | None = part(FRACTION)  # population (ddof=0) over seeds; missing reads as 0
    per_seed: list[float] | None = part(list_of(NUMBER))  # seeds 0..N-1
    extra: dict = kept()


TEST_ACCURACY_MISSING = "no numeric 'test_accuracy.mean'"  # what the comparison has always said


@dataclass(kw_only=True)
class FinetuneReport(Report):
    """finetune.json: a fine-tune's results so far (eval/finetune.py, mpp.train.finetune). Written after
    every training: the fields from `lr` on come with the last one (`finished`)."""

    WHAT: ClassVar[str] = "fine-tune"
    start: FinetuneStart | None = part(record_of(FinetuneStart))
    pretrained: str | None = part(text, null=True)  # the pretrained run directory or timm source; None from scratch
    init: str | None = part(text)  # "pretrained" | "scratch"
    pretrained_objective: str | None = part(text, null=True)  # the pretrained run's objective; None if unknown
    dataset: DatasetUsed | None = part(record_of(DatasetUsed))
    steps: int | None = part(AT_LEAST_1)  # optimizer steps of every training
    vit: dict | None = part(obj)  # the fine-tuned ViT's config (dataclasses.asdict of mpp.model.vit.ViTConfig)
    config: dict | None = part(obj)  # the fine-tune's settings (dataclasses.asdict of FinetuneConfig)
    kernels: dict | None = part(obj)  # the kernels' decision (mpp.model.kernel_policy: KernelChoice.record)
    trainings: dict[str, Training] | None = part(map_of(record_of(Training)))  # tag → training, as each ended
    lr: float | None = part(POSITIVE)  # the rate chosen on dev (ties: the smaller)
    grid: dict[str, GridPoint] | None = part(map_of(record_of(GridPoint)))  # f"{lr:g}" → dev accuracy; {}: one lr
    seeds: list[int] | None = part(list_of(INTEGER))  # the final trainings' seeds
    test_accuracy: AccuracyOverSeeds | None = part(worded(record_of(AccuracyOverSeeds), TEST_ACCURACY_MISSING))
    std: str | None = part(text)  # what "std" is: "population (ddof=0) over seeds"
    wall_time_s: float | None = part(SECONDS)  # every training's, resumed or not
    extra: dict = kept()

    def finished(self) -> bool:
        """Whether every training is done and scored (before, `test_accuracy` and the rest are missing)."""
        return self.test_accuracy is not None


@dataclass(kw_only=True)
class SkippedImages(Record):
    """The unreadable images a pretraining run skipped (the warnings name them), this process's share."""

    train: int | None = part(COUNT)
    eval: int | None = part(COUNT)
    extra: dict = kept()


@dataclass(kw_only=True)
class Summary(Report):
    """summary.json: what a finished pretraining run did (mpp.train.trainer, at its end)."""

    WHAT: ClassVar[str] = "summary"
    FIX: ClassVar[str] = "rerun the pretraining (it writes the summary as it ends) or move the file away"
    objective: str | None = part(text)  # "mpp" | "supervised"
    steps: int | None = part(COUNT)  # optimizer steps done
    wall_time_s: float | None = part(SECONDS)  # training time, resumed parts included
    eval: dict[str, float] | None = part(map_of(NUMBER))  # the final held-out metrics: "loss", "accuracy" / "mse", ...
    last_train: dict[str, float] | None = part(map_of(NUMBER))  # the last logged training metrics: "train/loss", ...
    kernels: dict | None = part(obj)  # the kernels' decision (mpp.model.kernel_policy: KernelChoice.record)
    skipped_images: SkippedImages | None = part(record_of(SkippedImages))
    extra: dict = kept()


# The record each report file holds, by the name (a glob: mpp.core.layout) that finds it in a run directory.
REPORTS = {SUMMARY: Summary, FEWSHOT_GLOB: FewshotReport, LINEAR_PROBE_GLOB: LinearProbeReport, KNN_GLOB: KnnReport,
           FINETUNE: FinetuneReport}


def report_class(name: str) -> type[Report] | None:
    """The record a report file named `name` holds (its file name), or None for any other file."""
    return next((cls for glob, cls in REPORTS.items() if fnmatch.fnmatchcase(name, glob)), None)
