"""Pictures of a trained run: what MPP predicts for held-out images, and where the ViT attends.

Usage: `python eval/visualize.py --run runs/mpp`. Writes RUN/visualize/predictions.png (per image: the
original, the corrupted input as the model saw it, the predicted and the true target of the corrupted
patches; an MPP run only) and attention.png (per image: the image, the last block's class-token
attention, attention rollout), and adds both to the run's TensorBoard (RUN/tensorboard/visualize) at
the checkpoint's step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mpp.core.config import Parser, add_dataclass_flags, dataclass_from_args
from mpp.core.errors import UsageError, cli_main
from mpp.data.holdout import pretraining_splits
from mpp.eval import attention_maps, visualize
from mpp.eval.visualize import WHAT, VisualizeConfig
from mpp.run.checkpoint import load_checkpoint, load_run
from mpp.run.rundir import TENSORBOARD, run_dir_of, step_of_name
from mpp.train.pretrain import TrainConfig


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(p, VisualizeConfig)
    return p


def parse_args(argv: list[str] | None) -> VisualizeConfig:
    return dataclass_from_args(VisualizeConfig, build_parser().parse_args(argv)).validate()


def pictures(config: VisualizeConfig) -> tuple[dict[str, torch.Tensor], list[str], Path, int]:
    """(name → CHW image, notes, run directory, checkpoint step) for the config."""
    run_config, vit, path = load_run(config.run)
    state = load_checkpoint(path, mmap=True)  # the objective's own weights and the step; mmap reads only those
    step = step_of_name(path) if step_of_name(path) is not None else int(state.get("step", 0))
    objective = run_config["train"]["objective"]
    what, notes = config.what or list(WHAT), []
    if "predictions" in what and objective != "mpp":
        if config.what:
            raise UsageError(f"{config.run} is a {objective} run, which predicts no patches: pass --what attention, "
                             "or an MPP run (scripts/pretrain_mpp.py) for --what predictions")
        notes.append(f"{config.run} is a {objective} run: no MPP predictions to draw, only attention")
        what = [w for w in what if w != "predictions"]
    dataset, train = config.dataset or run_config["train"]["dataset"], run_config["train"]
    # The run's held-out images: its test split, or (none) the split pretraining carved from train (mpp.data.holdout).
    held_out = pretraining_splits(dataset, vit.config.image_size, streaming=bool(train.get("streaming", False)),
                                  holdout_images=train.get("holdout_images", TrainConfig.holdout_images),
                                  shuffle_buffer=train.get("shuffle_buffer", TrainConfig.shuffle_buffer)).eval
    images = visualize.held_out_images(held_out, config.images).to(config.device)  # (n, 3, S, S)
    vit = vit.to(config.device)
    drawn = {}
    if "predictions" in what:
        model = visualize.mpp_objective(run_config, vit, state["objective"], str(path)).to(config.device)
        drawn["predictions"] = visualize.prediction_mosaic(model, images, seed=config.seed)
    if "attention" in what:
        drawn["attention"] = attention_maps.attention_mosaic(vit, images)
    return drawn, notes, run_dir_of(path), step


LEGENDS = {"predictions": visualize.LEGEND, "attention": attention_maps.LEGEND}


@cli_main
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    drawn, notes, run_dir, step = pictures(config)
    output = Path(config.output) if config.output else run_dir / "visualize"
    for note in notes:
        print(f"note: {note}")
    written = {}
    for name, image in drawn.items():
        written[name] = visualize.save_png(image, output / f"{name}.png")
        print(f"wrote {written[name]} ({LEGENDS[name]})")
    from torch.utils.tensorboard import SummaryWriter

    events = run_dir / TENSORBOARD / "visualize"
    with SummaryWriter(str(events)) as tb:  # beside the run's curves, at the checkpoint's step
        for name, image in drawn.items():
            tb.add_image(f"visualize/{name}", image, global_step=step)  # (3, H, W) float in [0, 1]
    print(f"added to TensorBoard: {events} (step {step})")
    return {name: str(path) for name, path in written.items()}


if __name__ == "__main__":
    main()
