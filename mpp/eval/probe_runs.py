"""The three probe protocols on a model and a dataset: few-shot (fixed draws, fixed l2), the linear
probe (l2 chosen on a dev split) and weighted k-NN (DINO's), each over one or several feature sets
from one forward pass, and each beside two references scored on exactly the same images: a random
init of the same architecture, and the raw pixels at the model's resolution.

eval/fewshot.py, eval/linear_probe.py and eval/knn.py are their command lines; the training loop's
in-run probe (mpp.eval.fewshot_monitor) uses the same draws and solvers. The math is mpp.eval.probes'.
Each protocol returns its report (mpp.run.records) but for the head, what was probed, which the command
line adds (`ProbeHead.with_head`) before writing it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpp.data.sources import LABELLED_FORMS, build_dataset
from mpp.eval.features import (
    FeatureSpec,
    extract_feature_sets,
    headline_spec,
    pixel_featurizer,
    pixel_grid,
    vit_featurizer,
)
from mpp.eval.probes import (
    DEFAULT_L2S,
    check_knn,
    fewshot_probe_grid,
    fixed_subset,
    knn_probe_grid,
    linear_probe,
    sample_shots,
    stratified_dev_split,
)
from mpp.run.records import (
    DatasetUsed,
    FewshotLayers,
    FewshotReference,
    FewshotReferences,
    FewshotReport,
    KnnLayers,
    KnnReference,
    KnnReferences,
    KnnReport,
    KnnResult,
    L2Point,
    LayerSweep,
    LinearProbeLayers,
    LinearProbeReferences,
    LinearProbeReport,
    LinearProbeResult,
    References,
    ShotResult,
)

STD_KIND = "population (ddof=0) over seeds"
KNN_KS = (10, 20)  # DINO's k-NN: 10 and 20 neighbours,
KNN_TEMPERATURE = 0.07  # votes weighted exp(cosine similarity / 0.07)


@dataclass(frozen=True)
class FewshotDraws:
    """The few-shot images, fixed before any model is seen: `shots` images per class for every
    (shot count, seed), the union of them to embed once, and the test images (all, or a fixed subset).
    The same draws score every model and reference, and every point of a run's curve."""
    shots: tuple[int, ...]  # examples per class, e.g. (1, 5, 10, 25)
    seeds: int  # draws per shot count: seeds 0..seeds-1
    picks: dict  # (shots, seed) → indices into the training split, in draw order
    union: np.ndarray  # sorted indices of every training image some draw uses
    test: np.ndarray | None  # indices into the test split; None: all of it

    @classmethod
    def draw(cls, train_labels, test_size: int, shots, seeds: int, max_test: int = 0, num_classes: int | None = None,
             class_names=None) -> FewshotDraws:
        """The draws of `shots` images per class, seeds 0..seeds-1; a class smaller than a shot count
        raises TooFewShots (mpp.eval.probes.sample_shots), naming it by `class_names` when given."""
        shots = tuple(dict.fromkeys(int(k) for k in shots))  # dedupe, keep the order
        picks = {(k, s): sample_shots(train_labels, k, s, num_classes, class_names)
                 for k in shots for s in range(seeds)}
        union = np.unique(np.concatenate(list(picks.values())))
        return cls(shots, seeds, picks, union, fixed_subset(test_size, max_test))

    def score(self, train_x, train_y, test_x, test_y, l2s, num_classes: int | None) -> dict[str, ShotResult]:
        """{str(shots): its result} for features of `union` (train_x, in union order) and of the test
        images; the headline is the first l2."""
        results = {}
        for k in self.shots:
            per_seed = []  # one {l2: accuracy} per seed
            for s in range(self.seeds):
                rows = np.searchsorted(self.union, self.picks[k, s])
                per_seed.append(fewshot_probe_grid(train_x[rows], train_y[rows], test_x, test_y, l2s, num_classes))
            grid = {f"{l2:.12g}": [acc[l2] for acc in per_seed] for l2 in l2s}  # JSON keys: "1024", "0.1"
            head = grid[f"{l2s[0]:.12g}"]  # fixed in advance: picking the best l2 would use the test set
            results[str(k)] = ShotResult(shots=k, mean=float(np.mean(head)), std=float(np.std(head)), per_seed=head,
                                         l2_grid={key: L2Point(mean=float(np.mean(v)), std=float(np.std(v)), per_seed=v)
                                                  for key, v in grid.items()})
        return results


