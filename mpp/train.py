"""One training loop for both objectives: MPP pretraining and supervised (pre)training.

Reads top to bottom: config → Accelerator → data → model → optimizer → loop → logging →
checkpoint. Accelerate handles devices, processes, mixed precision and gradient accumulation,
so the same code runs on one CPU, one GPU or many machines under `accelerate launch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader

from mpp import checkpoint as ckpt_io
from mpp import files, rundir
from mpp.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED,
    Range,
    check_ranges,
)
from mpp.data import build_dataset
from mpp.errors import UsageError
from mpp.kernels import KernelPolicy, RunShapes
from mpp.model import ViT, vit_config
from mpp.objective import MPPConfig, MPPObjective, SupervisedObjective, corrupted_count
from mpp.reproducible import SeededSamples, seed_step
from mpp.rundir import (
    check_resume,
    diverged,
    prepare_run_dir,
    read_run_config,
    trim_metrics,
)
from mpp.runlock import RunLock
from mpp.runtime import autocast_dtype, choose_kernels, compile_blocks, make_accelerator
from mpp.stopping import StopRequest, end_workers_at_exit, loader_worker_init

OBJECTIVES = ("mpp", "supervised")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "mpp"  # mpp (self-supervised, no labels) | supervised (labels; also the from-scratch baseline)
    dataset: str = "digits"  # digits (offline default) | PATH to an image folder (train/<class>/...) | hf:NAME
    model: str = "Micro/4"  # ViT preset: Micro/4, Ti/4, S/4 (32 px), Ti/16, S/16, B/16, L/16, H/14, or SIZE/PATCH
    image_size: int = 0  # training resolution in pixels, divisible by the patch size; 0: the preset's (Micro 16, /4 32, else 224)
    dropout: float = 0.0  # ViT dropout (the paper used 0.1 for supervised training on smaller datasets)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range (inception crop)
    hflip: bool = True  # random horizontal flips
    streaming: bool = False  # stream the dataset (hf: or a folder) instead of loading or listing it whole
    shuffle_buffer: int = 10_000  # with --streaming: images held to shuffle the stream (memory grows with it)
    strict_images: bool = False  # stop at the first unreadable image instead of skipping it (skips are counted)
    num_workers: int = 2  # DataLoader worker processes per training process
    cpu_threads: int = 0  # torch threads per process when training on CPU; 0: available cores / local processes
    batch_size: int = 128  # global batch: across all processes and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1500  # optimizer steps (ignored when --epochs is set)
    epochs: float = 0.0  # if > 0: train this many passes over the training set instead of --max-steps
    lr: float = 1e-3  # peak learning rate, reached after the warmup
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "cosine"  # decay after warmup: cosine | linear
    weight_decay: float = 0.05  # AdamW decoupled decay; never on norms, biases, embeddings or the [mask] token
    beta1: float = 0.9  # Adam β1 (the paper's)
    beta2: float = 0.999  # Adam β2 (the paper's)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    label_smoothing: float = 0.0  # supervised objective only
    kernels: str = ""  # attention/LayerNorm: auto (ours where verified and faster at the run's shapes) | triton | torch; empty: $MPP_KERNELS or auto
    kernel_cache: str = ""  # folder caching the kernels' verdicts; off: measure every run; empty: $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels
    compile: bool = False  # torch.compile the ViT's blocks (regional: compiled once, reused by every block)
    mixed_precision: str = ""  # no | fp16 | bf16; empty: Accelerate's config if any, else bf16 on a CUDA GPU with bf16, fp32 elsewhere
    output_dir: str = "runs/mpp"  # the run directory: config, TensorBoard events, metrics, checkpoints
    seed: int = 0  # seeds initialisation, data order, augmentation and corruption
    resume: bool = False  # continue the run in --output-dir from its newest checkpoint
    log_every: int = 25  # steps between logged metrics
    save_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end

    # What each numeric field accepts (checked at parse time and by validate(); mpp.config.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "image_size": NON_NEGATIVE, "dropout": OPEN_FRACTION, "crop_scale": Range(0, 1, low_open=True),
        "shuffle_buffer": AT_LEAST_1, "num_workers": Range(0, 256), "cpu_threads": Range(0, 4096),
        "batch_size": AT_LEAST_1, "grad_accum_steps": AT_LEAST_1, "max_steps": AT_LEAST_1, "epochs": NON_NEGATIVE,
        "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        "beta1": OPEN_FRACTION, "beta2": OPEN_FRACTION, "grad_clip": NON_NEGATIVE, "label_smoothing": OPEN_FRACTION,
        "seed": SEED, "log_every": AT_LEAST_1, "save_every": AT_LEAST_1, "keep_checkpoints": AT_LEAST_1,
        "eval_every": NON_NEGATIVE,
    }

    def validate(self) -> TrainConfig:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{self.objective}': use one of {', '.join(OBJECTIVES)}")
        if self.schedule not in ("cosine", "linear"):
            raise UsageError(f"unknown schedule '{self.schedule}': use cosine or linear")
        if self.mixed_precision not in ("", "no", "fp16", "bf16"):
            raise UsageError(f"unknown --mixed-precision '{self.mixed_precision}': use no, fp16 or bf16")
        check_ranges(self)
        if self.min_lr > self.lr:
            raise UsageError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}: pass a --min-lr of at most --lr")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise UsageError(f"--crop-scale {self.crop_scale} must satisfy 0 < min <= max <= 1")
        return self


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine or linear decay to min_lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    floor = config.min_lr / config.lr
    return floor + (1 - floor) * decay


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases, embeddings and tokens are left undecayed."""
    no_decay_names = ("pos_embed", "cls_token", "mask_token")
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.split(".")[-1] in no_decay_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_config(config: TrainConfig, mpp: MPPConfig, vit: ViT, data_info) -> dict:
    """Everything needed to rebuild and compare this run, saved in config.json and every checkpoint."""
    return {
        "train": dataclasses.asdict(config),
        "mpp": dataclasses.asdict(mpp),
        "vit": dataclasses.asdict(vit.config),
        "data": {"num_classes": data_info.num_classes, "class_names": list(data_info.class_names)},
        "command": " ".join(sys.argv),
        "versions": {"torch": str(torch.__version__), "python": sys.version.split()[0]},
    }


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator, seed: int,
             stop: Callable[[], bool] = lambda: False) -> dict[str, float]:
    """Mean metrics over the held-out split: every image once, gathered from every process.

    `model` is the unwrapped objective (no DDP: no collective per batch, so processes may hold
    unequal shares). MPP's corruption is drawn from a fixed seed so evaluations are comparable,
    without touching the training RNG."""
    from accelerate.utils import gather_object

    model.eval()
    sums: dict[str, float] = {}
    count = 0
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + accelerator.process_index)
        for images, labels in loader:
            if stop():  # a stop signal: the caller discards these partial metrics
                break
            with accelerator.autocast():
                _, metrics = model(images, labels)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.float().item() * len(images)
            count += len(images)
    model.train()
    shares = gather_object([(sums, count)])  # one (sums, count) per process
    total = sum(n for _, n in shares)
    if total == 0:
        if stop():
            return {}
        raise UsageError("the held-out split has no images: pass a dataset with images in its test or val split")
    keys = dict.fromkeys(k for s, _ in shares for k in s)  # a process with no images has no keys
    return {k: sum(s.get(k, 0.0) for s, _ in shares) / total for k in keys}


