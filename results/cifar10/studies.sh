#!/usr/bin/env bash
# The three studies of results/cifar10/REPORT.md (which feature, how long, which seed), stage by
# stage. Rerunnable: a finished stage is skipped, an interrupted pretraining resumes.
# Each finished stage (pretraining and its probes) is kept in results/cifar10/runs/<name>, without
# checkpoints or events (config, summary, metrics.jsonl, the probe JSONs), and restored from there
# into a new checkout's runs/, so the studies span sessions whose runs/ does not survive.
# Data: data/cifar10 and data/imagenette, unpacked from ../shared/data (see the README).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-runs/cifar10-cpu}
# The report's budget: Micro/8 at 32 px, 4 epochs of CIFAR-10 at batch 256 (780 steps).
COMMON=(--dataset data/cifar10 --model Micro/8 --image-size 32 --batch-size 256 --lr 0.001 --warmup-steps 100
        --crop-scale 0.35 1 --log-every 20)
# The in-run few-shot probe, every epoch (195 steps), on CIFAR-10 and on Imagenette (transfer).
FEWSHOT=(--fewshot-every 195 --fewshot-dataset data/imagenette)

KEPT=$PWD/results/cifar10/runs

restore() {  # run_name: a stage kept by an earlier checkout is not run again
  [[ -d $KEPT/$1 && ! -e $ROOT/$1 ]] && mkdir -p "$ROOT" && cp -r "$KEPT/$1" "$ROOT/$1"
  return 0
}

keep() {  # run_name: the stage's results, small enough for git (no checkpoints, no events)
  mkdir -p "$KEPT/$1"
  (cd "$ROOT/$1" && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) \
      -not -path '*/checkpoints/*' -not -path '*/tensorboard/*' -exec cp --parents {} "$KEPT/$1/" \;)
}

pretrain() {  # objective run_name extra-flags...
  local objective=$1 run=$ROOT/$2; shift 2
  if [[ -f $run/summary.json ]]; then echo "done: $run"; return; fi
  local resume=(); [[ -d $run/checkpoints ]] && resume=(--resume)
  python scripts/pretrain_"$objective".py "${COMMON[@]}" "${FEWSHOT[@]}" "$@" --output-dir "$run" "${resume[@]}"
}

probe() {  # run_name: the layer sweeps with their references, and the transfer check
  local run=$ROOT/$1
  [[ -f $run/fewshot.json ]] || python eval/fewshot.py --run "$run" --dataset data/cifar10 --layers all --max-test 0
  [[ -f $run/linear-probe.json ]] || python eval/linear_probe.py --run "$run" --dataset data/cifar10 --layers all
  [[ -f $run/fewshot-imagenette.json ]] || python eval/fewshot.py --run "$run" --dataset data/imagenette \
      --image-size 32 --layers all --output "$run/fewshot-imagenette.json"
}

stage() {  # objective run_name extra-flags...: restore or pretrain, probe, keep
  restore "$2"; pretrain "$@"; probe "$2"; keep "$2"
}

# REPORT.md section 7, pre-registered before it ran: one new seed, 40 epochs, the four probes the
# criterion reads (few-shot, linear probe and k-NN, every block, with their references). ONLY=mpp-prereg
# runs this stage and nothing else.
if [[ ${ONLY:-} == mpp-prereg ]]; then
  restore mpp-prereg
  pretrain mpp mpp-prereg --epochs 40 --save-every 195 --seed 7
  probe mpp-prereg
  [[ -f $ROOT/mpp-prereg/knn.json ]] || python eval/knn.py --run "$ROOT/mpp-prereg" --dataset data/cifar10 --layers all
  keep mpp-prereg
  exit 0
fi

# Study 1 (which feature) and 3 (which seed): the report's models at the report's budget.
stage mpp mpp --epochs 4 --save-every 200 --seed 0
# What MPP predicts and where it attends, from the seed-0 model (needs its checkpoint).
[[ -d results/cifar10/visualize-mpp || ! -d $ROOT/mpp/checkpoints ]] || \
    python eval/visualize.py --run "$ROOT/mpp" --output results/cifar10/visualize-mpp
stage supervised supervised --epochs 4 --save-every 200 --seed 0
for seed in 1 2; do stage mpp mpp-seed$seed --epochs 4 --save-every 200 --seed $seed; done
# Study 3 (which seed): the three MPP seeds beside the supervised run (REPORT.md section 6).
python eval/compare.py "$ROOT"/mpp "$ROOT"/mpp-seed1 "$ROOT"/mpp-seed2 "$ROOT"/supervised --output results/cifar10/seeds

# Study 1 (which feature): the ablations and the from-scratch model.
stage mpp mpp-4x4 --epochs 4 --save-every 200 --seed 0 --target downsample
stage mpp mpp-l2 --epochs 4 --save-every 200 --seed 0 --target l2
# Study 2 (how long): 5× the report's length (20 epochs, 3,900 steps), few-shot every epoch. Here,
# before the last ablation and the from-scratch model: a stage survives a session only once it has
# finished (checkpoints are not kept), and these take about 2 h each on 2 cores, so each needs a
# session's start.
stage mpp mpp-long --epochs 20 --save-every 195 --seed 0
stage supervised supervised-long --epochs 20 --save-every 195 --seed 0
stage mpp mpp-15pct --epochs 4 --save-every 200 --seed 0 --corrupt-rate 0.15
# From scratch: the supervised fine-tuning protocol from a random init on 10% of the labels, at the
# lr the report's dev grid chose for it (0.03) and one seed: its model is what the probes measure.
restore scratch
[[ -f $ROOT/scratch/finetune.json ]] || python eval/finetune.py --model Micro/8 --image-size 32 --dataset data/cifar10 \
    --train-fraction 0.1 --dev-fraction 0.1 --lrs 0.03 --seeds 1 --batch-size 128 --epochs 8 \
    --warmup-steps 20 --crop-scale 0.35 1 --output-dir "$ROOT/scratch"
probe scratch; keep scratch

# The tables and plots (by block, in-run few-shot curves, references) of each study.
python eval/compare.py "$ROOT"/mpp "$ROOT"/mpp-seed1 "$ROOT"/mpp-seed2 "$ROOT"/supervised "$ROOT"/scratch \
    "$ROOT"/mpp-4x4 "$ROOT"/mpp-l2 "$ROOT"/mpp-15pct --output results/cifar10/studies
python eval/compare.py "$ROOT"/mpp "$ROOT"/supervised "$ROOT"/mpp-long "$ROOT"/supervised-long \
    --output results/cifar10/long
