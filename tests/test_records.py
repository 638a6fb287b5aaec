"""mpp.run.records: every report kind round-trips through its dataclass, the committed results load through
them byte for byte, a malformed report is one line naming the file, and the probes' writers and the
comparison's reader share the classes."""
import json
import math
from pathlib import Path

import pytest
import torch

from mpp.core.errors import UsageError
from mpp.core.files import write_json
from mpp.eval.features import layer_specs
from mpp.eval.probe_runs import Embedder, ProbeData, run_fewshot, run_knn, run_linear_probe
from mpp.model.vit import ViT, ViTConfig
from mpp.report.entries import FewshotEntry, KnnEntry, LinearProbeEntry, Score
from mpp.report.reports import read_run
from mpp.run.records import (
    AccuracyOverSeeds,
    DatasetUsed,
    FewshotReport,
    FinetuneReport,
    FinetuneStart,
    GridPoint,
    ImportedModel,
    KnnReport,
    LinearProbeReport,
    MalformedReport,
    ProbeHead,
    Report,
    RunBrief,
    SkippedImages,
    Summary,
    Training,
    read_record,
    report_class,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
KERNELS = {"mode": "torch", "source": "flag", "environment": {}, "shapes": {"batch": 32}, "cache": "off",
           "verdicts": {"attention": {"impl": "torch", "reason": "--kernels torch"}}}


def written(record: Report) -> str:
    """The bytes a writer puts on disk (mpp.core.files.write_json)."""
    return json.dumps(record.to_json(), indent=2, default=str) + "\n"


# ---------------------------------------------------------------- the committed results

def committed_reports() -> list[Path]:
    return sorted(p for p in (REPO / "results").rglob("*.json") if report_class(p.name) is not None)


def test_every_committed_report_loads_and_writes_back_the_same_bytes():
    found = committed_reports()
    kinds = {report_class(p.name) for p in found}
    assert kinds == {Summary, FewshotReport, LinearProbeReport, KnnReport, FinetuneReport}  # every kind is committed
    for path in found:
        raw = json.loads(path.read_text())
        record = read_record(path, report_class(path.name))
        assert record.to_json() == raw, path
        assert written(record) == path.read_text(), path  # the same keys in the same order: the same file


def test_report_class_by_file_name():
    assert report_class("fewshot-imagenette.json") is FewshotReport and report_class("knn-avg.json") is KnnReport
    assert report_class("linear-probe-random-init.json") is LinearProbeReport
    assert report_class("finetune.json") is FinetuneReport and report_class("summary.json") is Summary
    assert report_class("config.json") is None and report_class("compare.json") is None


# ---------------------------------------------------------------- round trips

def test_unknown_keys_are_kept_after_the_known_ones():
    raw = {"newer": [1], "init": "trained", "results": {"10": {"k": 10, "accuracy": 0.5, "note": "x"}},
           "references": {"pixels": {"results": {"10": {"accuracy": 0.9}}, "image_size": 16}, "future": {}}}
    record = KnnReport.from_json(raw)
    assert record.extra == {"newer": [1]} and record.results["10"].extra == {"note": "x"}
    assert record.references.extra == {"future": {}}
    # the keys a probe's writer always writes, null for "none", come back; the unknown one last
    nulls = {"run": None, "checkpoint": None, "reference_seed": None, "model": None}
    assert record.to_json() == {**raw, **nulls}
    assert list(record.to_json()) == ["init", "run", "checkpoint", "reference_seed", "model", "results", "references",
                                      "newer"]


def test_a_missing_key_stays_missing_and_a_recorded_null_stays_null():
    raw = {"init": "random", "run": None, "checkpoint": None, "step": 0, "reference_seed": None, "accuracy": 0.25}
    record = LinearProbeReport.from_json(raw)
    assert record.run is None and record.references is None and record.to_json() == raw
    assert list(LinearProbeReport.from_json({"accuracy": 0.5, "init": "trained"}).to_json()) == [
        "init", "run", "checkpoint", "reference_seed", "accuracy"]  # a null-able key a file lacks comes back as null


def test_summary_is_what_the_trainer_writes():
    """mpp.train.trainer's summary.json (Trainer._finish), key for key, and the Summary that writes the same."""
    eval_, last = {"loss": 0.5, "accuracy": 0.875}, {"train/loss": 0.7, "train/lr": 1e-4, "train/images_per_s": 80.0}
    as_today = {"objective": "supervised", "steps": 300, "wall_time_s": 61.5, "eval": eval_, "last_train": last,
                "kernels": KERNELS, "skipped_images": {"train": 0, "eval": 2}}
    record = Summary(objective="supervised", steps=300, wall_time_s=61.5, eval=eval_, last_train=last,
                     kernels=KERNELS, skipped_images=SkippedImages(train=0, eval=2))
    assert written(record) == json.dumps(as_today, indent=2) + "\n"
    assert Summary.from_json(as_today) == record
    diverged = Summary.from_json({**as_today, "eval": {"loss": math.nan}})  # what was logged, read as written
    assert math.isnan(diverged.eval["loss"])


def finetune_as_today(finished: bool) -> dict:
    """mpp.train.finetune's finetune.json (the `results` dict), after the first training and at the end."""
    results = {
        "start": {"init": "scratch", "checkpoint": None, "step": None, "sha256": None},
        "pretrained": None, "init": "scratch", "pretrained_objective": None,
        "dataset": {"spec": "digits", "image_size": 16, "num_classes": 10, "train_size": 1437, "fit_size": 1293,
                    "dev_size": 144, "test_size": 360},
        "steps": 40, "vit": {**TINY, "num_classes": 10}, "config": {"lrs": [0.01, 0.001], "crop_scale": [0.5, 1.0]},
        "kernels": KERNELS,
        "trainings": {"grid-lr0.01": {"lr": 0.01, "seed": 0, "dev_accuracy": 0.5, "scored": 144, "wall_time_s": 3.0}},
    }
    if finished:
        results["trainings"]["seed0"] = {"lr": 0.01, "seed": 0, "test_accuracy": 0.6, "scored": 360, "wall_time_s": 4.0}
        results.update({"lr": 0.01, "grid": {"0.01": {"dev_accuracy": 0.5}}, "seeds": [0],
                        "test_accuracy": {"mean": 0.6, "std": 0.0, "per_seed": [0.6]},
                        "std": "population (ddof=0) over seeds", "wall_time_s": 7.0})
    return results


def test_finetune_report_is_what_the_finetune_writes_before_and_after_its_last_training():
    partial = FinetuneReport(
        start=FinetuneStart(init="scratch", checkpoint=None, step=None, sha256=None), pretrained=None, init="scratch",
        pretrained_objective=None,
        dataset=DatasetUsed(spec="digits", image_size=16, num_classes=10, train_size=1437, fit_size=1293, dev_size=144,
                            test_size=360),
        steps=40, vit={**TINY, "num_classes": 10}, config={"lrs": (0.01, 0.001), "crop_scale": (0.5, 1.0)},
        kernels=KERNELS,
        trainings={"grid-lr0.01": Training(lr=0.01, seed=0, dev_accuracy=0.5, scored=144, wall_time_s=3.0)})
    assert written(partial) == json.dumps(finetune_as_today(False), indent=2) + "\n"  # tuples are written as lists
    assert not FinetuneReport.from_json(finetune_as_today(False)).finished()
    partial.trainings["seed0"] = Training(lr=0.01, seed=0, test_accuracy=0.6, scored=360, wall_time_s=4.0)
    done = FinetuneReport(**{**vars(partial), "lr": 0.01, "grid": {"0.01": GridPoint(dev_accuracy=0.5)}, "seeds": [0],
                             "test_accuracy": AccuracyOverSeeds(mean=0.6, std=0.0, per_seed=[0.6]),
                             "std": "population (ddof=0) over seeds", "wall_time_s": 7.0})
    assert written(done) == json.dumps(finetune_as_today(True), indent=2) + "\n"
    assert FinetuneReport.from_json(finetune_as_today(True)).finished()


# ---------------------------------------------------------------- malformed reports

BAD = [
    (FewshotReport, {"init": "trained"}, "(no 'results')"),
    (FewshotReport, {"results": {"1": {"shots": 1, "mean": "high"}}}, "(a result without a numeric mean: "),
    (FewshotReport, {"results": {"1": {"mean": math.nan}}}, "'results.1.mean' is nan, not a finite number"),
    (FewshotReport, {"results": {"1": {"mean": 1.5}}}, "(a result out of range: 'results.1.mean' is 1.5, outside [0"),
    (FewshotReport, {"results": {"one": {"mean": 0.5}}}, "'results.one' has no 'shots'"),
    (FewshotReport, {"results": {"1": {"shots": True, "mean": 0.5}}}, "'results.1.shots' is true, not an integer"),
    (FewshotReport, {"results": {"1": {"mean": 0.5}}, "layers": {"specs": [{"name": "2/token", "layer": 1,
                                                                            "pool": "token", "norm": False}]}},
     "(malformed 'layers': spec {"),
    (FewshotReport, {"results": {"1": {"mean": 0.5}}, "references": {"pixels": {"results": {"1": {"mean": 0.5}}}}},
     "(references.pixels has no positive integer 'image_size')"),
    (KnnReport, {"results": {"10": {"k": 10, "accuracy": 0.5}}, "references": {"pixels": {"results": {}}}},
     "(no 'results' in references.pixels)"),
    (KnnReport, {"results": {"10": {"accuracy": 0.5}}, "temperature": 0}, "'temperature' is 0, not positive"),
    (LinearProbeReport, {"init": "trained", "l2": 1.0}, "(no numeric 'accuracy')"),
    (LinearProbeReport, {"accuracy": 0.5, "references": {"random_init": {"accuracy": None}}},
     "(no numeric 'accuracy' in references.random_init)"),
    (LinearProbeReport, {"accuracy": 0.5, "references": []}, "('references' is not an object)"),
    (FinetuneReport, {"test_accuracy": {"mean": "x"}}, "(no numeric 'test_accuracy.mean')"),
    (FinetuneReport, {"test_accuracy": {"mean": 0.5}, "lr": -0.1}, "('lr' is -0.1, not positive)"),
    (Summary, {"steps": 1.5}, "('steps' is 1.5, not an integer)"),
    (Summary, {"wall_time_s": -3}, "('wall_time_s' is -3, below 0)"),
    (Summary, {"eval": {"loss": "low"}}, "('eval.loss' is \"low\", not a number)"),
]


@pytest.mark.parametrize("cls, raw, message", BAD, ids=[f"{c.__name__}-{m[:30]}" for c, _, m in BAD])
def test_a_malformed_report_is_one_line_naming_the_file(cls, raw, message, tmp_path):
    with pytest.raises(MalformedReport) as found:
        cls.from_json(raw)
    assert isinstance(found.value, UsageError) and message in str(found.value) and "\n" not in str(found.value)
    path = tmp_path / "report.json"
    write_json(path, raw)
    with pytest.raises(UsageError) as named:
        read_record(path, cls)
    what = {FewshotReport: "few-shot", KnnReport: "k-NN", LinearProbeReport: "linear-probe",
            FinetuneReport: "fine-tune", Summary: "summary"}[cls]
    assert str(named.value).startswith(f"'{path}' is not a {what} report (") and message in str(named.value)


def test_a_file_that_is_no_json_object_is_one_line(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="holds a JSON list, not an object"):
        read_record(path, Summary)
    path.write_text('{"steps": ')
    with pytest.raises(UsageError, match="cannot read .* it is truncated or not JSON"):
        read_record(path, Summary)


# ---------------------------------------------------------------- the probes write what the comparison reads

@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, dict[str, Report]]:
    """A run directory holding the three probes' reports (every block, both references) and a summary,
    each written as the CLIs write them: the protocol's record with its head, `to_json()`."""
    torch.manual_seed(0)
    vit, random_init = ViT(ViTConfig(**TINY)), ViT(ViTConfig(**TINY))
    data, embed = ProbeData.load("digits", 16), Embedder(batch_size=256, progress=False)
    common = dict(layers=layer_specs(2, ["all"]), random_init=random_init, pixels=True)
    head = ProbeHead(init="trained", run="runs/tiny", checkpoint="runs/tiny/checkpoints/ckpt-00000007.pt", step=7,
                     features="token", kernels=vit.kernels.names(), reference_seed=0,
                     imported=ImportedModel(name="tiny", source="timm:tiny", architecture="vit", mean=[0.5] * 3,
                                            std=[0.5] * 3))
    brief = RunBrief(objective="mpp", model="tiny", dataset="digits", image_size=16, seed=0)
    reports = {
        "fewshot.json": run_fewshot(vit, data, embed, (1, 2), 2, (1024.0, 1.0), 60, **common).with_head(
            head, run_config=brief, model=None),
        "linear-probe.json": run_linear_probe(vit, data, embed, (1.0, 1024.0), 0.1, 200, 60, **common).with_head(head),
        "knn.json": run_knn(vit, data, embed, (5, 10), 0.07, 200, 60, **common).with_head(head, model=None),
        "summary.json": Summary(objective="mpp", steps=7, wall_time_s=12.0, eval={"loss": 1.0}, last_train={},
                                kernels=KERNELS, skipped_images=SkippedImages(train=0, eval=0)),
    }
    run = tmp_path_factory.mktemp("records") / "tiny"
    run.mkdir()
    write_json(run / "config.json", {"train": {"objective": "mpp", "dataset": "digits", "model": "tiny"},
                                     "vit": {**TINY, "num_classes": 0}})
    for name, record in reports.items():
        write_json(run / name, record.to_json())
    return run, reports


