"""Few-shot linear evaluation of frozen ViT features (the ViT paper's protocol, arXiv 2010.11929).

k images per class are embedded (the final-norm class token, "pre_logits"), and a regularised
least-squares classifier to {-1,+1} one-hot targets is solved in closed form (mpp.eval.probes), as
big_vision's `fewshot_lsr.py`. Usage: `python eval/fewshot.py --run runs/mpp`. The same draws and
test images also score two references (a random init of the same architecture, the raw pixels;
`--no-references` skips them); `--layers all` probes every block's features as well.
"""
from __future__ import annotations

from mpp.core.config import Parser
from mpp.core.errors import cli_main
from mpp.data.sources import dataset_name
from mpp.eval.features import is_main_process, layer_specs
from mpp.eval.probe_config import FewshotConfig
from mpp.eval.probe_runs import ProbeData, run_fewshot
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
from mpp.run.records import RunBrief


def build_parser() -> Parser:
    return build_probe_parser(FewshotConfig, __doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None) -> FewshotConfig:
    return parse_probe_args(FewshotConfig, build_parser(), argv)


@cli_main
@with_flag_advice
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    target = probe_target(config, "fewshot")
    # An unlabelled dataset is refused here, before anything is written; the report is claimed before the embedding.
    data = ProbeData.load(target.dataset, target.vit.config.image_size)
    with claim_report(target.output(config)):  # until it is written: a second probe on it is refused
        return probe(config, target, data)


def probe(config: FewshotConfig, target: ProbeTarget, data: ProbeData) -> dict:
    """Score the model and its references, print the table, write the report (main process only);
    the report as written."""
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size = vit.config.image_size
    layers = layer_specs(vit.config.depth, config.layers)
    out = run_fewshot(vit, data, embedder(config), shots=config.shots, seeds=config.seeds, l2s=config.l2,
                      max_test=config.max_test, features=config.features, layers=layers,
                      random_init=random_init_like(config, target), pixels=config.references)

    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out.feature_dim}-d features, "
          f"l2={config.l2[0]:g}, {config.seeds} seed(s), {out.dataset.test_used} test images")
    references = out.references.items() if out.references else []
    rows = [("model", out.results)] + [(REFERENCE_NAMES[k], r.results) for k, r in references]
    print(f"{'':>11} | " + " | ".join(f"{k + '-shot':>15}" for k in out.results))
    for name, results in rows:
        print(f"{name:>11} | " + " | ".join(f"{100 * r.mean:6.2f} ± {100 * r.std:5.2f}" for r in results.values()))
    if out.layers is not None:
        top = str(max(out.shots))
        pixels = out.references.pixels.results if out.references and out.references.pixels else None
        print("\n".join(layer_lines(out.layers, lambda r: r[top].mean, f"{top}-shot", pixels)))

    train_cfg = (target.config or {}).get("train", {})
    run_config = RunBrief(**{k: train_cfg.get(k) for k in ("objective", "model", "dataset", "image_size", "seed")}) \
        if target.config else None
    report = out.with_head(target.report_head(config), run_config=run_config, model=config.model)
    scalars = {f"{prefix}/{dataset_name(dataset)}/{k}shot": r.mean for k, r in out.results.items()}
    save_report(target, target.output(config), report, scalars, "fewshot")
    return report.to_json()


if __name__ == "__main__":
    main()
