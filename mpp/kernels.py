"""Which implementation of attention and LayerNorm a run uses: decided once per process, before the
model is built, at the shapes and dtype the run really uses.

    policy = KernelPolicy.from_flags(config.kernels, config.kernel_cache)   # --kernels, MPP_KERNELS...
    choice = resolve(policy, RunShapes.of(vit_cfg, micro_batch, "bfloat16"), accelerator.device)
    vit = ViT(vit_cfg, choice.kernels)                                        # fixed functions from here on

Modes: `torch` runs PyTorch's ops and checks nothing (triton is never imported). `auto` (the
default) uses our kernel for an op only where, on this device and at these shapes, it is correct
and faster: it runs ours and PyTorch's op forward and backward on inputs of the run's shapes,
checks ours against an fp32 reference with the tests' rule (error at most twice PyTorch's own in
that dtype, plus one ulp) and times both; a compile or launch error, an exhausted resource or a
non-finite output means PyTorch for that op, with one warning line. `triton` uses ours wherever it
runs correctly and makes any failed check an error. The measurements are cached on disk, keyed by
the device, driver, torch and triton versions and a hash of the kernel sources, so the next run
with the same shapes starts at once (`--kernel-cache DIR|off`, `MPP_KERNEL_CACHE`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mpp.errors import UsageError
from mpp.files import write_json
from mpp.ops import IMPLEMENTATIONS, OPS, Kernels
from triton_kernels.gate import import_problem, interpreting, platform_problem

MODES = ("auto", "triton", "torch")
ENV, OFF_ENV, CACHE_ENV = "MPP_KERNELS", "MPP_KERNELS_OFF", "MPP_KERNEL_CACHE"
UNFINISHED = "its measurement did not finish in an earlier run (a crash or a hang of the kernel)"
TUNED_HEAD_DIMS = (32, 64, 128)  # the launch configurations' head dims; others are padded to a power of two
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
class RunShapes:
    """The shapes and dtypes at which a run calls each op (one process's micro-batch)."""

    batch: int  # images per forward pass of one process
    tokens: int  # sequence length: patches + the class token
    last_queries: int  # tokens the last block computes outputs for (1: supervised, the corrupted patches: MPP)
    heads: int  # attention heads
    head_dim: int  # width of one head
    width: int  # token width D (LayerNorm's)
    dtype: str = "float32"  # matmul and attention dtype: float32, or the autocast dtype (bfloat16, float16)
    backward: bool = True  # training (forward and backward) or features only (forward)
    attn_dropout: float = 0.0  # attention-probability dropout in training (the kernel has none)
    compiled: bool = False  # --compile: PyTorch's norms are then timed compiled (Inductor fuses them)

    @classmethod
    def of(cls, vit, batch: int, dtype: str = "float32", backward: bool = True, last_queries: int | None = None,
           compiled: bool = False):
        """The shapes of a ViT (`mpp.model.ViTConfig`) at this micro-batch; last_queries defaults to every token."""
        tokens = vit.num_patches + 1
        return cls(batch, tokens, last_queries or tokens, vit.num_heads, vit.embed_dim // vit.num_heads,
                   vit.embed_dim, dtype, backward, vit.attn_dropout if backward else 0.0, compiled)


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
                "cache": self.cache, "verdicts": {v.op: {"impl": v.impl, "reason": v.reason, **v.figures} for v in self.verdicts}}

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
            warn(f"warning: kernels: {', '.join(op for op in OPS if op not in reasons)} fall back to PyTorch: {problem}")
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
    path = _cache_file(policy, key) if measure else None
    measured, source = ({}, "not measured") if not measure else _measurements(policy, shapes, device, key, path, measure)
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
        if not 1 <= shapes.head_dim <= 128:
            return f"head dim {shapes.head_dim} is outside the kernel's 1..128"
        if shapes.batch * shapes.heads > 65535:
            return f"batch × heads {shapes.batch * shapes.heads} passes the grid limit 65535"
        if mode == "auto" and device.type == "cuda" and shapes.dtype == "float32":
            return "fp32 attention: the kernel's exact IEEE path uses no tensor cores (bf16 and fp16 are measured)"
        if interpreting() and shapes.dtype == "bfloat16":
            return "the Triton interpreter has no bfloat16"
    elif shapes.width > 65536:
        return f"width {shapes.width} passes the one-block limit 65536"
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


# ---- measurement


def _measurements(policy, shapes, device, key, path, ops) -> tuple[dict, str]:
    """{op: measurement} from the cache, or measured now (and cached); and where they came from."""
    cached = _read_cache(path, key) or {}
    # auto needs the timings, which a forced run on the interpreter skipped
    usable = {op: m for op, m in cached.items() if "cause" in m or "ratio" in m or policy.mode == "triton"}
    if all(op in usable for op in ops):
        return usable, "cache"
    measured, transient = dict(cached), {}
    for op in ops:
        if op in usable:
            continue
        _write_cache(path, key, {**measured, op: {"cause": UNFINISHED}})  # a crash or hang here is remembered
        try:
            measured[op] = measure_op(op, shapes, device, policy.mode)
        except NotOurs as e:  # nothing learned about ours: PyTorch's op this time, measured again next time
            transient[op] = {"cause": f"could not be verified: the reference or PyTorch's op failed ({e})"}
            measured.pop(op, None)
        except (KeyboardInterrupt, SystemExit):  # the user's Ctrl-C is not the kernel's fault: no marker
            _write_cache(path, key, measured)
            raise
    _write_cache(path, key, measured)
    return {**measured, **transient}, "measured"


