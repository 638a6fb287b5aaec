"""Fine-tuning a pretrained run, or training from scratch, on labelled images (the ViT paper's protocol).

The pretrained head is replaced by a zero-initialised linear layer; SGD with momentum 0.9, no weight
decay, linear warmup then cosine decay, gradient clipping at global norm 1. The learning rate is
picked from a grid by accuracy on a dev split held out of the labelled training data (never the test
split); then the model is trained on all the labelled data at that rate, once per seed, and scored
once on the test split. A new --image-size keeps the patch size and resamples the position
embeddings in 2-D.

    accelerate launch eval/finetune.py --run runs/mpp                 # fine-tune a pretrained run
    accelerate launch eval/finetune.py --model Micro/4 --output-dir runs/scratch   # from scratch

Each training (a grid point or a seed) is recorded in OUTPUT_DIR/finetune.json as it finishes, so
`--resume` after an interruption retrains only what was not finished. It also records the starting
point (the checkpoint's path, step and sha256, or scratch): a `--resume` whose --run now gives another
checkpoint (the pretraining saved a newer one) is refused rather than mixing the two. OUTPUT_DIR also
holds config.json, TensorBoard events (one sub-folder per training) and the seed-0 fine-tuned weights
as a checkpoint that eval/fewshot.py and eval/linear_probe.py read like any run.
"""
from __future__ import annotations

from mpp.core.config import Invocation
from mpp.core.errors import cli_main
from mpp.train.finetune import build_parser, finetune, parse_args

__all__ = ["build_parser", "main"]  # the flags are the library's; tests/test_flags.py reads every entry point's


def main(argv: list[str] | None = None) -> None:
    cli_main(lambda: finetune(parse_args(argv), Invocation.of(argv)))()


if __name__ == "__main__":
    main()