@dataclass(frozen=True)
class ProbeData:
    """What a probe reads: the two splits at the model's resolution (eval transform), their sizes and classes."""
    spec: str
    image_size: int
    train: object  # ImageDataset (mpp.data.datasets), eval transform
    test: object
    num_classes: int
    class_names: tuple

    @classmethod
    def load(cls, spec: str, image_size: int) -> ProbeData:
        """Both splits of a labelled dataset; an unlabelled one is refused (one line) before anything is read."""
        fix = (f"a probe scores classes: pass a labelled dataset to probe (--dataset SPEC to the probe CLIs, "
               f"--fewshot-dataset SPEC in pretraining): {LABELLED_FORMS}")
        train, info = build_dataset(spec, "train", image_size, train=False)
        train.require_labels(fix)
        test, _ = build_dataset(spec, "test", image_size, train=False)
        test.require_labels(fix, train=info)  # every test image of a class the probe learns
        return cls(spec, image_size, train, test, info.num_classes, tuple(info.class_names))


@dataclass(frozen=True)
class Embedder:
    """How features are computed: batch size, device, loader workers, progress bars."""
    batch_size: int = 256
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True

    def __call__(self, featurize, module, dataset, indices, desc: str):
        return extract_feature_sets(featurize, module, dataset, self.batch_size, self.device, indices,
                                    self.num_workers, self.progress, desc)

    def scorer(self, data: ProbeData, train_idx, test_idx, score: Callable) -> Callable[..., dict]:
        """`probed(featurize, module, who)` → {feature name: score(train features, train labels, test
        features, test labels)}: one embedding of the training images `train_idx` and the test images
        `test_idx` (None: all) by `featurize` through `module`, every feature it makes scored."""
        def probed(featurize, module, who: str) -> dict:
            train_x, train_y = self(featurize, module, data.train, train_idx, f"{who} train")
            test_x, test_y = self(featurize, module, data.test, test_idx, f"{who} test")
            return {n: score(train_x[n], train_y, test_x[n], test_y) for n in train_x}

        return probed


def model_specs(vit, features: str, layers: list[FeatureSpec]) -> tuple[FeatureSpec, list[FeatureSpec]]:
    """(the headline spec, every spec to embed: the headline first, then the layer sweep's)."""
    head = headline_spec(vit.config.depth, features)
    return head, list({s.name: s for s in [head, *layers]}.values())


def run_fewshot(vit, data: ProbeData, embed: Embedder, shots=(1, 5, 10, 25), seeds: int = 3, l2s=(2**10,),
                max_test: int = 0, features: str = "token", layers: list[FeatureSpec] = (),
                random_init=None, pixels: bool = False) -> FewshotReport:
    """Few-shot accuracies of `vit`'s features for every shot count over seeds 0..seeds-1: the
    headline feature ("results"), every layer spec ("layers"), and the references (a `random_init`
    ViT of the same architecture, the raw `pixels`) on the same draws and test images."""
    l2s = list(dict.fromkeys(float(v) for v in l2s))
    draws = FewshotDraws.draw(data.train.labels().numpy(), len(data.test), shots, seeds, max_test,
                              data.num_classes, data.class_names)
    head, specs = model_specs(vit, features, layers)

    def score(train_x, train_y, test_x, test_y) -> FewshotReference:
        return FewshotReference(results=draws.score(train_x, train_y, test_x, test_y, l2s, data.num_classes),
                                feature_dim=int(train_x.shape[1]))

    found, references, sweep = with_references(
        embed.scorer(data, draws.union, draws.test, score), vit, head, specs, layers, random_init, pixels,
        data.image_size, FewshotReferences, FewshotLayers, layer_brief=results_of)
    used = DatasetUsed(spec=data.spec, image_size=data.image_size, num_classes=data.num_classes,
                       train_size=len(data.train), test_size=len(data.test),
                       test_used=len(data.test) if draws.test is None else len(draws.test),
                       train_embedded=len(draws.union))
    return FewshotReport(vit=dataclasses.asdict(vit.config), dataset=used, shots=list(draws.shots),
                         seeds=list(range(seeds)), l2_grid=l2s, headline_l2=l2s[0], std=STD_KIND,
                         feature_dim=found[head.name].feature_dim, results=found[head.name].results,
                         references=references, layers=sweep)


