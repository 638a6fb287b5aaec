"""Weighted k-NN evaluation of frozen ViT features (DINO's protocol, facebookresearch/dino eval_knn.py).

The protocol: embed the training and test splits (eval transform, the final-norm class token,
"pre_logits"); L2-normalise the features; each test image's k most cosine-similar training images
vote for their class with weight exp(similarity / T); the class with the largest sum is the
prediction. Every k of `--k` comes from one neighbour search (mpp.eval.probes.knn_probe_grid), which
works in chunks, so the 1.28 M features of ImageNet's training split fit in memory. Nothing is
fitted and nothing is chosen on the test split. Usage: `python eval/knn.py --run runs/mpp`; it also
scores a random init of the same architecture and the raw pixels on the same images
(`--no-references` skips them), and with `--layers all` every block's features.
"""
from __future__ import annotations

from mpp.core.config import Parser
from mpp.core.errors import cli_main
from mpp.data.sources import dataset_name
from mpp.eval.features import is_main_process, layer_specs
from mpp.eval.probe_config import KnnConfig
from mpp.eval.probe_runs import ProbeData, knn_plan, run_knn
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
    return build_probe_parser(KnnConfig, __doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None) -> KnnConfig:
    return parse_probe_args(KnnConfig, build_parser(), argv)


@cli_main
@with_flag_advice
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    target = probe_target(config, "knn")
    # The data first: a dataset the probe refuses, or a --k it has too few training images for,
    # leaves nothing written (not even the output's folder); then the output, before the embedding.
    data = ProbeData.load(target.dataset, target.vit.config.image_size)
    knn_plan(data, config.k, config.temperature, config.max_train, config.max_test)
    with claim_report(target.output(config)):  # until it is written: a second probe on it is refused
        return probe(config, target, data)


def probe(config: KnnConfig, target: ProbeTarget, data: ProbeData) -> dict:
    """Score the model and its references, print the table, write the report (main process only);
    the report as written."""
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size, output = vit.config.image_size, target.output(config)
    layers = layer_specs(vit.config.depth, config.layers)
    out = run_knn(vit, data, embedder(config), ks=config.k, temperature=config.temperature,
                  max_train=config.max_train, max_test=config.max_test, features=config.features, layers=layers,
                  random_init=random_init_like(config, target), pixels=config.references)

    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out.feature_dim}-d features, T = {out.temperature:g}, "
          f"{out.dataset.train_used} training images, {out.dataset.test_used} test images")
    references = out.references.items() if out.references else []
    rows = [("model", out.results)] + [(REFERENCE_NAMES[k], r.results) for k, r in references]
    print(f"{'':>11} | " + " | ".join(f"{k + '-NN':>7}" for k in out.results) + "   (test accuracy, %)")
    for name, results in rows:
        print(f"{name:>11} | " + " | ".join(f"{100 * r.accuracy:7.2f}" for r in results.values()))
    if out.layers is not None:
        top = str(max(out.k))
        pixels = out.references.pixels.results if out.references and out.references.pixels else None
        print("\n".join(layer_lines(out.layers, lambda r: r[top].accuracy, f"{top}-NN", pixels)))

    report = out.with_head(target.report_head(config), model=config.model)
    scalars = {f"{prefix}/{dataset_name(dataset)}/{k}nn": r.accuracy for k, r in out.results.items()}
    save_report(target, output, report, scalars, "knn")
    return report.to_json()


if __name__ == "__main__":
    main()
