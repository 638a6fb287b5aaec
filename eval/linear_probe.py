"""Linear probe on all the training data of frozen ViT features, with l2 chosen on a dev split.

The protocol: embed the whole train and test splits (eval transform, the final-norm class token,
"pre_logits"); hold out a stratified dev split of the training features (`--dev-fraction`, seed 0);
fit the closed-form regularised least-squares probe (mpp.eval.probes) on the rest for every l2 of
a grid (one eigendecomposition); keep the l2 with the best dev accuracy (ties: the larger l2); refit
on all the training features with it; score the test split once. The l2 is chosen on dev, never on
test: picking it by test accuracy would make the reported number an optimistic, tuned-on-test one.
Usage: `python eval/linear_probe.py --run runs/mpp`; it also scores a random init of the same
architecture and the raw pixels on the same split (`--no-references` skips them), and with
`--layers all` every block's features.
The few-shot protocol, with its l2 fixed in advance, stays in eval/fewshot.py.
"""
from __future__ import annotations

from mpp.core.config import Parser
from mpp.core.errors import cli_main
from mpp.data.sources import dataset_name
from mpp.eval.features import is_main_process, layer_specs
from mpp.eval.probe_config import LinearProbeConfig
from mpp.eval.probe_runs import ProbeData, run_linear_probe
from mpp.eval.probe_setup import (
    REFERENCE_NAMES,
    ProbeTarget,
    build_probe_parser,
    claim_report,
    embedder,
    layer_lines,
    parse_probe_args,
    probe_target,
    random_init_like,
    save_report,
    with_flag_advice,
)


def build_parser() -> Parser:
    return build_probe_parser(LinearProbeConfig, __doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None) -> LinearProbeConfig:
    return parse_probe_args(LinearProbeConfig, build_parser(), argv)


@cli_main
@with_flag_advice
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    target = probe_target(config, "linear_probe")
    # An unlabelled dataset is refused here, before anything is written; the report is claimed before the embedding.
    data = ProbeData.load(target.dataset, target.vit.config.image_size)
    with claim_report(target.output(config)):  # until it is written: a second probe on it is refused
        return probe(config, target, data)


def probe(config: LinearProbeConfig, target: ProbeTarget, data: ProbeData) -> dict:
    """Score the model and its references, print the table, write the report (main process only);
    the report as written."""
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size, output = vit.config.image_size, target.output(config)
    layers = layer_specs(vit.config.depth, config.layers)
    out = run_linear_probe(vit, data, embedder(config), l2s=config.l2, dev_fraction=config.dev_fraction,
                           max_train=config.max_train, max_test=config.max_test, features=config.features,
                           layers=layers, random_init=random_init_like(config, target), pixels=config.references)

    used = out.dataset
    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out.feature_dim}-d features, "
          f"{used.train_size - used.dev_size} fit + {used.dev_size} dev training images, "
          f"{used.test_size} test images")
    print(f"{'l2':>10} | dev accuracy (%)")
    for l2 in out.l2_grid:
        mark = "  <- chosen" if l2 == out.l2 else ""
        print(f"{l2:>10.6g} | {100 * out.dev_accuracy[f'{l2:.12g}']:6.2f}{mark}")
    print(f"l2 = {out.l2:.12g} (best on dev), refit on all {used.train_size} training images: "
          f"test accuracy {100 * out.accuracy:.2f}%")
    if len(out.l2_grid) > 1 and out.l2 in (min(out.l2_grid), max(out.l2_grid)):
        # The dev optimum may lie beyond the grid: say so rather than silently report a clipped choice.
        edge = "smallest" if out.l2 == min(out.l2_grid) else "largest"
        print(f"note: the chosen l2 is the grid's {edge}; a wider --l2 grid may do better on dev")
    references = out.references.items() if out.references else []
    rows = [("model", out)] + [(REFERENCE_NAMES[key] + (f" ({ref.grid} px)" if key == "pixels" else ""), ref)
                               for key, ref in references]
    print(f"{'':>18} | test accuracy (%) | l2")
    for name, r in rows:
        print(f"{name:>18} | {100 * r.accuracy:17.2f} | {r.l2:.12g}")
    if out.layers is not None:
        pixels = out.references.pixels if out.references else None
        print("\n".join(layer_lines(out.layers, lambda r: r.accuracy, "test accuracy", pixels)))

    report = out.with_head(target.report_head(config))
    save_report(target, output, report, {f"{prefix}/{dataset_name(dataset)}": out.accuracy}, "linear_probe")
    return report.to_json()


if __name__ == "__main__":
    main()