def results_of(result: FewshotReference | KnnReference) -> dict:
    """What a layer sweep keeps of a few-shot or k-NN result: its results ({str(shots or k): result})."""
    return result.results


def with_references(probed: Callable[..., dict], vit, head: FeatureSpec, specs: list[FeatureSpec],
                    layers: list[FeatureSpec], random_init, pixels: bool, image_size: int,
                    references_as: type[References], layers_as: type[LayerSweep], brief: Callable = lambda r: r,
                    layer_brief: Callable | None = None) -> tuple[dict, References | None, LayerSweep | None]:
    """(the model's result per feature name, the report's "references" and "layers", each None when
    there are none): `probed` (Embedder.scorer) run on `vit`'s `specs`, on the `random_init` ViT's and
    on the raw `pixels`; a reference keeps `brief(result)` (a record with image_size and grid, which
    the pixels' set), a layer sweep `layer_brief(result)` (default: brief). `references_as`,
    `layers_as`: the probe's classes of them (mpp.run.records)."""
    layer_brief = layer_brief or brief
    found = probed(vit_featurizer(vit, specs), vit, "model")
    references, random_layers = {}, None
    if random_init is not None:
        ref = probed(vit_featurizer(random_init, specs), random_init, "random init")
        references["random_init"] = brief(ref[head.name])
        random_layers = {s.name: layer_brief(ref[s.name]) for s in layers}
    if pixels:
        ref = probed(pixel_featurizer(image_size), None, "pixels")
        references["pixels"] = dataclasses.replace(brief(ref["pixels"]), image_size=image_size,
                                                   grid=pixel_grid(image_size))
    sweep = layers_as(features=[s.name for s in layers], specs=[s.record() for s in layers],
                      results={s.name: layer_brief(found[s.name]) for s in layers},
                      random_init=random_layers) if layers else None
    return found, references_as(**references) if references else None, sweep


