"""The probes' reports as records (mpp.run.records has the list and the readers' API):
fewshot*.json, linear-probe*.json and knn*.json, and the parts they share with the others (the
dataset used, the probed model's head)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self

from mpp.run.record_base import (
    AT_LEAST_1,
    COUNT,
    FRACTION,
    INTEGER,
    NUMBER,
    POSITIVE,
    LayerSweep,
    MalformedReport,
    Record,
    References,
    Report,
    by_key,
    kept,
    list_of,
    map_of,
    obj,
    part,
    record_of,
    results_of,
    text,
    worded,
)

# ---------------------------------------------------------------- parts of several reports

@dataclass(kw_only=True)
class DatasetUsed(Record):
    """The evaluation's data ("dataset"): its spec, and the sizes of the parts its protocol uses."""

    spec: str | None = part(text)  # the dataset spec as given (mpp.data.sources): "digits", "hf:cifar10", a folder
    image_size: int | None = part(AT_LEAST_1)  # pixels per side, as the model saw them
    num_classes: int | None = part(AT_LEAST_1)
    train_size: int | None = part(COUNT)  # images of the training split (fine-tune: its labelled subset)
    fit_size: int | None = part(COUNT)  # fine-tune: the labelled images the lr grid trains on
    dev_size: int | None = part(COUNT)  # linear probe, fine-tune: held out of train to choose l2 / lr
    test_size: int | None = part(COUNT)  # images of the test split
    train_used: int | None = part(COUNT)  # k-NN: the training images searched (--max-train)
    test_used: int | None = part(COUNT)  # few-shot, k-NN: the test images scored (--max-test)
    train_embedded: int | None = part(COUNT)  # few-shot: the training images some draw uses, embedded once
    extra: dict = kept()


# ---------------------------------------------------------------- one result

@dataclass(kw_only=True)
class L2Point(Record):
    """Few-shot accuracy at one l2 of the grid (the headline is the grid's first l2)."""

    mean: float = part(NUMBER, required=True)  # test accuracy, mean over seeds
    std: float | None = part(NUMBER)  # population (ddof=0) std over seeds
    per_seed: list[float] | None = part(list_of(NUMBER))  # one accuracy per seed: seeds 0..N-1
    extra: dict = kept()


@dataclass(kw_only=True)
class ShotResult(Record):
    """Few-shot accuracy at one shot count, over the seeds' draws."""

    COUNT: ClassVar[str] = "shots"
    shots: int | None = part(AT_LEAST_1)  # examples per class (old reports: only the key says it)
    mean: float = part(FRACTION, required=True)  # test accuracy at the headline l2, mean over seeds, in [0, 1]
    std: float | None = part(FRACTION)  # population (ddof=0) std over seeds; missing reads as 0
    per_seed: list[float] | None = part(list_of(NUMBER))  # one accuracy per seed: seeds 0..N-1
    l2_grid: dict[str, L2Point] | None = part(map_of(record_of(L2Point)))  # f"{l2:.12g}" → the same at that l2
    extra: dict = kept()


@dataclass(kw_only=True)
class KnnResult(Record):
    """Weighted k-NN accuracy with k neighbours voting."""

    COUNT: ClassVar[str] = "k"
    k: int | None = part(AT_LEAST_1)  # neighbours (old reports: only the key says it)
    accuracy: float = part(FRACTION, required=True)  # test accuracy in [0, 1]
    extra: dict = kept()


ACCURACY_MISSING = "no numeric '{key}'{inside}"  # the linear probe's reader has always said so


@dataclass(kw_only=True)
class LinearProbeResult(Record):
    """The linear probe of one feature set: a layer of the sweep, or a reference."""

    accuracy: float = part(worded(FRACTION, ACCURACY_MISSING), required=True, missing=ACCURACY_MISSING)  # test, [0, 1]
    l2: float | None = part(POSITIVE)  # the penalty the dev split chose
    feature_dim: int | None = part(AT_LEAST_1)
    image_size: Any = part()  # raw pixels: their resolution (the report checks it, with its fallbacks)
    grid: int | None = part(AT_LEAST_1)  # raw pixels: averaged to grid × grid first (at most 32)
    extra: dict = kept()


