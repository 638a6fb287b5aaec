"""Train the same ViT with labels: the supervised-pretraining baseline, and (evaluated on its own
test split, as every run is at the end) the from-scratch baseline.

    accelerate launch scripts/pretrain_supervised.py               # offline default: digits, Micro/4
    accelerate launch scripts/pretrain_supervised.py --dataset PATH/TO/FOLDER --model S/16 --image-size 224
"""
from mpp.train import main

if __name__ == "__main__":
    main("supervised")
