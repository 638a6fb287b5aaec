"""Evaluators inside training (mpp.eval.evaluator, mpp.eval.in_run): a new one is one class and one
registration, and it runs when it is due, at step 0 if it asks, and at the end; the training goes on
bitwise as without it."""
from __future__ import annotations

import json

import pytest
import torch
from helpers.runs import FAST, read_metrics

from mpp.eval import in_run
from mpp.eval.evaluator import Evaluator, RunView, TrainState


class WeightNorm(Evaluator):
    """A toy: the ViT's patch-embedding weight norm, every 2 steps and at step 0."""

    name = "toy_norm"
    at_start = True
    seen: list[int] = []  # the steps it ran at, in this process

    def __init__(self, view: RunView):
        self.every = 2

    def run(self, state: TrainState) -> dict[str, float]:
        WeightNorm.seen.append(state.step)
        return {"toy/patch_embed_norm": float(state.objective.vit.patch_embed.proj.weight.detach().norm())}


@pytest.fixture
def toy_evaluator(monkeypatch):
    monkeypatch.setattr(in_run, "EVALUATORS", dict(in_run.EVALUATORS))  # the registration ends with the test
    WeightNorm.seen = []
    in_run.register_evaluator(WeightNorm.name, WeightNorm)
    yield WeightNorm
    WeightNorm.seen = []


def test_an_evaluator_added_by_one_registration_runs_when_due(toy_evaluator, tmp_path):
    from mpp.train.pretrain import main

    run = tmp_path / "toy"
    main("mpp", ["--output-dir", str(run), *FAST, "--max-steps", "5", "--eval-every", "0"])
    assert toy_evaluator.seen == [0, 2, 4, 5]  # at the start, every 2 steps within training, at the end
    logged = {m["step"]: m["toy/patch_embed_norm"] for m in read_metrics(run) if "toy/patch_embed_norm" in m}
    assert sorted(logged) == [0, 2, 4, 5]
    assert logged[0] != logged[5]  # it saw the weights move
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and "loss" in summary["eval"]  # the held-out metrics still end the run
    # beside the held-out accuracy, what no learning scores on the same images and draws (mpp.model.floor)
    assert 0 <= summary["eval"]["floor_accuracy"] <= 1 and 0 <= summary["eval"]["accuracy"] <= 1
    assert any("eval/floor_accuracy" in m and "eval/accuracy" in m for m in read_metrics(run))
    with pytest.raises(ValueError, match="registered already"):
        in_run.register_evaluator(WeightNorm.name, WeightNorm)


def test_an_evaluator_leaves_the_training_as_it_was(toy_evaluator, tmp_path, monkeypatch):
    """The same run with and without the toy ends with bitwise the same weights."""
    from mpp.train.pretrain import main

    args = [*FAST, "--max-steps", "4", "--eval-every", "0"]
    main("mpp", ["--output-dir", str(tmp_path / "with"), *args])
    monkeypatch.delitem(in_run.EVALUATORS, WeightNorm.name)
    main("mpp", ["--output-dir", str(tmp_path / "without"), *args])
    with_toy = torch.load(next((tmp_path / "with" / "checkpoints").glob("ckpt-*.pt")), weights_only=True)["model"]
    without = torch.load(next((tmp_path / "without" / "checkpoints").glob("ckpt-*.pt")), weights_only=True)["model"]
    assert with_toy.keys() == without.keys()
    assert all(torch.equal(with_toy[k], without[k]) for k in with_toy)


def test_the_registered_evaluators_and_their_order():
    """Held-out metrics first (a stop during them ends the step's evaluations), then the picture, then
    the few-shot probe; the names are the registration keys."""
    assert list(in_run.EVALUATORS) == ["held_out", "predictions", "fewshot"]
