"""Pretrain a ViT by masked patch prediction (no labels used).

    accelerate launch scripts/pretrain_mpp.py                      # offline default: digits, Micro/4, ~6 min on 2 CPU cores
    accelerate launch scripts/pretrain_mpp.py --dataset hf:cifar10 --model Ti/4 --max-steps 20000
    accelerate launch scripts/pretrain_mpp.py --help               # every flag, with its default
"""
from mpp.train import main

if __name__ == "__main__":
    main("mpp")