class NotOurs(Exception):
    """The reference or PyTorch's op failed (e.g. out of memory): nothing is known about ours."""


def measure_op(op: str, shapes: RunShapes, device: torch.device, mode: str = "auto") -> dict:
    """Run our kernel and PyTorch's op at the run's shapes: errors against a float64 reference, both
    timed. A failure of ours is a 'cause' in the result, not an exception; a failure of the reference
    or of PyTorch's op raises NotOurs (and is not cached)."""
    ours, theirs = IMPLEMENTATIONS[op]["triton"], IMPLEMENTATIONS[op]["torch"]
    if shapes.compiled and op != "attention":  # compiled, PyTorch's norms fuse with their neighbours
        theirs = torch.compile(theirs, fullgraph=True)
    result: dict = {"head_dim": shapes.head_dim} if op == "attention" else {}
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        try:
            cases = _cases(op, shapes, DTYPES[shapes.dtype], device)
            checked = [(args, grads, _not_ours(_run, _reference(op), args, grads, shapes.backward, upcast=True),
                        _not_ours(_run, theirs, args, grads, shapes.backward)) for args, grads in cases]
            worst = None
            for args, grads, reference, baseline in checked:
                got = _ours(device, _run, ours, args, grads, shapes.backward)
                if isinstance(got, str):
                    return {**result, "cause": got}
                for name, want in reference.items():
                    g, t = got[name], baseline[name]
                    if not torch.isfinite(g).all():
                        return {**result, "cause": f"non-finite {name} at the run's shapes"}
                    err, terr = _max_err(g, want), _max_err(t, want)
                    bound = 2 * terr + torch.finfo(g.dtype).eps * want.abs().max().item()
                    if worst is None or err - bound > worst[0] - worst[1]:
                        worst = (err, bound, name)
            del checked
            result.update(error=worst[0], bound=worst[1], worst=worst[2])
            if worst[0] > worst[1]:
                return {**result, "cause": f"wrong numbers: {worst[2]} error {worst[0]:.3g} > bound {worst[1]:.3g} "
                                           "(2× PyTorch's + 1 ulp)"}
            if mode == "triton" and device.type != "cuda":
                return result  # forced, and the interpreter's times would mean nothing: not timed
            args, grads = cases[0]
            timed = _ours(device, time_pair, lambda: _run(ours, args, grads, shapes.backward),  # forward (+ backward)
                          lambda: _run(theirs, args, grads, shapes.backward), device)
            if isinstance(timed, str):
                return {**result, "cause": timed}
            result["ours_ms"], result["torch_ms"] = timed
            result["ratio"] = result["ours_ms"] / result["torch_ms"]
        finally:
            cases = None  # the inputs go before the cache is emptied
            if device.type == "cuda":
                with contextlib.suppress(Exception):  # a broken context was reported by _ours already
                    torch.cuda.empty_cache()
    return result


