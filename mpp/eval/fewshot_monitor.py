"""The few-shot probe inside a pretraining run (`--fewshot-every STEPS`): how the frozen features
score along the run, from step 0 (the untrained model: the random-init level on the same curve).

The draws are fixed when the run starts (1/5/10/25 images per class, 3 draws each, and a fixed
random subset of at most `--fewshot-max-images` test images), so every point of the curve scores
the same images with the same solver as eval/fewshot.py (mpp.eval.probe_runs). Those images are decoded
once and held in memory when they fit (CACHE_BYTES); each probe then costs one forward pass over
them. The run's log states the count when it starts. From the same features it also scores DINO's
weighted k-NN (k = 10, 20; T = 0.07; mpp.eval.probes.knn_probe_grid) with the union of the draws'
images as its training set, against the same test images: at most 123 training images per class
rather than the whole split, so its numbers sit below eval/knn.py's, on the same curve from step 0.

It never changes the training: the model is read in eval mode without gradients, every random
generator is restored afterwards, and the training loader is not touched, so a run ends with
bitwise the weights it has without the probe (tests/test_fewshot_monitor.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mpp.core.errors import TooFewShots, UsageError
from mpp.data.sources import LABELLED_FORMS, dataset_name
from mpp.eval.evaluator import Evaluator, RunView, TrainState
from mpp.eval.features import headline_spec, vit_featurizer
from mpp.eval.probe_runs import KNN_KS, KNN_TEMPERATURE, Embedder, FewshotDraws, ProbeData
from mpp.eval.probes import knn_probe_grid
from mpp.run.checkpoint import rng_state, set_rng_state

SHOTS = (1, 5, 10, 25)  # the paper's few-shot counts
DRAWS = 3  # draws per shot count (seeds 0..2), as eval/fewshot.py's default
L2 = 2.0**10  # the paper's fixed ridge penalty
CACHE_BYTES = 512 * 2**20  # the probe's images are decoded once and held in memory when they fit in this


@dataclass(frozen=True)
class ProbeSet:
    """One dataset the in-run probe scores: its images and its fixed draws, and the images those
    draws use, decoded once at the start when they fit in CACHE_BYTES (else read again per probe)."""
    name: str  # the short name in metric tags: fewshot/<name>/<k>shot
    data: ProbeData
    draws: FewshotDraws
    train: Dataset  # the draws' union, in union order (cached) or the training split (read by index)
    test: Dataset  # the test images used, in order (cached) or the test split
    cached: bool

    @classmethod
    def build(cls, spec: str, image_size: int, max_images: int) -> ProbeSet:
        data = ProbeData.load(spec, image_size)  # loaded whole: the draws pick images by index
        try:
            draws = FewshotDraws.draw(data.train.labels().numpy(), len(data.test), SHOTS, DRAWS, max_images,
                                      data.num_classes, data.class_names)
        except TooFewShots as e:  # the same facts, said as the in-run probe's
            raise TooFewShots(e.who, e.have, e.need, problem=f"the in-run few-shot probe of '{spec}' "
                              f"needs {max(SHOTS)} training images of every class ({e.problem})") from None
        count = len(draws.union) + (len(data.test) if draws.test is None else len(draws.test))
        if count * 3 * image_size**2 * 4 > CACHE_BYTES:
            return cls(dataset_name(spec), data, draws, data.train, data.test, cached=False)
        test = range(len(data.test)) if draws.test is None else draws.test
        return cls(dataset_name(spec), data, draws, held(data.train, draws.union), held(data.test, test), cached=True)

    def indices(self):
        """(train indices, test indices) into `train` and `test`."""
        return (None, None) if self.cached else (self.draws.union, self.draws.test)


def held(dataset, indices) -> TensorDataset:
    """The items `indices` of `dataset`, decoded once (float32 images exactly as the dataset gives them)."""
    loader = DataLoader(Subset(dataset, [int(i) for i in indices]), batch_size=256, shuffle=False, num_workers=0)
    images, labels = zip(*[(x, torch.as_tensor(y).reshape(-1)) for x, y in loader], strict=True)
    return TensorDataset(torch.cat(images), torch.cat(labels))  # (n, 3, S, S), (n,)


class FewshotMonitor:
    """Scores the run's ViT by the few-shot probe on `specs` (the run's dataset, a transfer set, ...).

    `__call__(vit, device)` → {"fewshot/<dataset>/<k>shot": mean accuracy (the class token),
    "fewshot_avg/<dataset>/<k>shot": (the mean patch token), "knn/<dataset>/<k>nn" and
    "knn_avg/<dataset>/<k>nn": k-NN accuracy (the draws' union as training set)}, identical on every process."""

    def __init__(self, specs: list[str], image_size: int, max_images: int, batch_size: int = 256):
        self.batch_size = batch_size  # images per forward pass: the run's micro-batch, which fits beside training
        saved = rng_state()  # decoding the images once draws nothing the run's streams would miss
        try:
            self.sets = [ProbeSet.build(spec, image_size, max_images) for spec in dict.fromkeys(specs)]
        finally:
            set_rng_state(saved)

    def cost(self) -> str:
        """What each probe embeds, for the run's log."""
        parts = [f"{s.name}: {len(s.draws.union)} train + "
                 f"{len(s.data.test) if s.draws.test is None else len(s.draws.test)}"
                 f" test images{' (held in memory)' if s.cached else ''}" for s in self.sets]
        return "; ".join(parts)

    @torch.no_grad()
    def __call__(self, vit, device) -> dict[str, float]:
        saved = rng_state()  # the loader's base seed draw and anything else below must not move the run's streams
        try:
            specs = [headline_spec(vit.config.depth, "token"), headline_spec(vit.config.depth, "avg")]
            featurize = vit_featurizer(vit, specs)
            embed = Embedder(batch_size=self.batch_size, device=str(device), num_workers=0, progress=False)
            values = {}
            for s in self.sets:
                train_idx, test_idx = s.indices()
                train_x, train_y = embed(featurize, vit, s.train, train_idx, "fewshot train")
                test_x, test_y = embed(featurize, vit, s.test, test_idx, "fewshot test")
                for spec, suffix in zip(specs, ("", "_avg"), strict=True):
                    scored = s.draws.score(train_x[spec.name], train_y, test_x[spec.name], test_y, [L2],
                                           s.data.num_classes)
                    values.update({f"fewshot{suffix}/{s.name}/{k}shot": r.mean for k, r in scored.items()})
                    nearest = knn_probe_grid(train_x[spec.name], train_y, test_x[spec.name], test_y, KNN_KS,
                                             KNN_TEMPERATURE, s.data.num_classes)
                    values.update({f"knn{suffix}/{s.name}/{k}nn": accuracy for k, accuracy in nearest.items()})
            return values
        finally:
            set_rng_state(saved)


class FewshotEvaluator(Evaluator):
    """The in-run few-shot and k-NN probe as a run's evaluator: every --fewshot-every steps, at step 0
    (the random-init level on the same curve) and at the end; its time is logged ("fewshot/seconds")
    and left out of the training throughput."""

    name = "fewshot"
    at_start = True
    timed = True

    def __init__(self, monitor: FewshotMonitor, every: int):
        self.monitor, self.every = monitor, every

    @classmethod
    def build(cls, view: RunView) -> FewshotEvaluator | None:
        config, info = view.config, view.info
        if not config.fewshot_every:
            return None
        if not info.labelled and not config.fewshot_dataset:
            raise UsageError(f"--fewshot-every probes the run's dataset, which has no labels ({info.layout}): "
                             f"pass --fewshot-dataset SPEC, a labelled dataset to probe instead ({LABELLED_FORMS})")
        # A stream cannot be probed by index (TrainConfig.validate asked for a --fewshot-dataset), nor unlabelled data.
        own = [config.dataset] if info.labelled and not view.streamed else []
        try:
            monitor = FewshotMonitor(own + ([config.fewshot_dataset] if config.fewshot_dataset else []),
                                     view.image_size, config.fewshot_max_images, batch_size=view.micro_batch)
        except TooFewShots as e:  # said in pretraining's flags: it has no --shots to lower
            raise e.advised("drop --fewshot-every, or pass a --fewshot-dataset with more") from e
        return cls(monitor, config.fewshot_every)

    def describe(self) -> str:
        return (f"few-shot probe every {self.every} steps, at step 0 and at the end (1/5/10/25 shots × 3 draws, "
                f"l2 = 2^10; k-NN, k = 10 and 20, on the draws' images), each embedding {self.monitor.cost()}")

    def run(self, state: TrainState) -> dict[str, float]:
        return self.monitor(state.objective.vit, state.accelerator.device)