def run_linear_probe(vit, data: ProbeData, embed: Embedder, l2s=DEFAULT_L2S, dev_fraction: float = 0.1,
                     max_train: int = 0, max_test: int = 0, features: str = "token",
                     layers: list[FeatureSpec] = (), random_init=None, pixels: bool = False) -> LinearProbeReport:
    """The linear probe of `vit`'s features (l2 chosen on a stratified dev split of the training
    images, refit on all of them, scored once on test): headline, layers and references alike."""
    train_idx, test_idx = fixed_subset(len(data.train), max_train), fixed_subset(len(data.test), max_test)
    labels = data.train.labels().numpy()  # int64 [n]
    # The same split linear_probe draws below, drawn here once on the labels alone so that a class
    # too small for it stops the run before the (long) embedding.
    stratified_dev_split(labels if train_idx is None else labels[train_idx], dev_fraction,
                         num_classes=data.num_classes, class_names=data.class_names)
    head, specs = model_specs(vit, features, layers)

    def score(train_x, train_y, test_x, test_y) -> dict:
        return {**linear_probe(train_x, train_y, test_x, test_y, l2s, dev_fraction, data.num_classes,
                               data.class_names), "feature_dim": int(train_x.shape[1])}

    def brief(r: dict) -> LinearProbeResult:
        return LinearProbeResult(accuracy=r["accuracy"], l2=r["l2"], feature_dim=r["feature_dim"])

    found, references, sweep = with_references(
        embed.scorer(data, train_idx, test_idx, score), vit, head, specs, layers, random_init, pixels,
        data.image_size, LinearProbeReferences, LinearProbeLayers, brief)
    main = found[head.name]
    used = DatasetUsed(spec=data.spec, image_size=data.image_size, num_classes=data.num_classes,
                       train_size=main["train_size"], dev_size=main["dev_size"], test_size=main["test_size"])
    return LinearProbeReport(dataset=used, feature_dim=main["feature_dim"], l2_grid=main["l2_grid"],
                             dev_accuracy={f"{l2:.12g}": acc for l2, acc in main["dev_accuracy"].items()},  # "1024"
                             l2=main["l2"], accuracy=main["accuracy"], references=references, layers=sweep,
                             vit=dataclasses.asdict(vit.config))


def knn_plan(data: ProbeData, ks, temperature: float, max_train: int = 0,
             max_test: int = 0) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
    """(the k values, deduplicated in order; the training indices; the test indices; None: all of a
    split) of the k-NN probe, once `ks` and `temperature` are usable with that many training images;
    else the one-line UsageError. It reads the labels only: eval/knn.py asks before writing anything."""
    train_idx, test_idx = fixed_subset(len(data.train), max_train), fixed_subset(len(data.test), max_test)
    ks = check_knn(ks, temperature, len(data.train) if train_idx is None else len(train_idx))
    return ks, train_idx, test_idx


def knn_results(train_x, train_y, test_x, test_y, ks, temperature: float,
                num_classes: int | None) -> dict[str, KnnResult]:
    """{str(k): its result} for every k, from one neighbour search (as reports hold them)."""
    found = knn_probe_grid(train_x, train_y, test_x, test_y, ks, temperature, num_classes)
    return {str(k): KnnResult(k=k, accuracy=accuracy) for k, accuracy in found.items()}


def run_knn(vit, data: ProbeData, embed: Embedder, ks=KNN_KS, temperature: float = KNN_TEMPERATURE,
            max_train: int = 0, max_test: int = 0, features: str = "token", layers: list[FeatureSpec] = (),
            random_init=None, pixels: bool = False) -> KnnReport:
    """Weighted k-NN accuracy of `vit`'s features for every k in `ks` (the training split, or a fixed
    `max_train` of it, against the test split or a fixed `max_test`): headline, layers and references
    alike, every one from one embedding of the same images."""
    ks, train_idx, test_idx = knn_plan(data, ks, temperature, max_train, max_test)  # before the (long) embedding
    head, specs = model_specs(vit, features, layers)

    def score(train_x, train_y, test_x, test_y) -> KnnReference:
        return KnnReference(results=knn_results(train_x, train_y, test_x, test_y, ks, temperature, data.num_classes),
                            feature_dim=int(train_x.shape[1]))

    found, references, sweep = with_references(
        embed.scorer(data, train_idx, test_idx, score), vit, head, specs, layers, random_init, pixels,
        data.image_size, KnnReferences, KnnLayers, layer_brief=results_of)
    used = DatasetUsed(spec=data.spec, image_size=data.image_size, num_classes=data.num_classes,
                       train_size=len(data.train), test_size=len(data.test),
                       train_used=len(data.train) if train_idx is None else len(train_idx),
                       test_used=len(data.test) if test_idx is None else len(test_idx))
    return KnnReport(vit=dataclasses.asdict(vit.config), dataset=used, k=ks, temperature=temperature,
                     results=found[head.name].results, feature_dim=found[head.name].feature_dim,
                     references=references, layers=sweep)