def _not_ours(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure outside our kernel: not a verdict on it
        raise NotOurs(f"{type(e).__name__}: {_first_line(e)}") from e


def _ours(device: torch.device, fn, *args, **kwargs):
    """fn's result, or why our kernel failed (compile, launch, resources). A CUDA error that leaves
    the context unusable (an illegal address) cannot be survived in this process: it is an error."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a failure of ours: PyTorch's op for it
        cause = f"{type(e).__name__} at the run's shapes: {_first_line(e)}"
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
                torch.ones(1, device=device).add_(1).item()  # does the context still run work?
            except Exception:  # noqa: BLE001
                raise BrokenContext(cause) from e
        return cause


class BrokenContext(Exception):
    """Our kernel left the CUDA context unusable: the process cannot go on (resolve says how to rerun)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _cases(op: str, s: RunShapes, dtype: torch.dtype, device: torch.device) -> list[tuple[dict, list]]:
    """[(inputs, upstream gradients)] in the model's own memory layout and dtypes: under autocast the
    residual stream and LayerNorm run in fp32 and the branches (attention's output) in the autocast dtype."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

    B, N, H, hd, D = s.batch, s.tokens, s.heads, s.head_dim, s.width
    if op == "attention":
        cases = []
        for n_q in dict.fromkeys((N, s.last_queries)):  # the full blocks and the last block's queries
            qkv = randn(B, N, 3, H, hd, dt=dtype)  # the ViT's qkv.reshape(B, N, 3, H, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, hd)
            if n_q != N:
                q = randn(B, n_q, H, hd, dt=dtype).transpose(1, 2)  # (B, H, n, hd): the last block's queries
            dout = randn(B, n_q, H, hd, dt=dtype).transpose(1, 2)  # as from out.transpose(1, 2).reshape(B, n, D)
            cases.append(({"q": q, "k": k, "v": v}, [dout]))
        return cases
    weight, bias = 1 + randn(D, scale=0.1), randn(D, scale=0.1)  # (D,) fp32 parameters
    x = randn(B, N, D, scale=2.0)  # (B, N, D): the fp32 residual stream
    dy = randn(B, N, D)
    if op == "layer_norm":
        return [({"x": x, "weight": weight, "bias": bias}, [dy])]
    residual = randn(B, N, D, dt=dtype)  # a branch's output, in the autocast dtype
    return [({"x": x, "residual": residual, "weight": weight, "bias": bias}, [randn(B, N, D), dy])]  # ds, dy


def _reference(op: str) -> Callable:
    eps = 1e-6

    def attention(q, k, v, dropout_p=0.0):  # softmax(q k^T / sqrt(hd)) v in fp32
        scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def layer_norm(x, weight, bias, eps=eps):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps) * weight + bias

    def add_layer_norm(x, residual, weight, bias, eps=eps):
        s = x + residual
        return s, layer_norm(s, weight, bias, eps)

    return {"attention": attention, "layer_norm": layer_norm, "add_layer_norm": add_layer_norm}[op]


def _call(fn: Callable, args: dict):
    values = list(args.values())
    out = fn(*values, 0.0) if "q" in args else fn(*values, 1e-6)
    return out if isinstance(out, tuple) else (out,)


def _run(fn: Callable, args: dict, grads: list, backward: bool, upcast: bool = False) -> dict[str, torch.Tensor]:
    """{output and gradient name: tensor} of fn on copies of args (fp32 copies when upcast)."""
    # float64, not fp32: an fp32 reference of a 25,000-row dweight sum errs as much as what it judges
    leaves = {k: (a.detach().double() if upcast else a.detach()).requires_grad_(backward) for k, a in args.items()}
    with torch.set_grad_enabled(backward):
        outs = _call(fn, leaves)
        if backward:
            torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    named = dict(zip(("out",) if "q" in args else ("s", "y") if "residual" in args else ("y",), (o.detach() for o in outs)))
    if backward:
        named.update({f"d{k}": leaf.grad for k, leaf in leaves.items()})
    return named


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item()


def time_pair(ours: Callable[[], None], theirs: Callable[[], None], device: torch.device,
              reps: int | None = None, rounds: int | None = None) -> tuple[float, float]:
    """(ours, theirs) in ms per call: the best of `rounds` means over `reps` calls each, after warm-up,
    the two alternating round by round so that a clock ramping up or a neighbour's load hits both
    (CUDA events on a GPU)."""
    cuda = device.type == "cuda"
    reps = reps or (20 if cuda else 1)  # CPU: the interpreter (tests), where one call takes long enough
    rounds = rounds or (5 if cuda else 2)
    for _ in range(3 if cuda else 1):  # warm-up: compiles, autotuning caches, allocator
        ours()
        theirs()
    best = [float("inf"), float("inf")]
    for r in range(rounds):
        for i, fn in ((0, ours), (1, theirs)) if r % 2 == 0 else ((1, theirs), (0, ours)):
            best[i] = min(best[i], _mean_ms(fn, reps, cuda))
    return best[0], best[1]


def _mean_ms(fn: Callable[[], None], reps: int, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


# ---- the cache


def source_hash() -> str:
    """sha256 of the kernels' sources and of this verification: any change measures again."""
    import triton_kernels

    digest = hashlib.sha256()
    for folder, pattern in ((Path(triton_kernels.__file__).parent, "*.py"), (Path(__file__).parent, "kernels.py"),
                            (Path(__file__).parent, "ops.py")):
        for path in sorted(folder.glob(pattern)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _driver_version() -> str:
    """The NVIDIA driver's version (e.g. 570.124.06), or the CUDA driver API's when /proc does not say."""
    try:
        words = Path("/proc/driver/nvidia/version").read_text().split()
        return next(w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit())
    except (OSError, StopIteration):
        pass
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    """What the measurements depend on besides the shapes."""
    if device.type == "cuda":
        where = {"device": torch.cuda.get_device_name(device),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                 "driver": _driver_version(), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version()}  # one of SDPA's backends: the baseline's speed
    else:
        where = {"device": f"{device.type} (Triton interpreter)" if interpreting() else device.type}
    return {**where, "torch": torch.__version__, "triton": _version("triton"), "kernel_sources": source_hash()}


def _cache_file(policy: KernelPolicy, key: dict) -> Path | None:
    folder = policy.cache_dir()
    if folder is None:
        return None
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")


def _read_cache(path: Path | None, key: dict) -> dict | None:
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, unreadable or torn: measure again
    if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
        return None
    return entry.get("measurements") if isinstance(entry.get("measurements"), dict) else None


def _write_cache(path: Path | None, key: dict, measurements: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "measurements": measurements})  # atomic: never half an entry
    except OSError as e:  # an unwritable cache costs the next run a measurement, nothing more
        print(f"warning: kernels: cannot write the verdict cache {path} ({e.strerror}): the next run measures again",
              file=sys.stderr, flush=True)
