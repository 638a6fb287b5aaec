"""Run as one process or under `accelerate launch`: which items each process gets from the trainer's
loaders (`mpp.train.loop.data_loaders`). Prints, on the main process, one JSON list with a record per
process: the training batches of each epoch and the evaluation items.

Usage: shard_probe.py N_TRAIN N_EVAL MICRO_BATCH EPOCHS NUM_WORKERS
"""
import json
import sys

import torch
from accelerate.utils import gather_object, set_seed
from torch.utils.data import Dataset

from mpp.run.runtime import make_accelerator
from mpp.train.loop import data_loaders


class Ids(Dataset):
    """Item i is i itself: what a process receives names the samples exactly."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(i), 0


def main() -> None:
    n_train, n_eval, micro, epochs, workers = map(int, sys.argv[1:6])
    accelerator = make_accelerator("no")
    set_seed(0)  # as the trainer does before building its loaders: the shuffle's seed is torch's
    train, evaluation = data_loaders(Ids(n_train), Ids(n_eval), micro, workers, accelerator)
    batches = {}
    for epoch in range(epochs):
        train.set_epoch(epoch)
        batches[epoch] = [ids.tolist() for ids, _ in train]
    evaluated = [i for ids, _ in evaluation for i in ids.tolist()]
    records = gather_object([{"process": accelerator.process_index, "train": batches, "eval": evaluated}])
    if accelerator.is_main_process:
        print(json.dumps(records))


if __name__ == "__main__":
    main()
