"""Compare runs: one table, plots, and one TensorBoard view of several run directories.

    python eval/compare.py runs/cifar10-cpu/mpp runs/cifar10-cpu/supervised [--output DIR] [--names A B]

In Python: `from mpp.report.comparison import compare; report = compare(run_dirs, output_dir, names=None)`
(this file is only its command line).

What a run directory may hold (each piece is optional, but a run needs config.json or at least one
result): config.json and summary.json (scripts/pretrain_*.py), metrics.jsonl and tensorboard/
(training curves), fewshot*.json (eval/fewshot.py, any dataset), linear-probe*.json, knn*.json
(eval/knn.py), finetune.json (in the run itself or in RUN/finetune*/) and checkpoints/ckpt-<step>.pt.

Output (DIR, default `<common parent of the runs>/compare`, so that one `tensorboard --logdir
<common parent>` shows the runs and the comparison together):

- `compare.md` (also printed) and `compare.json` (the same data, raw numbers). Layout:
  * **Runs**: one row per run: objective (`mpp (mean_color, 50%)`, `supervised`,
    `finetune (scratch)`), training data, few-shot accuracy on the *main* few-shot dataset (the one
    most rows were evaluated on) at every shot count any row has, linear-probe accuracy, k-NN
    accuracy (a `k-NN k=<k>` column per k any knn*.json has), fine-tune accuracy with its chosen
    lr, steps and wall time. Then two kinds of reference rows: one "random init (<arch>)" row per
    architecture and evaluation dataset (from fewshot-random-init / linear-probe-random-init /
    knn-random-init reports, or from a report's "references"), and one "raw pixels (S px)" row per
    resolution and dataset (from the references): runs that share one show it once, and a note
    says which report it came from. Like the few-shot reports, only class-token k-NN reports are
    read (knn-avg.json, from `--features avg`, is left out).
  * **Few-shot on <dataset>**: one more table per other few-shot dataset (a transfer check such as
    `fewshot-imagenette.json`), with the rows evaluated on it.
  * Accuracies are % on the evaluation's test split, `mean ± std` over seeds; `–` marks a missing
    result. A linear-probe, k-NN or fine-tune column names its dataset in the header when all rows
    share one, else in each cell. Notes below the tables say which file was shown when a run has several.
- `fewshot.png`: accuracy vs shots (log x, error bars = std), one panel per dataset.
- `curves.png`: train/loss and eval/* scalars read back from each run's TensorBoard events
  (a fine-tune directory's seed-0 training; metrics.jsonl when a run has no events), one panel per
  tag and loss scale (MPP target, supervised, finetune): the objectives' losses are not comparable.
- **By block** (runs probed with `--layers`): a table per evaluation (the largest shot count, the
  linear probe, the largest k of k-NN), rows = run × feature variant, columns = blocks, each run's
  best cell in bold; and `layers.png`: accuracy by block (a panel per shot count and per k), a line
  per run and feature, random init dashed, raw pixels dotted.
- `fewshot_curves.png` (runs pretrained with `--fewshot-every`): the in-run probe against images
  seen, one panel per dataset and shot count (few-shot, `fewshot/...` tags), then one per dataset
  and k (k-NN, `knn/...` tags, its training set the few-shot draws' union), the class token solid,
  the mean patch token dashed, each run's step-0 point (its untrained model) as a dotted level.
- `pos_embed-<run>.png`: the paper's Figure 7 for each run with a checkpoint: the cosine
  similarity of every patch's position embedding with every other patch's, an h×w grid of h×w
  tiles (tile (i, j) is patch (i, j) against all patches).
- `tensorboard/`: the markdown table as TensorBoard text.

Plots are drawn on matplotlib `Figure`s (Agg), never through pyplot, so calling `compare` from
another program leaves its matplotlib backend alone. Where each piece is read or drawn:
mpp.report.reports (rows), mpp.report.tables, mpp.report.curves, mpp.report.posembed, mpp.report.plots;
mpp.report.comparison puts them together.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mpp.core.config import Parser
from mpp.core.errors import cli_main
from mpp.report.comparison import compare, shown_path


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--output", metavar="DIR", help="where the table, plots and TensorBoard text go "
                   "(default: <the runs' common parent>/compare)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="display names, one per RUN_DIR in order "
                   "(default: the directory names); put it after the run directories")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = compare(args.runs, args.output, args.names)
    print(report["markdown"])
    print(f"wrote {', '.join(Path(f).name for f in report['files'])} in {shown_path(Path(report['output']))}")
    print(f"overlay the runs: {report['tensorboard']['command']}")
    return report


if __name__ == "__main__":
    main()