def loader_kwargs(micro_batch: int, num_workers: int) -> dict:
    """DataLoader settings of training and evaluation (also what scripts/bench_train.py times)."""
    return {"batch_size": micro_batch, "num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": num_workers > 0, "worker_init_fn": loader_worker_init}


def data_loaders(train_set, eval_set, micro_batch: int, num_workers: int, accelerator) -> tuple[DataLoader, DataLoader]:
    """The prepared (sharded) training and evaluation loaders of one process.

    Training: one seeded shuffle (seed + epoch) split into per-process batches, so each image is seen
    at most once per epoch across processes (a last partial batch is dropped), and the global batch
    of step t holds the same images whatever the process count. Evaluation: each held-out image
    exactly once, none repeated to even out the processes' shares."""
    kw = loader_kwargs(micro_batch, num_workers)
    if num_workers:
        end_workers_at_exit()  # a crash must not leave the process waiting for its workers
    streaming = not hasattr(train_set, "__len__")
    train_loader = accelerator.prepare(DataLoader(train_set, shuffle=not streaming, drop_last=True, **kw))
    even = accelerator.even_batches
    accelerator.even_batches = False
    eval_loader = accelerator.prepare(DataLoader(eval_set, **kw))
    accelerator.even_batches = even
    return train_loader, eval_loader