def test_each_probe_reads_back_the_record_it_wrote(probed):
    run, reports = probed
    for name, record in reports.items():
        again = read_record(run / name, report_class(name))
        assert again == record, name  # the same dataclass, field for field
        assert written(again) == (run / name).read_text()
    fewshot = reports["fewshot.json"]
    assert list(fewshot.to_json())[:10] == ["init", "run", "checkpoint", "step", "features", "kernels",
                                            "reference_seed", "imported", "run_config", "model"]  # as eval/fewshot.py
    assert list(reports["linear-probe.json"].to_json())[-1] == "vit"  # eval/linear_probe.py writes it last
    assert fewshot.layers.results["2/token+norm"] == fewshot.results  # the headline is the sweep's last block
    assert fewshot.references.pixels.grid == 16 and fewshot.pixels_size() == 16


def test_the_comparison_reads_the_probes_records_into_its_row(probed):
    run, reports = probed
    notes = []
    row, baselines = read_run(run, "tiny", notes)
    fewshot, probe, knn = reports["fewshot.json"], reports["linear-probe.json"], reports["knn.json"]
    assert isinstance(row.fewshot["digits"], FewshotEntry) and row.fewshot["digits"].step == 7
    assert row.fewshot["digits"].results == {int(k): Score(r.mean, r.std) for k, r in fewshot.results.items()}
    assert isinstance(row.linear_probe, LinearProbeEntry) and row.linear_probe.accuracy == probe.accuracy
    assert isinstance(row.knn, KnnEntry) and row.knn.results == {r.k: r.accuracy for r in knn.results.values()}
    assert row.knn.temperature == 0.07 and row.knn.layers.blocks == [1, 2] and row.steps == 7 and not notes
    assert row.label == "mpp"  # the run's config names the objective: no timm label
    pixels = [b for b in baselines if b.kind == "pixels"]
    assert {b.probe for b in pixels} == {"fewshot", "linear_probe", "knn"} and {b.label for b in pixels} == {"16 px"}
    assert [b.entry.where for b in baselines] == ["references.random_init", "references.pixels"] * 3