@dataclass(kw_only=True)
class FewshotReference(Record):
    """A few-shot reference, scored on the same draws and test images as the model."""

    results: dict[str, ShotResult] = part(results_of(ShotResult, "mean"), required=True)  # str(shots) → result
    feature_dim: int | None = part(AT_LEAST_1)
    image_size: Any = part()  # raw pixels: their resolution (the report checks it, with its fallbacks)
    grid: int | None = part(AT_LEAST_1)  # raw pixels: averaged to grid × grid first (at most 32)
    extra: dict = kept()


@dataclass(kw_only=True)
class KnnReference(Record):
    """A k-NN reference, scored on the same training and test images as the model."""

    results: dict[str, KnnResult] = part(results_of(KnnResult, "accuracy"), required=True)  # str(k) → result
    feature_dim: int | None = part(AT_LEAST_1)
    image_size: Any = part()  # raw pixels: their resolution (the report checks it, with its fallbacks)
    grid: int | None = part(AT_LEAST_1)  # raw pixels: averaged to grid × grid first (at most 32)
    extra: dict = kept()


class FewshotReferences(References[FewshotReference]):
    OF = FewshotReference


class KnnReferences(References[KnnReference]):
    OF = KnnReference


class LinearProbeReferences(References[LinearProbeResult]):
    OF = LinearProbeResult


class FewshotLayers(LayerSweep[dict[str, ShotResult]]):
    READ_ONE = staticmethod(lambda found, at: by_key(ShotResult, found, at))  # a feature's {str(shots): result}


class KnnLayers(LayerSweep[dict[str, KnnResult]]):
    READ_ONE = staticmethod(lambda found, at: by_key(KnnResult, found, at))  # a feature's {str(k): result}


class LinearProbeLayers(LayerSweep[LinearProbeResult]):
    READ_ONE = staticmethod(LinearProbeResult.from_json)


# ---------------------------------------------------------------- the probes' reports

@dataclass(kw_only=True)
class ImportedModel(Record):
    """A timm model's stand-in for a run config (mpp.eval.timm_io.Imported.record)."""

    name: str = part(text, required=True)  # the label in tables: the timm name, or the folder's / file's name
    source: str | None = part(text)  # what --run said: timm:NAME, a folder or a file
    architecture: str | None = part(text)  # timm's architecture name, or "state dict" for a bare file
    mean: list[float] | None = part(list_of(NUMBER))  # the model's own normalisation, per channel
    std: list[float] | None = part(list_of(NUMBER))
    extra: dict = kept()


@dataclass(kw_only=True)
class RunBrief(Record):
    """A few-shot report's "run_config": the probed run's training settings (config.json's train section)."""

    objective: str | None = part(text, null=True)  # "mpp" | "supervised" | "finetune"
    model: str | None = part(text, null=True)  # the preset, e.g. "Micro/4"
    dataset: str | None = part(text, null=True)  # the training data's spec
    image_size: int | None = part(COUNT, null=True)  # 0: the preset's
    seed: int | None = part(INTEGER, null=True)
    extra: dict = kept()


@dataclass(kw_only=True)
class ProbeHead(Report):
    """What every probe report starts with: what was probed (mpp.eval.probe_setup.ProbeTarget.report_head).
    The three reports below add their protocol's fields, each in the order its writer writes them."""

    init: str | None = part(text)  # "trained" | "random" (--random-init)
    run: str | None = part(text, null=True)  # the run directory; None for a --model preset or a timm model
    checkpoint: str | None = part(text, null=True)  # the checkpoint file; None for a random init
    step: int | None = part(COUNT)  # the checkpoint's step (0 for a random init)
    features: str | None = part(text)  # "token" (the class token: the paper's) | "avg" (the mean patch token)
    kernels: dict | None = part(obj)  # op → what computed the features (mpp.model.ops.Kernels.names)
    reference_seed: int | None = part(INTEGER, null=True)  # the random-init reference's seed; None without one
    imported: ImportedModel | None = part(record_of(ImportedModel))  # a timm --run only
    extra: dict = kept()

    def head(self) -> dict:
        """The head's fields by name, to give a report's body (`with_head`)."""
        return {f.name: getattr(self, f.name) for f in fields(ProbeHead) if not f.metadata.get("extra")}

    def with_head(self, head: ProbeHead, **more) -> Self:
        """This report with `head`'s fields (and `more`) in place of its own."""
        return replace(self, **head.head(), **more)

    def probed_model(self) -> str | None:
        """The probed model's preset, as the report names it (None: it does not)."""
        return None

    def pixels_size(self) -> int | None:
        """The raw-pixels reference's resolution: its own, else the report's images', else the probed
        model's; None without that reference."""
        references = getattr(self, "references", None)
        if references is None or references.pixels is None:
            return None
        dataset, vit = getattr(self, "dataset", None), getattr(self, "vit", None) or {}
        size = references.pixels.image_size or (dataset.image_size if dataset else None) or vit.get("image_size")
        if type(size) is not int or size < 1:
            raise MalformedReport("references.pixels has no positive integer 'image_size'")
        return size

    def check(self) -> None:
        self.pixels_size()


