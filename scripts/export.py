"""Export a run's ViT in timm's Hub layout (model.safetensors + config.json), optionally to the Hub.

    python scripts/export.py --run runs/mpp --output exports/mpp        # the run's newest checkpoint
    python scripts/export.py --run runs/mpp --output exports/mpp --push-to-hub USER/REPO

Load it back with `timm.create_model("local-dir:exports/mpp", pretrained=True)`, or pass the folder as
--run to eval/fewshot.py, eval/linear_probe.py or eval/finetune.py.
"""
from __future__ import annotations

from pathlib import Path

from mpp.core.config import Parser, add_dataclass_flags, dataclass_from_args
from mpp.core.errors import cli_main
from mpp.eval import timm_io
from mpp.eval.timm_io import ExportConfig
from mpp.run.checkpoint import load_run


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(p, ExportConfig)
    return p


def parse_args(argv: list[str] | None) -> ExportConfig:
    return dataclass_from_args(ExportConfig, build_parser().parse_args(argv)).validate()


@cli_main
def main(argv: list[str] | None = None) -> Path:
    config = parse_args(argv)
    _, vit, checkpoint = load_run(config.run)
    folder = timm_io.export(vit, Path(config.output), overwrite=config.overwrite)
    print(f"wrote {folder} from {checkpoint} ({vit.config.num_classes or 'no'} head outputs)")
    if config.push_to_hub:
        print(f"pushed: {timm_io.push(folder, config.push_to_hub)}")
    return folder


if __name__ == "__main__":
    main()
