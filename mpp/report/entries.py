"""A report as the comparison shows it: one entry per report (and per baseline inside one), made from
its record (mpp.run.records) and reduced to what the tables and plots read.

    FewshotEntry      fewshot*.json, or its references.random_init / references.pixels
    LinearProbeEntry  linear-probe*.json, or a reference inside it
    KnnEntry          knn*.json, or a reference inside it
    FinetuneEntry     finetune.json (in the run, or in RUN/finetune*/)

A `Row` (mpp.report.reports) holds them; compare.json holds them as `as_json` writes them, field by
field, an entry's `where` under the key "in".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from mpp.data.sources import dataset_name
from mpp.run.records import (
    TEST_ACCURACY_MISSING,
    FewshotReport,
    FinetuneReport,
    KnnReport,
    LayerSpec,
    LayerSweep,
    LinearProbeReport,
    MalformedReport,
    ProbeHead,
    counted,
)

C = TypeVar("C")  # one feature's cell(s) in a sweep


@dataclass
class Score:
    """A few-shot cell: test accuracy over the seeds' draws, in [0, 1]."""

    mean: float
    std: float  # population (ddof=0) over seeds; 0 where a report has none


@dataclass
class ProbeScore:
    """A linear-probe cell."""

    accuracy: float  # test accuracy in [0, 1]
    l2: float | None  # the penalty the dev split chose


@dataclass
class Sweep(Generic[C]):
    """A report's "layers" as tables and plots read them: the same cells as the report's own, per feature."""

    specs: list[LayerSpec]  # every feature, in the report's (block) order
    blocks: list[int]  # the blocks swept, increasing
    variants: list[str]  # the feature variants in the order first listed: "token", "token+norm", "avg", "avg+norm"
    results: dict[str, C]  # feature name → cell(s), in spec order; a feature without a result is left out (a – cell)
    random_init: dict[str, C] | None  # the same for the random-init reference; None when it was not scored


@dataclass
class FewshotEntry:
    spec: str  # the evaluation's dataset spec: the report's, else the run's training data's, else "unknown"
    dataset: str  # its short name (mpp.data.sources.dataset_name): what columns and panels are keyed by
    file: str  # the report, relative to the run directory
    where: str | None  # "references.pixels": a baseline inside the report (compare.json's "in"); None: its own
    step: int | None  # the checkpoint's step
    results: dict[int, Score]  # shots → cell, by increasing shots
    layers: Sweep[dict[int, Score]] | None  # the report's own only (never a reference's)


@dataclass
class LinearProbeEntry:
    accuracy: float  # test accuracy in [0, 1]
    spec: str  # as FewshotEntry's
    dataset: str
    file: str
    where: str | None
    l2: float | None  # the penalty the dev split chose
    layers: Sweep[ProbeScore] | None


@dataclass
class KnnEntry:
    spec: str  # as FewshotEntry's
    dataset: str
    file: str
    where: str | None
    step: int | None
    results: dict[int, float]  # k → test accuracy, by increasing k
    layers: Sweep[dict[int, float]] | None
    temperature: float | None  # votes weighted exp(cosine similarity / temperature)


@dataclass
class FinetuneEntry:
    mean: float  # test accuracy over the final trainings' seeds, in [0, 1]
    std: float  # population (ddof=0) over seeds; 0 where the report has none
    lr: float | None  # the rate chosen on the dev split
    spec: str  # as FewshotEntry's
    dataset: str
    init: str | None  # "pretrained" | "scratch"
    pretrained: str | None  # the pretrained run directory or timm source
    steps: int | None  # optimizer steps of each training
    wall_time_s: float | None  # every training's
    file: str


Entry = FewshotEntry | LinearProbeEntry | KnnEntry


def as_json(value) -> dict:
    """A row (or an entry) as compare.json holds it: dataclasses.asdict, an entry's `where` named "in"."""
    return asdict(value, dict_factory=lambda items: {("in" if k == "where" else k): v for k, v in items})


def report_spec(report: ProbeHead | FinetuneReport, fallback_spec: str | None) -> str:
    """The evaluation's dataset spec: the report's own, else the run's training data."""
    dataset = getattr(report, "dataset", None)
    return (dataset.spec if dataset else None) or fallback_spec or "unknown"


def shot_scores(results) -> dict[int, Score]:
    return {n: Score(float(r.mean), float(r.std or 0.0)) for n, r in counted(results).items()}


def knn_scores(results) -> dict[int, float]:
    return {n: float(r.accuracy) for n, r in counted(results).items()}


def probe_score(result) -> ProbeScore:
    return ProbeScore(float(result.accuracy), result.l2)


def sweep(layers: LayerSweep | None, cell) -> Sweep | None:
    """The report's sweep with `cell(result)` per feature, in spec order; None when it has none."""
    if layers is None:
        return None
    names = [s.name for s in layers.specs]

    def cells(results: dict | None) -> dict | None:
        return None if results is None else {n: cell(results[n]) for n in names if n in results}

    return Sweep(specs=list(layers.specs), blocks=layers.blocks, variants=layers.variants,
                 results=cells(layers.results), random_init=cells(layers.random_init))


def where_in(report: ProbeHead, where: str | None):
    """The part of `report` an entry shows: the report itself, or `where` ("references.pixels") in it."""
    return report if where is None else getattr(report.references, where.split(".", 1)[1])


def fewshot_entry(path: Path, report: FewshotReport, run_dir: Path, fallback_spec: str | None,
                  where: str | None = None) -> FewshotEntry:
    spec = report_spec(report, fallback_spec)
    return FewshotEntry(spec=spec, dataset=dataset_name(spec), file=path.relative_to(run_dir).as_posix(), where=where,
                        step=report.step, results=shot_scores(where_in(report, where).results),
                        layers=sweep(report.layers, shot_scores) if where is None else None)


def knn_entry(path: Path, report: KnnReport, run_dir: Path, fallback_spec: str | None,
              where: str | None = None) -> KnnEntry:
    spec = report_spec(report, fallback_spec)
    return KnnEntry(spec=spec, dataset=dataset_name(spec), file=path.relative_to(run_dir).as_posix(), where=where,
                    step=report.step, results=knn_scores(where_in(report, where).results),
                    layers=sweep(report.layers, knn_scores) if where is None else None, temperature=report.temperature)


def linear_probe_entry(path: Path, report: LinearProbeReport, run_dir: Path, fallback_spec: str | None,
                       where: str | None = None) -> LinearProbeEntry:
    found = where_in(report, where)
    spec = report_spec(report, fallback_spec)
    return LinearProbeEntry(accuracy=float(found.accuracy), spec=spec, dataset=dataset_name(spec),
                            file=path.relative_to(run_dir).as_posix(), where=where, l2=found.l2,
                            layers=sweep(report.layers, probe_score) if where is None else None)


def finetune_entry(path: Path, report: FinetuneReport, run_dir: Path, fallback_spec: str | None) -> FinetuneEntry:
    """The fine-tune's result; a report of a fine-tune still running (no test accuracy yet) is refused."""
    if not report.finished():
        raise MalformedReport(TEST_ACCURACY_MISSING, what=FinetuneReport.WHAT, fix=FinetuneReport.FIX, path=path)
    test, spec = report.test_accuracy, report_spec(report, fallback_spec)
    return FinetuneEntry(mean=float(test.mean), std=float(test.std or 0.0), lr=report.lr, spec=spec,
                         dataset=dataset_name(spec), init=report.init, pretrained=report.pretrained, steps=report.steps,
                         wall_time_s=report.wall_time_s, file=path.relative_to(run_dir).as_posix())
