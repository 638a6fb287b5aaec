"""The training benchmark's cases and their timing (scripts/bench_train.py, scripts/bench_cpu_malloc.py).

A case is one (impl, objective): our ViT or timm's same-config VisionTransformer, trained with the
MPP or the supervised objective, with its optimizer and a `step()` that does what `mpp/train/pretrain.py`
does per batch (forward, backward, gradient clipping, an AdamW step) on a fixed batch, so that only
the model is timed. Our ViT's kernels are decided as training decides them, at each objective's own
shapes. The cases are timed in rounds that take turns, every other round in reverse order, so that
the ratios of mpp.bench.stats can pair mirrored rounds. What a step costs besides its time is in
mpp.bench.costs.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from mpp.core.errors import UsageError
from mpp.model.kernel_policy import KernelChoice, KernelPolicy, RunShapes, resolve
from mpp.model.objective import MPPConfig, MPPObjective, SupervisedObjective, corrupted_count
from mpp.model.ops import TORCH, Kernels
from mpp.model.vit import ViT, ViTConfig, gather_tokens, timm_kwargs
from mpp.run.optim import param_groups
from mpp.run.runtime import compile_blocks

IMPLS = ("ours", "timm")
OBJECTIVES = ("mpp", "supervised")
NUM_CLASSES = 10  # the supervised head: CIFAR-10 / Imagenette sized (it barely costs anything)
# The ratios reported: name → (slow case, fast case), step time of the first over the second.
COMPARED = {
    "ours/timm mpp": ("timm mpp", "ours mpp"),  # > 1: ours trains more images/s
    "ours/timm supervised": ("timm supervised", "ours supervised"),
    "mpp/supervised step ours": ("ours mpp", "ours supervised"),  # MPP step cost, supervised = 1
    "mpp/supervised step timm": ("timm mpp", "timm supervised"),
}


# The legs of the training A/B (`bench_train.py --legs`, MPP only), each timed against timm's ViT with
# SDPA: leg → (kernel mode, ops kept on PyTorch); None: timm itself.
LEGS = {"timm": None, "ours-torch": ("torch", ""), "ours-triton": ("triton", ""),
        "ours-no-ln": ("triton", "layer_norm,add_layer_norm")}


def leg_kernels(leg: str, config: ViTConfig, batch: int, dtype: torch.dtype, device: torch.device,
                compiled: bool) -> KernelChoice | str:
    """Our ViT's kernels for `leg` at the MPP step's shapes, or why the leg cannot run (a forced kernel
    that fails its own check there: recorded, the other legs still timed)."""
    mode, off = LEGS[leg]
    policy = KernelPolicy.from_flags(mode, "off", environ={"MPP_KERNELS_OFF": off})
    try:
        return resolve(policy, run_shapes(config, "mpp", batch, dtype, compiled), device)
    except UsageError as e:
        return str(e)


class TimmTokens(nn.Module):
    """timm's `VisionTransformer`, exposing the two calls `MPPObjective` makes of our ViT.

    Supervised training calls `forward`, timm's own. For MPP the patch embeddings come from timm's
    patch_embed and go through timm's class token, position embedding, blocks and final norm."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.config = config
        self.model = VisionTransformer(**timm_kwargs(config))

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}  # timm's: embeddings and tokens

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(images)  # (B, N, D)

    def forward_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        x = m.norm(m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(patches)))))  # (B, N+1, D)
        return x if keep is None else gather_tokens(x, keep)  # (B, N+1, D) | (B, n, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, K)


def build_objective(impl: str, objective: str, config: ViTConfig, kernels: Kernels = TORCH) -> nn.Module:
    config = dataclasses.replace(config, num_classes=0 if objective == "mpp" else NUM_CLASSES)
    vit = ViT(config, kernels) if impl == "ours" else TimmTokens(config)
    return MPPObjective(vit, MPPConfig()) if objective == "mpp" else SupervisedObjective(vit)


def run_shapes(config: ViTConfig, objective: str, batch: int, dtype: torch.dtype, compiled: bool = False) -> RunShapes:
    """The shapes one objective's training step calls the ops at: the last block computes the
    corrupted patches alone for MPP (MPPObjective's keep), the class token alone for supervised.
    `compiled` (--compile): PyTorch's side is timed compiled, as training decides (mpp.train.trainer)."""
    last = corrupted_count(MPPConfig().corrupt_rate, config.num_patches) if objective == "mpp" else 1
    return RunShapes.of(config, batch, str(dtype).removeprefix("torch."), backward=True, last_queries=last,
                        compiled=compiled)


