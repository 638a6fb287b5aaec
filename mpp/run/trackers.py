"""Where training curves go (`--report-to`): TensorBoard, Weights & Biases, or both, through
Accelerate's own tracker classes (accelerate.tracking).

`Trackers` is one training's set (a pretraining, or one fine-tune training), started by the main
process only; the other processes hold an empty one. What it writes:

- TensorBoard: events in FOLDER/<subdir> (a pretraining's RUN/tensorboard, a fine-tune's
  OUT/tensorboard/<tag>), and the hyperparameters (add_hparams) when a config is given.
- W&B: a run under FOLDER/wandb (`wandb.init(dir=FOLDER)`), named after the run directory (plus
  `@<step>` for a resumed process, since W&B steps only go forward within a run: every start is a
  run of its own, grouped by the run directory's name), its config the run's config. The project is
  $WANDB_PROJECT, else "mpp"; W&B's own environment decides the rest (WANDB_ENTITY, WANDB_MODE=offline
  for a machine without network, WANDB_DIR...).

The evaluation probes (eval/fewshot.py, linear_probe.py, visualize.py) report in their JSON files and
the run's TensorBoard, not here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

from mpp.core.errors import UsageError

REPORT_TO = ("tensorboard", "wandb", "all")
INSTALL_WANDB = 'pip install -e ".[wandb]" (or pip install wandb)'


def wanted(report_to: str) -> tuple[str, ...]:
    """The trackers `--report-to` names, in Accelerate's names."""
    return ("tensorboard", "wandb") if report_to == "all" else (report_to,)


def flat_config(config: dict, sections: tuple[str, ...]) -> dict:
    """`config`'s `sections` as one level of "section.key" → value (TensorBoard's hparams take scalars
    and strings only: anything else becomes its str)."""
    return {f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
            for section in sections for k, v in config[section].items()}


def check_report_to(report_to: str) -> None:
    """Refuse an unknown tracker, or W&B where the package is missing (before anything is written)."""
    if report_to not in REPORT_TO:
        raise UsageError(f"--report-to {report_to!r} is not a tracker: pass one of {', '.join(REPORT_TO)}")
    if "wandb" in wanted(report_to) and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--report-to {report_to} needs the wandb package, which is not installed: "
                         f"{INSTALL_WANDB}, or pass --report-to tensorboard")


class Trackers:
    """One training's trackers. `main`: whether this process writes (the others hold none)."""

    def __init__(self, report_to: str, folder: Path, subdir: str, name: str, *, main: bool,
                 job_type: str = "train", group: str | None = None, config: dict | None = None):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        check_report_to(report_to)
        self.active: list = []
        self.folder = folder / subdir  # where TensorBoard's events go: named when a write there fails
        if not main:
            return
        names = wanted(report_to)
        if "wandb" in names:  # first: the one that may fail to start (login, network) does so before any file
            self.active.append(WandBTracker(
                None if "WANDB_PROJECT" in os.environ else "mpp",  # wandb.init's project
                name=name, group=group or folder.name, job_type=job_type, dir=str(folder)))
        if "tensorboard" in names:
            # TensorBoardTracker writes to os.path.join(logging_dir, run_name)
            self.active.append(TensorBoardTracker(subdir, str(folder)))
        for tracker in self.active:
            try:
                tracker.start()
            except Exception as e:  # noqa: BLE001 - W&B's login and network errors have no common base
                self.finish()
                raise UsageError(f"--report-to {report_to}: the {tracker.name} tracker could not start "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): run "
                                 "`wandb login`, or set WANDB_MODE=offline, or pass --report-to tensorboard") from e
            if config:
                tracker.store_init_configuration(config)

    def get(self, name: str):
        """The library's own object (SummaryWriter, wandb Run) of tracker `name`, or None."""
        return next((t.tracker for t in self.active if t.name == name), None)

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk) names the events folder: TensorBoard's writer thread raises it
        again here without a file name."""
        try:
            yield
        except OSError as e:
            e.filename = e.filename or str(self.folder)
            raise

    def log(self, values: dict[str, float], step: int) -> None:
        with self._writing():
            for tracker in self.active:
                tracker.log(values, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int, caption: str = "") -> None:
        """`image` (3, H, W) float in [0, 1]; `caption` says what it shows (W&B shows it under the
        image; TensorBoard gets it once through `text`)."""
        for tracker in self.active:
            if tracker.name == "tensorboard":
                with self._writing():
                    tracker.writer.add_image(tag, image, step)
            else:
                import wandb

                pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
                tracker.log({tag: wandb.Image(pixels, caption=caption or None)}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """TensorBoard text (W&B gets the same as image captions)."""
        writer = self.get("tensorboard")
        if writer is not None:
            with self._writing():
                writer.add_text(tag, text, step)

    def finish(self, failed: bool = False) -> None:
        """Flush and close every tracker (again: nothing). `failed`: the training ended by an error,
        so its W&B run is marked failed (exit code 1), not finished."""
        active, self.active = self.active, []
        for tracker in active:
            if getattr(tracker, "writer", None) is None and getattr(tracker, "run", None) is None:
                continue  # it never started
            # After a failure, the error that ended the run is the one to report, not a flush's (a full disk)
            with contextlib.suppress(OSError) if failed else self._writing():
                if failed and tracker.name == "wandb":
                    tracker.run.finish(exit_code=1)  # Accelerate's WandBTracker.finish() passes no exit code
                else:
                    tracker.finish()

    def finish_on_exit(self, error_type, error, traceback) -> bool:
        """ExitStack.push's form of `finish`: failed when the block it closes raised (a stop's
        SystemExit is not a failure); returns False, so the error goes on."""
        self.finish(failed=error_type is not None and not issubclass(error_type, SystemExit))
        return False
