"""Which implementation of attention and LayerNorm a run uses: decided once per process, before the
model is built, at the shapes and dtype the run really uses.

    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)   # --kernels, MPP_KERNELS...
    choice = resolve(policy, RunShapes.of(vit_cfg, micro_batch, "bfloat16"), accelerator.device)
    vit = ViT(vit_cfg, choice.kernels)                                        # fixed functions from here on

Modes: `torch` runs PyTorch's ops and checks nothing (triton is never imported). `auto` (the
default) uses our kernel for an op only where, on this device and at these shapes, it is correct
and faster: it runs ours and PyTorch's op forward and backward on inputs of the run's shapes,
checks ours against an fp32 reference with the tests' rule (error at most twice PyTorch's own in
that dtype, plus one ulp; in fp32 at least a few ulps, 2e-5 relative) and times both; a compile or
launch error, an exhausted resource or a non-finite output means PyTorch for that op, with one
warning line. `triton` uses ours wherever it runs correctly and makes any failed check an error.
The measurements are cached on disk, keyed by the device, driver, torch and triton versions and a
hash of the kernel sources, so the next run with the same shapes skips the timing
(`--kernel-cache DIR|off`, `MPP_KERNEL_CACHE`). The cache only ever spares the timing: a kernel it
would put in is checked again against the tolerance first, and a malformed entry is measured again.

This module is the policy: the flags, the run's shapes, the verdicts and the decision.
`mpp.model.kernel_measure` measures one op; `mpp.model.kernel_cache` keys and stores the measurements.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mpp.core.errors import UsageError
from mpp.model.kernel_cache import cache_file, environment, read_cache, write_cache
from mpp.model.kernel_measure import BrokenContext, NotOurs, RunShapes, check_op, measure_op  # noqa: F401  (RunShapes: the policy's input, named from here too)
from mpp.model.ops import OPS, Kernels
from triton_kernels.gate import (
    MAX_GRID_Y,
    MAX_HEAD_DIM,
    MAX_WIDTH,
    import_problem,
    interpreting,
    platform_problem,
)

MODES = ("auto", "triton", "torch")
ENV, OFF_ENV, CACHE_ENV = "MPP_KERNELS", "MPP_KERNELS_OFF", "MPP_KERNEL_CACHE"
UNFINISHED = "its measurement did not finish in an earlier run (a crash or a hang of the kernel)"
TUNED_HEAD_DIMS = (32, 64, 128)  # the launch configurations' head dims; others are padded to a power of two


@dataclass(frozen=True)
class KernelPolicy:
    """What the user asked for; `resolve` turns it into a `KernelChoice` for one run's shapes."""

    mode: str = "auto"  # auto: ours where verified and faster | triton: ours, a failed check is an error | torch
    off: frozenset[str] = frozenset()  # ops kept on PyTorch by name (MPP_KERNELS_OFF), to measure one kernel's effect
    cache: str = ""  # verdict cache folder; "": $MPP_KERNEL_CACHE or ~/.cache/mpp/kernels; "off": measure every run

    @classmethod
    def from_flags(cls, kernels: str = "", cache: str = "", environ: dict | None = None) -> KernelPolicy:
        """The policy of an entry point: its flags, else the environment variables, else the defaults."""
        env = os.environ if environ is None else environ
        mode = (kernels or env.get(ENV, "") or "auto").strip().lower()
        if mode not in MODES:
            raise UsageError(f"kernel mode {mode!r} (--kernels or ${ENV}) is not one of auto, triton, torch: pass one")
        off = frozenset(name.strip() for name in env.get(OFF_ENV, "").split(",") if name.strip())
        if off - set(OPS):
            raise UsageError(f"${OFF_ENV} names {sorted(off - set(OPS))}, not ops: use a comma-separated subset of "
                             f"{', '.join(OPS)}")
        return cls(mode, off, (cache or env.get(CACHE_ENV, "")).strip())

    def cache_dir(self) -> Path | None:
        if self.cache.lower() == "off":
            return None
        if self.cache:
            return Path(self.cache).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpp" / "kernels"


@dataclass(frozen=True)
class Verdict:
    op: str  # attention | layer_norm | add_layer_norm
    impl: str  # triton | torch
    reason: str  # why, one clause
    figures: dict = field(default_factory=dict)  # error, bound, ours_ms, torch_ms, ratio (when measured)