def choose_kernels(policy: KernelPolicy, config: ViTConfig, batch: int, dtype: torch.dtype,
                   device: torch.device, compiled: bool = False) -> dict[str, KernelChoice]:
    """Our ViT's kernels per objective, decided as training decides them: at the step's own shapes.
    (mpp.run.runtime.choose_kernels decides one run's; this prints each line under its objective.)"""
    choices = {}
    for objective in OBJECTIVES:
        choices[objective] = resolve(policy, run_shapes(config, objective, batch, dtype, compiled), device)
        for line in choices[objective].lines():
            print(f"{objective}: {line}", flush=True)
    return choices


class Case:
    """One (impl, objective): its model, optimizer and a `step()` on a fixed batch."""

    def __init__(self, impl: str, objective: str, config: ViTConfig, images: torch.Tensor, labels: torch.Tensor,
                 dtype: torch.dtype, compile_model: bool, kernels: Kernels = TORCH, compile_scope: str = "model",
                 label: str = ""):
        self.impl, self.objective, self.config, self.label = impl, objective, config, label  # label: a leg's name
        self.module = build_objective(impl, objective, config, kernels).to(images.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        groups = param_groups(self.module, 0.05, self.module.no_weight_decay())
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4)
        self.forward = self.module
        if compile_model and compile_scope == "blocks":  # as training's --compile: each block, in place
            compile_blocks(self.module.vit if impl == "ours" else self.module.vit.model)  # timm's ViT has .blocks too
        elif compile_model:
            self.forward = torch.compile(self.module)
        self.images, self.labels = images, labels  # float32 (B, 3, S, S) in [0, 1]; int64 (B,)
        autocast = dtype != torch.float32
        self.autocast = (lambda: torch.autocast(images.device.type, dtype=dtype)) if autocast else nullcontext
        self.step_ms: list[float] = []  # ms per step, one entry per round
        self.faults: list[int] = []  # minor page faults in each round's timed steps

    @property
    def name(self) -> str:
        return f"{self.label or self.impl} {self.objective}"

    def loss(self) -> torch.Tensor:
        with self.autocast():
            return self.forward(self.images, self.labels)[0]

    def step(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Parameters and optimizer state: what stays allocated between steps (gradients are freed)."""
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in self.params + state)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Pages this process has faulted in so far (0 where getrusage is missing): a step that grows the
    heap pays for every fresh page, which shows up as a slow step of whichever case it happens in."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(case: Case, steps: int) -> float:
    """Milliseconds per step over `steps` back-to-back steps; their page faults go to `case.faults`."""
    device = case.images.device
    sync(device)
    faults = minor_faults()
    started = time.perf_counter()
    for _ in range(steps):
        case.step()
    sync(device)
    elapsed = time.perf_counter() - started
    case.faults.append(minor_faults() - faults)
    return elapsed * 1e3 / steps


def time_rounds(cases: list[Case], rounds: int, steps: int, warmup: int,
                after_round: Callable[[int], None] = lambda rounds_done: None) -> None:
    """`warmup` untimed steps of each case (compilation happens here), then `rounds` rounds, each
    appending every case's ms per step over `steps` steps to its `step_ms`; a line per round.

    cases: as built, each impl's MPP then supervised. Timing order: ours MPP, ours supervised, timm
    supervised, timm MPP. Three of the four compared pairs are neighbours in time, so a slow spell of
    the shared machine hits both sides of their ratio; every other round runs in reverse, so a drift
    within a round favours neither side. `after_round(r)` runs after each (a partial result written:
    a run cut short by its time limit keeps the rounds it timed)."""
    order = cases[:2] + cases[2:][::-1]
    for case in order:
        for _ in range(warmup):
            case.step()
    for r in range(rounds):
        for case in order if r % 2 == 0 else order[::-1]:
            case.step_ms.append(time_steps(case, steps))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {c.step_ms[-1]:.1f} ms" for c in cases),
              flush=True)
        after_round(r + 1)


def compared(cases: list[Case]) -> dict[str, tuple[Case, Case]]:
    """The ratios of COMPARED whose two cases were both run: name → (slow case, fast case)."""
    by_name = {c.name: c for c in cases}
    legs = {f"{c.label}/timm mpp": ("timm mpp", c.name) for c in cases if c.label.startswith("ours-")}
    return {k: (by_name[a], by_name[b]) for k, (a, b) in {**COMPARED, **legs}.items() if a in by_name and b in by_name}
