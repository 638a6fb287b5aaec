"""Export a run's ViT in timm's Hub layout (model.safetensors + config.json), optionally to the Hub.

    python scripts/export.py --run runs/mpp --output exports/mpp        # the run's newest checkpoint
    python scripts/export.py --run runs/mpp --output exports/mpp --push-to-hub USER/REPO

Load it back with `timm.create_model("local-dir:exports/mpp", pretrained=True)`, or pass the folder as
--run to eval/fewshot.py, eval/linear_probe.py or eval/finetune.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mpp.core.config import Parser
from mpp.core.errors import cli_main
from mpp.eval import timm_io
from mpp.run.checkpoint import load_run


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN", help="run directory (its newest checkpoint) or checkpoint file")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (refused if not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace model.safetensors and config.json in a non-empty --output")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo (needs network and a login)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> Path:
    args: argparse.Namespace = build_parser().parse_args(argv)
    _, vit, checkpoint = load_run(args.run)
    folder = timm_io.export(vit, Path(args.output), overwrite=args.overwrite)
    print(f"wrote {folder} from {checkpoint} ({vit.config.num_classes or 'no'} head outputs)")
    if args.push_to_hub:
        print(f"pushed: {timm_io.push(folder, args.push_to_hub)}")
    return folder


if __name__ == "__main__":
    main()
