#!/usr/bin/env bash
# The no-learning floor of each kept MPP run's held-out metric (REPORT.md, "held-out MPP metric"),
# for runs trained before the floor was logged (mpp.model.floor; newer runs have eval/floor_* in
# their own summary.json). The floor learns nothing and draws nothing, so it depends only on the
# held-out images, the batch size, the seed (the corruption draws), the target and the corruption
# rate: each run's own config.json, replayed for 1 training step, scores it on the same 10,000 test
# images and draws. Its summary.json ("eval": floor_accuracy or floor_mse) is kept in floors/<run>/.
# The model's own metric in that summary is of a 1-step model: read only the floor from it.
set -euo pipefail
cd "$(dirname "$0")/../.."
for run in mpp mpp-seed1 mpp-seed2 mpp-4x4 mpp-l2 mpp-15pct; do
  out=results/cifar10/floors/$run
  [[ -f $out/summary.json ]] && continue
  python scripts/pretrain_mpp.py --config "results/cifar10/runs/$run/config.json" --epochs 0 --max-steps 1 \
      --fewshot-every 0 --fewshot-dataset "" --log-every 1 --output-dir "runs/cifar10-floors/$run"
  mkdir -p "$out" && cp "runs/cifar10-floors/$run"/{config,summary}.json "$out"/
done
