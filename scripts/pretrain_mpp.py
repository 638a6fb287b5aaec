"""Pretrain a ViT by masked patch prediction (no labels used).

    accelerate launch scripts/pretrain_mpp.py         # offline default: digits, Micro/4, ~6 min on 2 CPU cores
    accelerate launch scripts/pretrain_mpp.py --dataset hf:cifar10 --model Ti/4 --max-steps 20000
    accelerate launch scripts/pretrain_mpp.py --help  # every flag, with its default
"""
from functools import partial

from mpp.train.pretrain import build_parser as _parser_of
from mpp.train.pretrain import main
from mpp.train.pretrain import parse_args as _parse_args_of

build_parser = partial(_parser_of, "mpp")  # this entry point's flags (tests walk every entry point's)
parse_args = partial(_parse_args_of, "mpp")  # (TrainConfig, MPPConfig) from a command line, or --config

if __name__ == "__main__":
    main("mpp")
