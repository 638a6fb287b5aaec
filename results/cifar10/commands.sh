# written by scripts/compare_pretraining.py
python scripts/pretrain_supervised.py --dataset data/cifar10 --model Micro/8 --image-size 32 --batch-size 256 --epochs 4 --lr 0.001 --warmup-steps 100 --crop-scale 0.35 1 --log-every 20 --save-every 200 --seed 0 --output-dir runs/cifar10-cpu/supervised
python eval/finetune.py --model Micro/8 --image-size 32 --dataset data/cifar10 --train-fraction 0.1 --dev-fraction 0.1 --lrs 0.01 0.03 0.1 --seeds 3 --batch-size 128 --epochs 8 --warmup-steps 20 --crop-scale 0.35 1 --output-dir runs/cifar10-cpu/scratch
python eval/finetune.py --run runs/cifar10-cpu/mpp --dataset data/cifar10 --train-fraction 0.1 --dev-fraction 0.1 --lrs 0.01 0.03 0.1 --seeds 3 --batch-size 128 --epochs 8 --warmup-steps 20 --crop-scale 0.35 1 --output-dir runs/cifar10-cpu/mpp/finetune
python eval/finetune.py --run runs/cifar10-cpu/supervised --dataset data/cifar10 --train-fraction 0.1 --dev-fraction 0.1 --lrs 0.01 0.03 0.1 --seeds 3 --batch-size 128 --epochs 8 --warmup-steps 20 --crop-scale 0.35 1 --output-dir runs/cifar10-cpu/supervised/finetune
python eval/fewshot.py --run runs/cifar10-cpu/mpp --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/mpp/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/mpp --dataset data/cifar10 --output runs/cifar10-cpu/mpp/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/mpp/fewshot-imagenette.json
python eval/fewshot.py --run runs/cifar10-cpu/supervised --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/supervised/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/supervised --dataset data/cifar10 --output runs/cifar10-cpu/supervised/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/supervised --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/supervised/fewshot-imagenette.json
python eval/fewshot.py --run runs/cifar10-cpu/scratch --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/scratch/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/scratch --dataset data/cifar10 --output runs/cifar10-cpu/scratch/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/scratch --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/scratch/fewshot-imagenette.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp --random-init --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/mpp/fewshot-random-init.json
python eval/linear_probe.py --run runs/cifar10-cpu/mpp --random-init --dataset data/cifar10 --output runs/cifar10-cpu/mpp/linear-probe-random-init.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp --random-init --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/mpp/fewshot-imagenette-random-init.json
python scripts/pretrain_mpp.py --dataset data/cifar10 --model Micro/8 --image-size 32 --batch-size 256 --epochs 4 --lr 0.001 --warmup-steps 100 --crop-scale 0.35 1 --log-every 20 --save-every 200 --seed 0 --target downsample --output-dir runs/cifar10-cpu/mpp-4x4
python eval/fewshot.py --run runs/cifar10-cpu/mpp-4x4 --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/mpp-4x4/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/mpp-4x4 --dataset data/cifar10 --output runs/cifar10-cpu/mpp-4x4/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp-4x4 --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/mpp-4x4/fewshot-imagenette.json
python scripts/pretrain_mpp.py --dataset data/cifar10 --model Micro/8 --image-size 32 --batch-size 256 --epochs 4 --lr 0.001 --warmup-steps 100 --crop-scale 0.35 1 --log-every 20 --save-every 200 --seed 0 --target l2 --output-dir runs/cifar10-cpu/mpp-l2
python eval/fewshot.py --run runs/cifar10-cpu/mpp-l2 --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/mpp-l2/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/mpp-l2 --dataset data/cifar10 --output runs/cifar10-cpu/mpp-l2/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp-l2 --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/mpp-l2/fewshot-imagenette.json
python scripts/pretrain_mpp.py --dataset data/cifar10 --model Micro/8 --image-size 32 --batch-size 256 --epochs 4 --lr 0.001 --warmup-steps 100 --crop-scale 0.35 1 --log-every 20 --save-every 200 --seed 0 --corrupt-rate 0.15 --output-dir runs/cifar10-cpu/mpp-15pct
python eval/fewshot.py --run runs/cifar10-cpu/mpp-15pct --dataset data/cifar10 --seeds 3 --max-test 0 --output runs/cifar10-cpu/mpp-15pct/fewshot.json
python eval/linear_probe.py --run runs/cifar10-cpu/mpp-15pct --dataset data/cifar10 --output runs/cifar10-cpu/mpp-15pct/linear-probe.json
python eval/fewshot.py --run runs/cifar10-cpu/mpp-15pct --dataset data/imagenette --seeds 3 --image-size 32 --max-test 0 --output runs/cifar10-cpu/mpp-15pct/fewshot-imagenette.json
python eval/compare.py runs/cifar10-cpu/mpp runs/cifar10-cpu/supervised runs/cifar10-cpu/scratch runs/cifar10-cpu/mpp-4x4 runs/cifar10-cpu/mpp-l2 runs/cifar10-cpu/mpp-15pct --output results/cifar10