@dataclass(kw_only=True)
class FewshotReport(ProbeHead):
    """fewshot*.json: few-shot linear probes at fixed draws and a fixed l2 (eval/fewshot.py)."""

    WHAT: ClassVar[str] = "few-shot"
    run_config: RunBrief | None = part(record_of(RunBrief), null=True)  # None without a run (a --model preset)
    model: str | None = part(text, null=True)  # --model: an untrained preset's name, else None
    vit: dict | None = part(obj)  # the probed ViT's config (dataclasses.asdict of mpp.model.vit.ViTConfig)
    dataset: DatasetUsed | None = part(record_of(DatasetUsed))
    shots: list[int] | None = part(list_of(AT_LEAST_1))  # examples per class, in the order asked
    seeds: list[int] | None = part(list_of(COUNT))  # the draws per shot count: seeds 0..N-1
    l2_grid: list[float] | None = part(list_of(POSITIVE))  # ridge penalties, the headline first
    headline_l2: float | None = part(POSITIVE)  # fixed in advance: choosing it by test accuracy would leak
    std: str | None = part(text)  # what every "std" is: "population (ddof=0) over seeds"
    feature_dim: int | None = part(AT_LEAST_1)
    results: dict[str, ShotResult] = part(results_of(ShotResult, "mean"), required=True)  # str(shots) → result
    references: FewshotReferences | None = part(record_of(FewshotReferences))
    layers: FewshotLayers | None = part(record_of(FewshotLayers))  # --layers

    def probed_model(self) -> str | None:
        return (self.run_config.model if self.run_config else None) or self.model


@dataclass(kw_only=True)
class LinearProbeReport(ProbeHead):
    """linear-probe*.json: the linear probe on all the training images, l2 chosen on a dev split
    (eval/linear_probe.py)."""

    WHAT: ClassVar[str] = "linear-probe"
    dataset: DatasetUsed | None = part(record_of(DatasetUsed))
    feature_dim: int | None = part(AT_LEAST_1)
    l2_grid: list[float] | None = part(list_of(POSITIVE))  # the penalties the dev split chose from, as given
    dev_accuracy: dict[str, float] | None = part(map_of(NUMBER))  # f"{l2:.12g}" → accuracy on the dev split
    l2: float | None = part(POSITIVE)  # the chosen penalty (ties: the larger)
    accuracy: float = part(worded(FRACTION, ACCURACY_MISSING), required=True, missing=ACCURACY_MISSING)  # test
    references: LinearProbeReferences | None = part(record_of(LinearProbeReferences))
    layers: LinearProbeLayers | None = part(record_of(LinearProbeLayers))  # --layers
    vit: dict | None = part(obj)  # the probed ViT's config (dataclasses.asdict of mpp.model.vit.ViTConfig)


@dataclass(kw_only=True)
class KnnReport(ProbeHead):
    """knn*.json: weighted k-NN (DINO's protocol) on frozen features (eval/knn.py)."""

    WHAT: ClassVar[str] = "k-NN"
    model: str | None = part(text, null=True)  # --model: an untrained preset's name, else None
    vit: dict | None = part(obj)  # the probed ViT's config (dataclasses.asdict of mpp.model.vit.ViTConfig)
    dataset: DatasetUsed | None = part(record_of(DatasetUsed))
    k: list[int] | None = part(list_of(AT_LEAST_1))  # the neighbour counts, deduplicated in the order asked
    temperature: float | None = part(POSITIVE)  # a neighbour's vote is exp(cosine similarity / temperature)
    results: dict[str, KnnResult] = part(results_of(KnnResult, "accuracy"), required=True)  # str(k) → result
    feature_dim: int | None = part(AT_LEAST_1)
    references: KnnReferences | None = part(record_of(KnnReferences))
    layers: KnnLayers | None = part(record_of(KnnLayers))  # --layers

    def probed_model(self) -> str | None:
        return self.model
