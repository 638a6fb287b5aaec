"""One pretraining run, MPP or supervised: the state a run carries from its first step to its last.

`Trainer(config, mpp_config, held, invocation)` builds, top to bottom, what a run needs: the
Accelerator and the run directory, the data, the kernels, the model and objective, the optimizer and
schedule, and, with `--resume`, the state of the newest checkpoint. `run()` runs the one training loop
(mpp.train.loop.TrainLoop) with this run's hooks: its checkpoints, its evaluators (mpp.eval.in_run:
held-out metrics, the prediction mosaic, the in-run few-shot probe) and the stop a signal asks for.
Where the run stands (`Progress`) is one object, saved whole in every checkpoint and restored whole on
resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from mpp.core.config import Invocation
from mpp.core.errors import UsageError, loader_timed_out, out_of_memory
from mpp.core.files import append_line, write_json
from mpp.core.runlock import RunLock
from mpp.core.stopping import (
    WAIT_GRACE_S,
    StopRequest,
    StopWhileWaiting,
    end_loader_workers,
)
from mpp.data.holdout import pretraining_splits
from mpp.data.readlimit import StuckRead
from mpp.data.sources import LABELLED_FORMS
from mpp.eval.evaluator import Evaluator, RunView, TrainState
from mpp.eval.in_run import HELD_OUT, build_evaluators
from mpp.model.kernel_policy import KernelPolicy, RunShapes
from mpp.model.objective import MPPConfig, MPPObjective, SupervisedObjective, corrupted_count
from mpp.model.vit import ViT
from mpp.run import checkpoint as ckpt_io
from mpp.run import rundir, runtime
from mpp.run.optim import param_groups
from mpp.run.records import SkippedImages, Summary
from mpp.run.trackers import Trackers, flat_config
from mpp.train.loop import Built, Hooks, LoopSettings, Progress, TrainLoop, data_loaders


class Trainer(Hooks):
    """Everything one run holds, and its hooks into the loop; `held` releases the lock, the stop
    handlers and the metrics file."""

    def __init__(self, config, mpp_config: MPPConfig, held: contextlib.ExitStack, invocation: Invocation | None = None):
        from accelerate.utils import set_seed

        # ---- config
        self.config, self.mpp_config, self.held = config.validate(), mpp_config.validate(), held
        self.invocation = invocation or Invocation(None, None)  # None: a run started from Python, no command line
        policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)  # the one decision's inputs
        vit_cfg = config.vit()

        # ---- accelerator
        self.accelerator = acc = runtime.make_accelerator(
            config.mixed_precision, config.cpu_threads, gradient_accumulation_steps=config.grad_accum_steps,
        )
        runtime.on_main(acc, lambda: rundir.check_run_dir(config))  # a wrong --resume or --output-dir: before the data
        set_seed(config.seed, device_specific=False)
        world = acc.num_processes * config.grad_accum_steps
        if config.batch_size % world:
            raise UsageError(f"--batch-size {config.batch_size} is not divisible by processes × accumulation steps "
                             f"= {world}: pass a multiple of {world}")
        micro_batch = config.batch_size // world

        # ---- data, then the run directory: a dataset this run cannot use leaves nothing written
        self._build_data(vit_cfg.image_size, micro_batch)
        self.total_steps = self._total_steps()  # a training set smaller than one batch is refused here too
        runtime.on_main(acc, lambda: self.held.enter_context(RunLock(rundir.prepare_run_dir(config))))  # one writer
        self.run_dir = Path(config.output_dir)

        # ---- kernels: decided once, at this run's shapes, by the main process for all of them
        last_queries = corrupted_count(mpp_config.corrupt_rate, vit_cfg.num_patches) if config.objective == "mpp" else 1
        shapes = RunShapes.of(vit_cfg, micro_batch, runtime.autocast_dtype(acc), last_queries=last_queries,
                              compiled=config.compile)
        kernels = runtime.choose_kernels(policy, shapes, acc.device, acc)

        # ---- model and objective
        if config.objective == "mpp":
            vit = ViT(dataclasses.replace(vit_cfg, num_classes=0), kernels.kernels)  # MPP predicts from patch tokens
            objective = MPPObjective(vit, mpp_config)
        else:
            vit = ViT(dataclasses.replace(vit_cfg, num_classes=self.info.num_classes), kernels.kernels)
            objective = SupervisedObjective(vit, config.label_smoothing)
        if config.compile:
            runtime.compile_blocks(vit)
        self.run_cfg = rundir.run_config(config, mpp_config, vit, self.info, self.splits.holdout, self.invocation)
        self.run_cfg["kernels"] = kernels.record()
        # what ran, whatever chose it (flag, Accelerate, GPU default)
        self.run_cfg["precision"] = str(acc.mixed_precision)
        self.run_cfg["num_processes"] = acc.num_processes

        # ---- optimizer and schedule
        self.schedule = config.lr_schedule(self.total_steps)
        optimizer = torch.optim.AdamW(param_groups(objective, config.weight_decay, objective.no_weight_decay()),
                                      lr=config.lr, betas=(config.beta1, config.beta2))
        self.objective, self.optimizer = acc.prepare(objective, optimizer)
        self.scheduler = self.schedule.scheduler(self.optimizer)  # stepped by hand, once per optimizer step
        self.model = acc.unwrap_model(self.objective)
        self.built = Built(acc, self.objective, self.optimizer, self.scheduler, self.train_loader, self.total_steps)
        # From here on each micro-batch reseeds every generator from (seed, step, micro-batch, process):
        # corruption and dropout then repeat exactly after a resume (mpp/core/reproducible.py). The model was
        # initialised identically everywhere; the data order is seeded by seed + epoch.

        # ---- resume, then the run's records
        self.progress = Progress()
        saved = self._resume() if config.resume else None
        # The step of the newest checkpoint this process took part in: a resumed run's step is saved already.
        self.last_save: int | None = self.progress.step if saved else None
        self._start_records(saved)

    # ---- setup, in the order __init__ calls it

    def _build_data(self, image_size: int, micro_batch: int) -> None:
        config, acc = self.config, self.accelerator
        # The test split, or a held-out split carved from the training images (mpp.data.holdout).
        self.splits = splits = pretraining_splits(
            config.dataset, image_size, holdout_images=config.holdout_images, crop_scale=config.crop_scale,
            hflip=config.hflip, streaming=config.streaming, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
            strict=config.strict_images)
        self.train_set, self.eval_set, self.info = splits.train, splits.eval, splits.info
        if config.objective == "supervised":  # learns train's labels and scores the held-out split's
            fix = (f"supervised pretraining learns the labels: pretrain it by MPP (scripts/pretrain_mpp.py), or pass "
                   f"a labelled dataset ({LABELLED_FORMS})")
            self.train_set.require_labels(fix)
            self.eval_set.require_labels(fix, train=self.info)
        acc.print(f"dataset {config.dataset}: {self.info.describe()}")
        if splits.note():
            acc.print(splits.note())
        # Each image's augmentation draws from (seed, epoch, index), or (seed, epoch, worker, k) for a
        # stream: the same after a resume or on N processes (mpp.data.datasets).
        self.streamed = self.train_set.streamed
        self.train_loader, self.eval_loader = data_loaders(self.train_set, self.eval_set, micro_batch,
                                                           config.num_workers, acc, self.streamed)
        # The run's evaluators (mpp.eval.in_run), built now: one unable to run here refuses before anything is written.
        view = RunView(config, self.mpp_config if config.objective == "mpp" else None, acc, self.eval_set,
                       self.eval_loader, self.info, image_size, micro_batch, self.streamed)
        self.evaluators: list[Evaluator] = build_evaluators(view)
        for line in filter(None, (e.describe() for e in self.evaluators)):
            acc.print(line)

    def _total_steps(self) -> int:
        config = self.config
        if self.streamed and config.epochs > 0:
            raise UsageError("--epochs needs a dataset of known length: use --max-steps with --streaming")
        # Optimizer steps per pass over this process's shard (a trailing partial accumulation also steps).
        steps_per_epoch = 0 if self.streamed else math.ceil(len(self.train_loader) / config.grad_accum_steps)
        images = self.splits.train_images()  # None: a stream of unknown length
        # Map-style: not one full batch per process; a stream of known length: fewer images than one batch.
        too_small = (images is not None and images < config.batch_size) if self.streamed else steps_per_epoch == 0
        if too_small:
            raise UsageError(f"the training set ({images} images) is smaller than one batch "
                             f"({config.batch_size}): pass a smaller --batch-size")
        return math.ceil(config.epochs * steps_per_epoch) if config.epochs > 0 else config.max_steps

    def _resume(self) -> dict:
        """Load the newest readable checkpoint into the model, optimizer, schedule, RNGs and progress,
        after refusing one of another run; returns the checkpoint's run config."""
        acc, run_dir = self.accelerator, self.run_dir
        found = ckpt_io.load_latest(run_dir)
        if found is None:
            raise UsageError(f"--resume: no readable checkpoint in '{rundir.checkpoint_dir(run_dir)}': drop --resume")
        state, path = found
        saved = state["config"]
        weights = {**state["objective"], **{f"vit.{k}": v for k, v in state["model"].items()}}
        ckpt_io.check_shapes(self.model, weights, str(path), hint=(
            f"resume with what the run was trained with (scripts/pretrain_{saved['train']['objective']}.py "
            f"--model {saved['train']['model']} --image-size {saved['vit']['image_size']}) or pass a new --output-dir"))
        rundir.check_resume(saved, self.run_cfg, acc.num_processes, str(path))  # after the shapes: names parameters
        self.run_cfg["run_id"] = saved.get("run_id", self.run_cfg["run_id"])  # the run it continues
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["step"] > self.total_steps:
            raise UsageError(f"{path} is at step {state['step']}, past the {self.total_steps} steps asked for: pass "
                             f"a --max-steps (or --epochs) of at least {state['step']}, or a new --output-dir")
        self.schedule.restart(self.optimizer, self.scheduler)  # this run's length from here on
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"][acc.process_index])
        self.progress = Progress(state["step"], state["data"]["epoch"], state["data"]["batch_in_epoch"],
                                 state["elapsed"])
        acc.print(f"resumed {run_dir} at step {self.progress.step} from {path.name}")
        return saved

    def _start_records(self, saved: dict | None) -> None:
        """config.json (a resume is recorded in the run's original one, and drops the metrics logged
        after its checkpoint), TensorBoard, and metrics.jsonl open for appending."""
        acc, run_dir, step = self.accelerator, self.run_dir, self.progress.step
        # First: a tracker that cannot start (W&B not logged in...) stops the run before its records change.
        self.trackers = Trackers(self.config.report_to, run_dir, rundir.TENSORBOARD,
                                 run_dir.name if saved is None else f"{run_dir.name}@{step}",
                                 main=acc.is_main_process, job_type=self.config.objective,
                                 config=flat_config(self.run_cfg, ("train", "mpp", "vit")))
        self.held.push(self.trackers.finish_on_exit)  # also when the run fails: then marked failed
        if acc.is_main_process:
            if saved is not None:
                rundir.record_resume(run_dir, saved, self.run_cfg, step, self.config)
            else:
                write_json(run_dir / rundir.CONFIG, self.run_cfg)
        for evaluator in self.evaluators:  # e.g. what the prediction mosaic's columns show
            for tag, text in evaluator.texts().items():
                self.trackers.text(tag, text, step)
        self.metrics_file = (self.held.enter_context(open(run_dir / rundir.METRICS, "ab", buffering=0))
                             if acc.is_main_process else None)  # unbuffered: each line is written whole or not at all

    # ---- records

    def log(self, values: dict, at: int) -> None:
        self.trackers.log(values, at)
        if self.metrics_file:
            append_line(self.metrics_file, json.dumps({"step": at, **values}))  # a full disk: one line, no torn line

    def save(self, at: int) -> None:
        """A checkpoint of step `at` (the main process writes it; every process learns whether it could)."""
        from accelerate.utils import broadcast_object_list, gather_object

        acc, model = self.accelerator, self.model
        rngs = gather_object([ckpt_io.rng_state()])  # one per process: each resumes its own streams
        problem = [None]
        if acc.is_main_process and not all(torch.isfinite(p).all() for p in model.parameters()):
            # A checkpoint must be a state worth resuming from: weights that blew up are not saved.
            problem[0] = rundir.diverged(at, self.run_dir, self.optimizer.param_groups[0]["lr"], self.config.lr,
                                         "the weights are not finite after")
        elif acc.is_main_process:
            state = {
                "config": self.run_cfg,
                "model": model.vit.state_dict(),
                "objective": {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": at,
                "elapsed": self.progress.elapsed + time.perf_counter() - self.started,
                "rng": rngs,
                "data": {"epoch": self.progress.epoch, "batch_in_epoch": self.progress.batch_in_epoch},
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            }
            try:
                ckpt_io.save_checkpoint(self.run_dir, at, state, keep=self.config.keep_checkpoints)
            except UsageError as e:  # a full disk...: every process stops, not just the one that failed to write
                problem[0] = str(e)
        broadcast_object_list(problem)
        if problem[0]:
            raise UsageError(problem[0])
        self.last_save = at

    def run_evaluator(self, evaluator: Evaluator, at: int) -> dict | None:
        """One evaluator at step `at`, its metrics logged; None: a stop cut it short (the processes agree)."""
        started = time.perf_counter()
        state = TrainState(at, self.model, self.accelerator, self.stop,
                           image=lambda tag, image, caption: self.trackers.image(tag, image, at, caption=caption))
        values = evaluator.run(state)
        if values is None:
            return None
        if evaluator.timed:  # its time is logged, and left out of the throughput (the window counts training only)
            seconds = time.perf_counter() - started
            values = {**values, f"{evaluator.name}/seconds": seconds}
            self.loop.exclude(seconds)
        if values:
            self.log(values, at)
        return values

    def evaluations(self, at: int, final: bool = False) -> dict | None:
        """The evaluators due at step `at` (every one when `final`), in order; the held-out metrics
        ({} when none ran), or None when a stop cut one short: the rest are then skipped."""
        held_out = {}
        for evaluator in self.evaluators:
            if final or evaluator.due(at, self.total_steps):
                values = self.run_evaluator(evaluator, at)
                if values is None:
                    return None
                if evaluator.name == HELD_OUT:
                    held_out = {k.removeprefix("eval/"): v for k, v in values.items()}
        return held_out

    # ---- the loop's hooks (mpp.train.loop.Hooks)

    def loss(self, images, labels):
        return self.objective(images, labels)

    def diverged(self, step: int) -> str:
        return rundir.diverged(step, self.run_dir, self.optimizer.param_groups[0]["lr"], self.config.lr,
                               "the loss is not finite at")

    def on_epoch(self, epoch: int) -> None:
        self.train_set.set_epoch(epoch)  # the augmentations' epoch, shared with the loader's workers

    def after_step(self, step: int, stopping: bool) -> bool:
        """Checkpoint and evaluate after one optimizer step; whether to stop (asked before, or during
        an evaluation): then this step is saved."""
        if step % self.config.save_every == 0 and step < self.total_steps:
            self.save(step)  # first: a failure in what follows (an evaluation, a probe) cannot lose this step
        if not stopping:  # the last step's come after its save (_finish)
            stopping = self.evaluations(step) is None
        if stopping and self.last_save != step:
            self.save(step)
        return stopping

    # ---- the loop

    def run(self) -> Path:
        config, progress = self.config, self.progress
        settings = LoopSettings(config.grad_clip, config.log_every, config.batch_size, config.grad_accum_steps,
                                step_seed=config.seed, desc=f"{config.objective} {self.run_dir.name}")
        self.started = time.perf_counter()
        self.stop = self.held.enter_context(StopRequest())  # from the first step to the final save, a stop saves first
        self.loop = TrainLoop(self.built, settings, self, progress, self.stop)
        if progress.step == 0:  # the untrained model: e.g. the few-shot probe's random-init level
            for evaluator in (e for e in self.evaluators if e.at_start):
                self.run_evaluator(evaluator, 0)
        try:
            try:
                stopping = self.loop.run()
            except (StopWhileWaiting, StuckRead, RuntimeError, ValueError) as e:
                if isinstance(e, UsageError) and not isinstance(e, StuckRead):
                    raise  # the loop's own one-line errors (a loss not finite, --strict-images): as they are
                stopping = self._interrupted(e)
            return self._finish(stopping)
        except RuntimeError as e:  # torch.OutOfMemoryError is one, and a CPU allocation's failure
            if not out_of_memory(e):
                raise
            raise UsageError(runtime.out_of_memory_line(e, self.config, self.progress.step + 1)) from e

    def _interrupted(self, error: BaseException) -> bool:
        """The loop ended by an exception. A wait for data given up on (a stop that outlasted its grace,
        a stuck read, a loader that sent nothing) keeps the last whole step: the micro-batches of an
        unfinished step are read again on resume. Returns True (stop) or raises; anything else goes on."""
        acc, progress = self.accelerator, self.progress
        # Accelerate's ValueError: a stream shorter than a batch
        if isinstance(error, ValueError) and not isinstance(error, UsageError):
            if not str(error).startswith("Batch does not contain any data"):
                raise error
            raise UsageError(f"the training stream of '{self.config.dataset}' ended before one whole batch of "
                             f"{self.config.batch_size} images: pass a smaller --batch-size and a new --output-dir "
                             f"(or delete '{self.run_dir}', which holds only this start's records)") from error
        if isinstance(error, RuntimeError):
            if out_of_memory(error) or loader_timed_out(error) is None:
                raise error
            error = loader_timed_out(error)
        progress.batch_in_epoch -= self.loop.micro  # the unfinished step's micro-batches are read again
        self.loop.micro = 0
        self.optimizer.zero_grad(set_to_none=True)
        end_loader_workers()  # one may be stuck in its read: the exit must not wait on it
        if acc.num_processes > 1:  # the others wait for this one in a collective: no save can gather them now
            if isinstance(error, StopWhileWaiting):
                acc.print(f"stopped at step {progress.step} without saving: no data came within {WAIT_GRACE_S:g} s "
                          "of the stop; rerun the same command with --resume to continue from the newest checkpoint")
                sys.exit(self.stop.exit_code)
            raise error
        if self.last_save != progress.step:
            self.save(progress.step)
        if not isinstance(error, StopWhileWaiting):
            raise error
        acc.print(f"note: no data came within {WAIT_GRACE_S:g} s of the stop: saved step {progress.step}, the last "
                  "whole step, without waiting for it")
        return True

    def _finish(self, stopping: bool) -> Path:
        """The final checkpoint, then (so that no failure in them can lose the last step) the final
        evaluation, the final few-shot probe and the summary. A stop during the evaluation stops."""
        acc, step, run_dir = self.accelerator, self.progress.step, self.run_dir
        if self.last_save != step:
            self.save(step)
        try:
            results = None if stopping else self.evaluations(step, final=True)
        except StopWhileWaiting:  # the evaluation's data did not come after a stop: the step is saved
            results = None
        if results is None:
            self.trackers.finish()
            acc.end_training()
            acc.print(f"stopped at step {step} of {self.total_steps}; checkpoint saved in "
                      f"{rundir.checkpoint_dir(run_dir)}: rerun the same command with --resume to continue")
            sys.exit(self.stop.exit_code)
        if acc.is_main_process:
            summary = Summary(  # this process's share of the unreadable images skipped (the warnings name them)
                objective=self.config.objective, steps=step, eval=results, last_train=self.loop.values,
                wall_time_s=self.progress.elapsed + time.perf_counter() - self.started,
                kernels=self.run_cfg["kernels"], skipped_images=SkippedImages(
                    train=self.train_set.skipped_images(), eval=self.eval_set.skipped_images()))
            write_json(run_dir / rundir.SUMMARY, summary.to_json())
            shown = json.dumps({k: round(v, 4) for k, v in results.items()})
            acc.print(f"done: {run_dir} ({step} steps; eval {shown})")
        self.trackers.finish()
        acc.end_training()
        # A stop that came during the final save: the run is complete, the scheduler still sees why it ended.
        if self.stop.requested:
            sys.exit(self.stop.exit_code)
        return run_dir
