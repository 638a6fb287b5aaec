#!/usr/bin/env bash
# The README's "Your own unlabelled images": Imagenette's training images with their labels thrown away,
# MPP-pretrained, probed on labelled Imagenette. Run from the repository root; writes runs/photos, then
# copies its records here (no checkpoints, no TensorBoard events). About 15 minutes on 2 CPU cores.
set -euo pipefail
mkdir -p data && tar -xzf ../shared/data/imagenette/imagenette_128px.tar.gz -C data   # data/imagenette/{train,val}/<wnid>/
mkdir -p data/photos && find data/imagenette/train -name '*.JPEG' -exec cp -t data/photos {} +   # 9,469 images, no labels
accelerate launch scripts/pretrain_mpp.py --dataset data/photos --model Micro/8 --image-size 64 --epochs 20 \
    --eval-every 330 --fewshot-every 330 --fewshot-dataset data/imagenette --output-dir runs/photos
python eval/knn.py --run runs/photos --dataset data/imagenette
python eval/fewshot.py --run runs/photos --dataset data/imagenette
# The mean patch token: chosen after seeing the in-run curve (docs/img/unlabelled-imagenette-curves.png).
python eval/knn.py --run runs/photos --dataset data/imagenette --features avg
python eval/fewshot.py --run runs/photos --dataset data/imagenette --features avg
python eval/compare.py runs/photos --output /tmp/compare-photos
out=results/unlabelled-imagenette
cp runs/photos/{config,summary,knn,knn-avg,fewshot,fewshot-avg}.json runs/photos/metrics.jsonl /tmp/compare-photos/compare.md "$out"/
cp /tmp/compare-photos/fewshot_curves.png docs/img/unlabelled-imagenette-curves.png
# The no-learning floor of the held-out MPP accuracy (REPORT.md): the run's config replayed for one step.
python scripts/pretrain_mpp.py --config "$out"/config.json --epochs 0 --max-steps 1 --fewshot-every 0 --fewshot-dataset "" --eval-every 0 \
    --output-dir runs/photos-floor
mkdir -p "$out"/floor && cp runs/photos-floor/{config,summary}.json "$out"/floor/
