"""Train the same ViT with labels: the supervised-pretraining baseline, and (evaluated on its own
test split, as every run is at the end) the from-scratch baseline.

    accelerate launch scripts/pretrain_supervised.py               # offline default: digits, Micro/4
    accelerate launch scripts/pretrain_supervised.py --dataset PATH/TO/FOLDER --model S/16 --image-size 224
"""
from functools import partial

from mpp.train.pretrain import build_parser as _parser_of
from mpp.train.pretrain import main
from mpp.train.pretrain import parse_args as _parse_args_of

build_parser = partial(_parser_of, "supervised")  # this entry point's flags (tests walk every entry point's)
parse_args = partial(_parse_args_of, "supervised")  # (TrainConfig, MPPConfig) from a command line, or --config

if __name__ == "__main__":
    main("supervised")