def train(config: TrainConfig, mpp_config: MPPConfig = MPPConfig()) -> Path:
    """Train, log and checkpoint one run; returns its directory.

    What the run holds (the run directory's lock, the stop-signal handlers) is released however it
    ends: finished, stopped by a signal, refused, or crashed."""
    with contextlib.ExitStack() as held:
        return _train(config, mpp_config, held)


def _train(config: TrainConfig, mpp_config: MPPConfig, held: contextlib.ExitStack) -> Path:
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from tqdm.auto import tqdm

    # ---- config
    config.validate()
    mpp_config.validate()
    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)  # the one decision's inputs
    vit_cfg = vit_config(config.model, image_size=config.image_size or None, dropout=config.dropout)

    # ---- accelerator
    accelerator = make_accelerator(
        config.mixed_precision, config.cpu_threads, gradient_accumulation_steps=config.grad_accum_steps,
        log_with="tensorboard", project_dir=config.output_dir,
    )
    # The main process checks and creates the run directory; every process learns the verdict, so a
    # bad --output-dir stops them all instead of leaving the others waiting.
    verdict = [None]
    if accelerator.is_main_process:
        try:
            held.enter_context(RunLock(prepare_run_dir(config)))  # one process writes a run directory at a time
        except UsageError as e:
            verdict[0] = str(e)
    broadcast_object_list(verdict)
    if verdict[0]:
        raise UsageError(verdict[0])
    run_dir = Path(config.output_dir)
    set_seed(config.seed, device_specific=False)
    world = accelerator.num_processes * config.grad_accum_steps
    if config.batch_size % world:
        raise UsageError(
            f"--batch-size {config.batch_size} is not divisible by processes × accumulation steps = {world}: "
            f"pass a multiple of {world}"
        )

    # ---- data
    train_set, info = build_dataset(
        config.dataset, "train", vit_cfg.image_size, train=True, crop_scale=config.crop_scale,
        hflip=config.hflip, streaming=config.streaming, shuffle_buffer=config.shuffle_buffer, seed=config.seed,
        strict=config.strict_images,
    )
    eval_set, _ = build_dataset(config.dataset, "test", vit_cfg.image_size, train=False, streaming=config.streaming,
                                strict=config.strict_images)
    streaming = not hasattr(train_set, "__len__")
    if not streaming:  # each image's augmentation from (seed, epoch, index): the same after a resume or on N processes
        train_set = SeededSamples(train_set, config.seed)
    train_loader, eval_loader = data_loaders(train_set, eval_set, config.batch_size // world, config.num_workers,
                                             accelerator)

    # ---- kernels: decided once, at this run's shapes, by the main process for all of them
    last_queries = corrupted_count(mpp_config.corrupt_rate, vit_cfg.num_patches) if config.objective == "mpp" else 1
    shapes = RunShapes.of(vit_cfg, config.batch_size // world, autocast_dtype(accelerator), last_queries=last_queries,
                          compiled=config.compile)
    kernels = choose_kernels(policy, shapes, accelerator.device, accelerator)

    # ---- model and objective
    if config.objective == "mpp":
        vit = ViT(dataclasses.replace(vit_cfg, num_classes=0), kernels.kernels)  # MPP predicts from patch tokens
        objective = MPPObjective(vit, mpp_config)
    else:
        vit = ViT(dataclasses.replace(vit_cfg, num_classes=info.num_classes), kernels.kernels)
        objective = SupervisedObjective(vit, config.label_smoothing)
    if config.compile:
        compile_blocks(vit)
    run_cfg = run_config(config, mpp_config, vit, info)
    run_cfg["kernels"] = kernels.record()
    run_cfg["precision"] = str(accelerator.mixed_precision)  # what ran, whatever chose it (flag, Accelerate, GPU default)

    # ---- optimizer and schedule
    if streaming and config.epochs > 0:
        raise UsageError("--epochs needs a dataset of known length: use --max-steps with --streaming")
    # Optimizer steps per pass over this process's shard (a trailing partial accumulation also steps).
    steps_per_epoch = 0 if streaming else math.ceil(len(train_loader) / config.grad_accum_steps)
    if not streaming and steps_per_epoch == 0:
        raise UsageError(
            f"the training set ({len(train_set)} images) is smaller than one batch ({config.batch_size}): "
            "pass a smaller --batch-size"
        )
    total_steps = math.ceil(config.epochs * steps_per_epoch) if config.epochs > 0 else config.max_steps
    optimizer = torch.optim.AdamW(
        param_groups(objective, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2)
    )
    objective, optimizer = accelerator.prepare(objective, optimizer)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
    model = accelerator.unwrap_model(objective)
    # From here on each micro-batch reseeds every generator from (seed, step, micro-batch, process):
    # corruption and dropout then repeat exactly after a resume (mpp/reproducible.py). The model was
    # initialised identically everywhere; the data order is seeded by seed + epoch.
    run_cfg["num_processes"] = accelerator.num_processes

    # ---- resume
    step, elapsed, epoch, batch_in_epoch = 0, 0.0, 0, 0  # batch_in_epoch: micro-batches of this process
    if config.resume:
        found = ckpt_io.load_latest(run_dir)
        if found is None:
            raise UsageError(f"--resume: no readable checkpoint in '{rundir.checkpoint_dir(run_dir)}': drop --resume")
        state, path = found
        saved = state["config"]
        weights = {**state["objective"], **{f"vit.{k}": v for k, v in state["model"].items()}}
        ckpt_io.check_shapes(model, weights, str(path), hint=(
            f"resume with what the run was trained with (scripts/pretrain_{saved['train']['objective']}.py "
            f"--model {saved['train']['model']} --image-size {saved['vit']['image_size']}) or pass a new --output-dir"))
        check_resume(saved, run_cfg, accelerator.num_processes, str(path))  # after the shapes: names parameters
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["step"] > total_steps:
            raise UsageError(f"{path} is at step {state['step']}, past the {total_steps} steps asked for: pass a "
                             f"--max-steps (or --epochs) of at least {state['step']}, or a new --output-dir")
        # The schedule follows this run's length from here on, also when --max-steps changed: the
        # optimizer's saved rates were computed for the old length.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(scheduler.last_epoch, config, total_steps)
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"][accelerator.process_index])
        step, elapsed = state["step"], state["elapsed"]
        epoch, batch_in_epoch = state["data"]["epoch"], state["data"]["batch_in_epoch"]
        accelerator.print(f"resumed {run_dir} at step {step} from {path.name}")

    # ---- logging
    if accelerator.is_main_process:
        if config.resume:  # the run keeps its original config; each resume is recorded in it
            original = read_run_config(run_dir, state["config"])
            original.setdefault("resumed", []).append({"step": step, "command": run_cfg["command"],
                                                       "max_steps": config.max_steps, "epochs": config.epochs,
                                                       "kernels": run_cfg["kernels"]})
            files.write_json(run_dir / "config.json", original)
            trim_metrics(run_dir / "metrics.jsonl", step)
        else:
            files.write_json(run_dir / "config.json", run_cfg)
    accelerator.init_trackers("tensorboard", config=flat_hparams(run_cfg))
    metrics_file = held.enter_context(open(run_dir / "metrics.jsonl", "a")) if accelerator.is_main_process else None

    def log(values: dict, at: int) -> None:
        accelerator.log(values, step=at)
        if metrics_file:
            metrics_file.write(json.dumps({"step": at, **values}) + "\n")
            metrics_file.flush()

    last_save = {"step": None}  # the step of the newest checkpoint this process took part in

    def save(at: int) -> None:
        rngs = gather_object([ckpt_io.rng_state()])  # one per process: each resumes its own streams
        problem = [None]
        if accelerator.is_main_process and not all(torch.isfinite(p).all() for p in model.parameters()):
            # A checkpoint must be a state worth resuming from: weights that blew up are not saved.
            problem[0] = diverged(at, run_dir, optimizer.param_groups[0]["lr"], config.lr,
                                  "the weights are not finite after")
        elif accelerator.is_main_process:
            state = {
                "config": run_cfg,
                "model": model.vit.state_dict(),
                "objective": {k: v for k, v in model.state_dict().items() if not k.startswith("vit.")},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": at,
                "elapsed": elapsed + time.perf_counter() - started,
                "rng": rngs,
                "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch},
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            }
            try:
                ckpt_io.save_checkpoint(run_dir, at, state, keep=config.keep_checkpoints)
            except UsageError as e:  # a full disk...: every process stops, not just the one that failed to write
                problem[0] = str(e)
        broadcast_object_list(problem)
        if problem[0]:
            raise UsageError(problem[0])
        last_save["step"] = at

    def run_eval(at: int) -> dict | None:
        """The held-out metrics at step `at`, logged; None when a stop signal cut the evaluation short
        (in any process: they agree, so all of them go on to save and stop)."""
        results = evaluate(model, eval_loader, accelerator, config.seed, stop=lambda: stop.requested)
        if any(gather_object([stop.requested])):
            return None
        log({f"eval/{k}": v for k, v in results.items()}, at)
        return results

    # ---- loop
    bar = tqdm(total=total_steps, initial=step, desc=f"{config.objective} {run_dir.name}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    started = time.perf_counter()
    window = {"t": time.perf_counter(), "steps": 0, "sums": {}}
    values: dict = {}  # the last logged training metrics
    micro = 0  # micro-batches into the current optimizer step (checkpoints fall between steps: 0 on resume)
    objective.train()
    stop = held.enter_context(StopRequest())  # from the first step to the final save, a stop saves first
    stopping = False
    try:
        while step < total_steps and not stopping:
            train_loader.set_epoch(epoch)
            if isinstance(train_set, SeededSamples):
                train_set.set_epoch(epoch)  # the augmentations' epoch, shared with the loader's workers
            # A resumed run skips the batches of this epoch it has already trained on.
            batches = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
            for images, labels in batches:
                batch_in_epoch += 1
                with accelerator.accumulate(objective):
                    seed_step(config.seed, step, micro, accelerator.process_index)
                    micro += 1
                    loss, metrics = objective(images, labels)
                    # [non-finite loss, stop signal received]: summed over processes, so all of them
                    # raise, or stop after the same step, together and none is left waiting.
                    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                         torch.tensor(float(stop.requested), device=loss.device)])  # [2]
                    if accelerator.num_processes > 1:
                        flags = accelerator.reduce(flags, "sum")
                    bad, stopping = bool(flags[0] > 0), stopping or bool(flags[1] > 0)
                    if bad:
                        raise UsageError(diverged(step + 1, run_dir, optimizer.param_groups[0]["lr"], config.lr,
                                                  "the loss is not finite at"))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        metrics["grad_norm"] = accelerator.clip_grad_norm_(objective.parameters(), config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in metrics.items():
                    window["sums"][k] = window["sums"].get(k, 0) + v.detach().float()
                if not accelerator.sync_gradients:
                    continue
                # ---- one optimizer step done
                micro = 0
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
                    scheduler.step()
                step += 1
                window["steps"] += 1
                bar.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    n_micro = window["steps"] * config.grad_accum_steps
                    values = {f"train/{k}": accelerator.reduce(v, "mean").item() / (n_micro if k != "grad_norm" else window["steps"])
                              for k, v in window["sums"].items()}
                    values["train/lr"] = lr
                    values["train/images_per_s"] = window["steps"] * config.batch_size / (now - window["t"])
                    log(values, step)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
                    window = {"t": time.perf_counter(), "steps": 0, "sums": {}}
                if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    stopping = run_eval(step) is None or stopping
                if (step % config.save_every == 0 and step < total_steps) or stopping:
                    save(step)
                if step >= total_steps or stopping:
                    break
            else:  # the epoch ran out (not the step budget): the next one starts from its first batch
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        bar.close()  # ends the bar's line, so an error message starts on a line of its own

    # ---- final evaluation and checkpoint (a stop during the evaluation saves this step, then stops)
    results = None if stopping else run_eval(step)
    if results is None or last_save["step"] != step:
        save(step)
    if results is None:
        accelerator.end_training()
        accelerator.print(f"stopped at step {step} of {total_steps}; checkpoint saved in "
                          f"{rundir.checkpoint_dir(run_dir)}: rerun the same command with --resume to continue")
        sys.exit(stop.exit_code)
    if accelerator.is_main_process:
        summary = {
            "objective": config.objective, "steps": step, "wall_time_s": elapsed + time.perf_counter() - started,
            "eval": results, "last_train": values, "kernels": run_cfg["kernels"],
            # this process's share of the unreadable images skipped (the warnings name them)
            "skipped_images": {name: data.skipped_images() for name, data in (("train", train_set), ("eval", eval_set))
                               if hasattr(data, "skipped_images")},
        }
        files.write_json(run_dir / "summary.json", summary)
        accelerator.print(f"done: {run_dir} ({step} steps; eval {json.dumps({k: round(v, 4) for k, v in results.items()})})")
    accelerator.end_training()
    if stop.requested:  # it came during the final save: the run is complete, the scheduler still sees why it ended
        sys.exit(stop.exit_code)
    return run_dir


def flat_hparams(run_cfg: dict) -> dict:
    """TensorBoard's hparams accept scalars and strings only."""
    flat = {}
    for section in ("train", "mpp", "vit"):
        for k, v in run_cfg[section].items():
            flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def build_parser(objective: str):
    """The flags of one objective's entry point: every TrainConfig field, plus MPPConfig's for MPP."""
    from mpp.config import Parser, add_dataclass_flags

    parser = Parser(
        description=f"{objective} training of a ViT (run it with `accelerate launch` for several GPUs or machines)",
    )
    add_dataclass_flags(parser, TrainConfig, defaults={"output_dir": f"runs/{objective}"}, skip=("objective",))
    if objective == "mpp":
        add_dataclass_flags(parser, MPPConfig)
    return parser


def parse_args(objective: str, argv: list[str] | None = None) -> tuple[TrainConfig, MPPConfig]:
    from mpp.config import dataclass_from_args

    args = build_parser(objective).parse_args(argv)
    config = dataclasses.replace(dataclass_from_args(TrainConfig, args), objective=objective)
    return config, dataclass_from_args(MPPConfig, args)


def main(objective: str, argv: list[str] | None = None) -> None:
    from mpp.errors import cli_main

    cli_main(lambda: train(*parse_args(objective, argv)))()