@dataclass(frozen=True)
class KernelChoice:
    """The verdicts of one run: which implementation each op runs, why, and the measurements."""

    mode: str  # the policy's mode
    verdicts: tuple[Verdict, ...]  # one per op, in OPS order
    source: str  # measured | cache | not measured
    environment: dict  # device, driver, versions, kernel-source hash: the cache key's first half
    shapes: dict = field(default_factory=dict)  # the RunShapes decided at: the cache key's second half
    cache: str = ""  # the cache entry read or written ("" when the cache is off or nothing was measured)

    @property
    def kernels(self) -> Kernels:
        return Kernels.of({v.op: v.impl for v in self.verdicts})

    def record(self) -> dict:
        """For config.json / summary.json."""
        return {"mode": self.mode, "source": self.source, "environment": self.environment, "shapes": self.shapes,
                "cache": self.cache,
                "verdicts": {v.op: {"impl": v.impl, "reason": v.reason, **v.figures} for v in self.verdicts}}

    def lines(self) -> list[str]:
        """One line per op, printed above the progress bar."""
        groups: dict[str, list[str]] = {}  # one line per distinct outcome: ops that share it are listed together
        for v in self.verdicts:
            f = v.figures
            timing = f" (ours {f['ours_ms']:.3g} ms vs PyTorch {f['torch_ms']:.3g} ms, ×{f['ratio']:.2f})" \
                if "ratio" in f else ""
            groups.setdefault(f"{v.impl}: {v.reason}{timing}", []).append(v.op)
        lines = [f"kernels: {', '.join(ops)} → {outcome}" for outcome, ops in groups.items()]
        if self.source == "cache":
            lines.append(f"kernels: verdicts from the cache {self.cache} (--kernel-cache off measures again)")
        return lines


