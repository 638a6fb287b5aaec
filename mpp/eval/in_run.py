"""The evaluators a pretraining run runs (mpp.eval.evaluator's interface), in the order they run at a
step. A new evaluator is one module (an `Evaluator` subclass with a factory) and one registration:
`register_evaluator("name", factory)` (the class itself, or a classmethod that may decline), or a line in
the table below."""
from __future__ import annotations

from mpp.eval.evaluator import Evaluator, EvaluatorFactory, RunView
from mpp.eval.fewshot_monitor import FewshotEvaluator
from mpp.eval.held_out import HeldOutMetrics, PredictionMosaic

HELD_OUT = HeldOutMetrics.name  # the evaluator whose final metrics summary.json records as "eval"

EVALUATORS: dict[str, EvaluatorFactory] = {
    HELD_OUT: HeldOutMetrics,  # first: a stop during it ends the step's evaluations; it never declines
    PredictionMosaic.name: PredictionMosaic.build,
    FewshotEvaluator.name: FewshotEvaluator.build,
}


def register_evaluator(name: str, factory: EvaluatorFactory) -> None:
    """Add an evaluator to every run started after this; it runs after those registered before it."""
    if name in EVALUATORS:
        raise ValueError(f"an evaluator named '{name}' is registered already")
    EVALUATORS[name] = factory


def build_evaluators(view: RunView) -> list[Evaluator]:
    """The run's evaluators, in registration order: each registered factory's, unless it declines (None)."""
    built = [factory(view) for factory in EVALUATORS.values()]
    return [e for e in built if e is not None]
