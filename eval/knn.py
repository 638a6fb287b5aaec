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

import argparse

from mpp.core.config import AT_LEAST_1, POSITIVE, Parser, number_flag
from mpp.core.errors import cli_main
from mpp.data.sources import dataset_name
from mpp.eval.features import is_main_process, layer_specs
from mpp.eval.probe_runs import KNN_KS, KNN_TEMPERATURE, Embedder, ProbeData, knn_plan, run_knn
from mpp.eval.probe_setup import (
    REFERENCE_NAMES,
    ProbeTarget,
    add_model_flags,
    add_output_flag,
    add_runtime_flags,
    add_subset_flags,
    claim_report,
    layer_lines,
    parse_probe_args,
    probe_target,
    random_init_like,
    save_report,
)


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    number_flag(p, "--k", int, AT_LEAST_1, nargs="+", default=list(KNN_KS),
                help="neighbours that vote, each at most the training images used (10 20)")
    number_flag(p, "--temperature", float, POSITIVE, default=KNN_TEMPERATURE, metavar="T",
                help="a neighbour's vote is exp(cosine similarity / T) (0.07)")
    add_subset_flags(p)
    add_runtime_flags(p)
    add_output_flag(p, "knn")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_probe_args(build_parser(), argv)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    target = probe_target(args, "knn")
    # The data first: a dataset the probe refuses, or a --k it has too few training images for,
    # leaves nothing written (not even the output's folder); then the output, before the embedding.
    data = ProbeData.load(target.dataset, target.vit.config.image_size)
    knn_plan(data, args.k, args.temperature, args.max_train, args.max_test)
    with claim_report(target.output(args)):  # until it is written: a second probe on it is refused
        return probe(args, target, data)


def probe(args: argparse.Namespace, target: ProbeTarget, data: ProbeData) -> dict:
    """Score the model and its references, print the table, write the report (main process only);
    the report as written."""
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size, output = vit.config.image_size, target.output(args)
    layers = layer_specs(vit.config.depth, args.layers)
    out = run_knn(vit, data, Embedder(args.batch_size, args.device, args.num_workers), tuple(args.k),
                  args.temperature, args.max_train, args.max_test, args.features, layers,
                  random_init_like(args, target), pixels=args.references)

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

    report = out.with_head(target.report_head(args), model=args.model)
    scalars = {f"{prefix}/{dataset_name(dataset)}/{k}nn": r.accuracy for k, r in out.results.items()}
    save_report(target, output, report, scalars, "knn")
    return report.to_json()


if __name__ == "__main__":
    main()