def resolve(policy: KernelPolicy, shapes: RunShapes, device, *, main: bool = True,
            share: Callable[[object], object] = lambda x: x, warn: Callable[[str], None] | None = None) -> KernelChoice:
    """The kernels for a run. The main process decides (measuring, or from the cache); `share` hands its
    verdict to every process (a broadcast), so all run the same ops. Raises UsageError in every process
    when `--kernels triton` meets a failed check."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    decided, failure = None, None
    if main:
        try:
            decided = {"choice": _decide(policy, shapes, torch.device(device), warn), "error": None}
        except UsageError as e:
            decided = {"choice": None, "error": str(e)}
        except BrokenContext as e:
            decided = {"choice": None, "error": f"a kernel broke the CUDA context while it was verified ({e}): "
                                                "rerun with --kernels torch, or keep that op on PyTorch with "
                                                "MPP_KERNELS_OFF=<op>"}
        except BaseException as e:  # a bug or an interrupt: the other processes must not wait for a verdict
            decided, failure = {"choice": None, "error": f"the main process failed to choose kernels ({e!r})"}, e
    decided = share(decided)
    if failure is not None:
        raise failure
    if decided["error"]:
        raise UsageError(decided["error"])
    return decided["choice"]


def _decide(policy: KernelPolicy, shapes: RunShapes, device: torch.device, warn) -> KernelChoice:
    if policy.mode == "torch":
        return KernelChoice("torch", tuple(Verdict(op, "torch", "--kernels torch") for op in OPS), "not measured", {})
    reasons = {op: f"{OFF_ENV} names it" for op in OPS if op in policy.off}
    problem = platform_problem(device)
    if problem is None and len(reasons) < len(OPS):
        problem = import_problem()  # the first import of triton, and only where a kernel could run
        if problem and policy.mode == "auto":  # a GPU that could run them: worth one line
            falling = ", ".join(op for op in OPS if op not in reasons)
            warn(f"warning: kernels: {falling} fall back to PyTorch: {problem}")
    for op in OPS:
        reasons.setdefault(op, problem or _static_problem(op, shapes, device, policy.mode))
    if policy.mode == "triton":
        refused = {op: why for op, why in reasons.items() if why and op not in policy.off}
        if refused:
            op, why = next(iter(refused.items()))
            raise UsageError(f"--kernels triton, but {op} cannot use our kernel here: {why}: pass --kernels auto "
                             "to fall back to PyTorch's ops")
    env = environment(device) if problem is None else {}
    measure = [op for op in OPS if reasons[op] is None]
    key = {"environment": env, "shapes": asdict(shapes)}
    path = cache_file(policy.cache_dir(), key) if measure else None
    measured, source = ({}, "not measured") if not measure else _measurements(policy, shapes, device, key, path,
                                                                                  measure, warn)
    verdicts = []
    for op in OPS:
        if reasons[op]:
            verdicts.append(Verdict(op, "torch", reasons[op]))
            continue
        verdicts.append(_verdict(op, measured[op], policy.mode))
        if "cause" in measured[op]:  # a failure, not a slower kernel: one line, and the run goes on
            warn(f"warning: kernels: {op} falls back to PyTorch: {measured[op]['cause']}")
    return KernelChoice(policy.mode, tuple(verdicts), source, env, asdict(shapes), str(path or ""))


def _static_problem(op: str, shapes: RunShapes, device: torch.device, mode: str) -> str | None:
    """Why the kernel is not even tried for these shapes (None: it is measured)."""
    if op == "attention":
        if shapes.attn_dropout > 0:
            return "the kernel has no attention dropout"
        if not 1 <= shapes.head_dim <= MAX_HEAD_DIM:
            return f"head dim {shapes.head_dim} is outside the kernel's 1..{MAX_HEAD_DIM}"
        if shapes.batch * shapes.heads > MAX_GRID_Y:
            return f"batch × heads {shapes.batch * shapes.heads} passes the grid limit {MAX_GRID_Y}"
        if mode == "auto" and device.type == "cuda" and shapes.dtype == "float32":
            return "fp32 attention: the kernel's exact IEEE path uses no tensor cores (bf16 and fp16 are measured)"
        if interpreting() and shapes.dtype == "bfloat16":
            return "the Triton interpreter has no bfloat16"
    elif shapes.width > MAX_WIDTH:
        return f"width {shapes.width} passes the one-block limit {MAX_WIDTH}"
    return None


def _verdict(op: str, m: dict, mode: str) -> Verdict:
    figures = {k: m[k] for k in ("error", "bound", "worst", "ours_ms", "torch_ms", "ratio") if k in m}
    if "cause" in m:
        if mode == "triton":
            raise UsageError(f"--kernels triton, but our {op} kernel failed its check at the run's shapes: "
                             f"{m['cause']}: pass --kernels auto to fall back to PyTorch's ops")
        return Verdict(op, "torch", m["cause"], figures)
    if mode == "triton":
        return Verdict(op, "triton", "--kernels triton; verified", figures)
    if m["ratio"] >= 1:
        return Verdict(op, "torch", "verified, but not faster than PyTorch's", figures)
    padded = op == "attention" and m.get("head_dim") not in TUNED_HEAD_DIMS
    return Verdict(op, "triton", "verified and faster" + (" (padded head dim, timed)" if padded else ""), figures)


def _admits(m: dict, mode: str) -> bool:
    """Whether this measurement would put our kernel in (auto: verified and faster; triton: verified)."""
    return "cause" not in m and (mode == "triton" or m.get("ratio", 1) < 1)


def _measurements(policy, shapes, device, key, path, ops, warn) -> tuple[dict, str]:
    """{op: measurement} from the cache, or measured now (and cached); and where they came from.
    A cached entry spares the timing only: where it would admit our kernel, the kernel's numbers are
    checked again now (check_op), so an edited or stale entry can keep it out but never put it in."""
    cached = read_cache(path, key, warn) or {}
    # auto needs the timings, which a forced run on the interpreter skipped
    usable = {op: m for op, m in cached.items() if "cause" in m or "ratio" in m or policy.mode == "triton"}
    measured, transient, changed = dict(cached), {}, False
    for op in ops:
        if op in usable and not _admits(usable[op], policy.mode):
            continue
        if op in usable:
            try:
                check = check_op(op, shapes, device, policy.mode)
            except NotOurs as e:
                transient[op] = {"cause": f"could not be verified: the reference or PyTorch's op failed ({e})"}
                continue
            if "cause" in check:  # the entry said verified, today's check says not: today's replaces it
                measured[op], changed = check, True
            else:  # today's figures, the cached timings
                measured[op] = {**usable[op], **check}
            continue
        changed = True
        write_cache(path, key, {**measured, op: {"cause": UNFINISHED}})  # a crash or hang here is remembered
        try:
            measured[op] = measure_op(op, shapes, device, policy.mode)
        except NotOurs as e:  # nothing learned about ours: PyTorch's op this time, measured again next time
            transient[op] = {"cause": f"could not be verified: the reference or PyTorch's op failed ({e})"}
            measured.pop(op, None)
        except (KeyboardInterrupt, SystemExit):  # the user's Ctrl-C is not the kernel's fault: no marker
            write_cache(path, key, measured)
            raise
    if changed:
        write_cache(path, key, measured)
    return {**measured, **transient}, "measured" if changed else "cache"
