"""The measurement behind a kernel verdict: our kernel and PyTorch's op run forward and backward on
inputs of the run's shapes, checked against a float64 reference and timed against each other.

Each op is described once, in `MEASURED`: how to build its inputs at a run's shapes, the constants
its call takes after them, the names of its outputs, its float64 reference, and whether PyTorch's
op is timed compiled under --compile. Every op is then called the same way: fn(*inputs,
*constants), with the inputs in the order the op takes them.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpp.model.ops import IMPLEMENTATIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = 1e-6  # the ViT's LayerNorm epsilon


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
        """The shapes of a ViT (`mpp.model.vit.ViTConfig`) at this micro-batch; last_queries defaults to every token."""
        tokens = vit.num_patches + 1
        return cls(batch, tokens, last_queries or tokens, vit.num_heads, vit.embed_dim // vit.num_heads,
                   vit.embed_dim, dtype, backward, vit.attn_dropout if backward else 0.0, compiled)



class NotOurs(Exception):
    """The reference or PyTorch's op failed (e.g. out of memory): nothing is known about ours."""


class BrokenContext(Exception):
    """Our kernel left the CUDA context unusable: the process cannot go on (resolve says how to rerun)."""


# ---- the ops: inputs at the run's shapes, float64 references


def vit_attention_inputs(randn, B: int, H: int, n_q: int, n_k: int, hd: int, dtype: torch.dtype):
    """(q, k, v, dO) in the ViT's memory layout (mpp.model.vit's Attention): q, k, v views of the
    (B, N, 3, H, hd) qkv projection; with fewer queries (the last block), k, v views of its
    (B, N, 2, H, hd) key-value projection and q from its own (B, n, H, hd) one; dO as the block sends
    it back, a (B, n, H, hd) tensor seen as (B, H, n, hd)."""
    qkv = randn(B, n_k, 3, H, hd, dt=dtype)  # (B, N, 3, H, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, N, hd)
    if n_q != n_k:  # the same keys and values, drawn as above, in the key-value projection's layout
        k, v = qkv[:, :, 1:].contiguous().permute(2, 0, 3, 1, 4).unbind(0)  # 2 × (B, H, N, hd)
        q = randn(B, n_q, H, hd, dt=dtype).transpose(1, 2)  # (B, H, n, hd)
    return q, k, v, randn(B, n_q, H, hd, dt=dtype).transpose(1, 2)


def _attention_cases(s: RunShapes, dtype: torch.dtype, randn) -> list[tuple[dict, list]]:
    """The full blocks' attention, and the last block's (its queries over all keys) when it differs."""
    cases = []
    for n_q in dict.fromkeys((s.tokens, s.last_queries)):
        q, k, v, dout = vit_attention_inputs(randn, s.batch, s.heads, n_q, s.tokens, s.head_dim, dtype)
        cases.append(({"q": q, "k": k, "v": v}, [dout]))
    return cases


def _norm_inputs(s: RunShapes, randn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight, bias (D,) fp32 parameters; x (B, N, D) the fp32 residual stream; dy its LayerNorm's gradient."""
    B, N, D = s.batch, s.tokens, s.width
    weight, bias = 1 + randn(D, scale=0.1), randn(D, scale=0.1)
    return weight, bias, randn(B, N, D, scale=2.0), randn(B, N, D)


def _layer_norm_cases(s: RunShapes, dtype: torch.dtype, randn) -> list[tuple[dict, list]]:
    weight, bias, x, dy = _norm_inputs(s, randn)
    return [({"x": x, "weight": weight, "bias": bias}, [dy])]


def _add_layer_norm_cases(s: RunShapes, dtype: torch.dtype, randn) -> list[tuple[dict, list]]:
    """Under autocast the residual stream runs in fp32 and the branch it adds in the autocast dtype."""
    weight, bias, x, dy = _norm_inputs(s, randn)
    residual = randn(s.batch, s.tokens, s.width, dt=dtype)  # (B, N, D): a branch's output
    ds = randn(s.batch, s.tokens, s.width)  # the residual stream's own gradient
    return [({"x": x, "residual": residual, "weight": weight, "bias": bias}, [ds, dy])]


def _attention_reference(q, k, v, dropout_p=0.0):
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _layer_norm_reference(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def _add_layer_norm_reference(x, residual, weight, bias, eps):
    s = x + residual
    return s, _layer_norm_reference(s, weight, bias, eps)


@dataclass(frozen=True)
class Measured:
    """How the verification builds, calls and judges one op."""

    cases: Callable  # (RunShapes, dtype, randn) -> [(inputs {name: tensor} in call order, upstream gradients)]
    constants: tuple  # the arguments after the inputs: attention's dropout_p, the norms' eps
    outputs: tuple[str, ...]  # the names of the op's outputs, in order
    reference: Callable  # the op's definition, run on float64 copies of the inputs
    compiled_baseline: bool  # --compile: PyTorch's op timed compiled (Inductor fuses norms with their neighbours)


MEASURED = {
    "attention": Measured(_attention_cases, (0.0,), ("out",), _attention_reference, compiled_baseline=False),
    "layer_norm": Measured(_layer_norm_cases, (EPS,), ("y",), _layer_norm_reference, compiled_baseline=True),
    "add_layer_norm": Measured(_add_layer_norm_cases, (EPS,), ("s", "y"), _add_layer_norm_reference,
                               compiled_baseline=True),
}


# ---- the measurement


def check_op(op: str, shapes: RunShapes, device: torch.device, mode: str = "auto") -> dict:
    """measure_op without the timing: our kernel's outputs and gradients against the reference, now."""
    return measure_op(op, shapes, device, mode, timed=False)


def measure_op(op: str, shapes: RunShapes, device: torch.device, mode: str = "auto", timed: bool = True) -> dict:
    """Run our kernel and PyTorch's op at the run's shapes: errors against a float64 reference, both
    timed (unless not `timed`). A failure of ours is a 'cause' in the result, not an exception; a failure
    of the reference or of PyTorch's op raises NotOurs (and is not cached)."""
    spec = MEASURED[op]
    ours, theirs = IMPLEMENTATIONS[op]["triton"], IMPLEMENTATIONS[op]["torch"]
    if shapes.compiled and spec.compiled_baseline:
        theirs = torch.compile(theirs, fullgraph=True)
    result: dict = {"head_dim": shapes.head_dim} if op == "attention" else {}
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        try:
            cases = spec.cases(shapes, DTYPES[shapes.dtype], seeded_randn(device))
            checked = [(args, grads, _not_ours(run_op, spec, spec.reference, args, grads, shapes.backward, upcast=True),
                        _not_ours(run_op, spec, theirs, args, grads, shapes.backward)) for args, grads in cases]
            worst = None
            for args, grads, reference, baseline in checked:
                got = _ours(device, run_op, spec, ours, args, grads, shapes.backward)
                if isinstance(got, str):
                    return {**result, "cause": got}
                for name, want in reference.items():
                    g, t = got[name], baseline[name]
                    if not torch.isfinite(g).all():
                        return {**result, "cause": f"non-finite {name} at the run's shapes"}
                    err, _, bound = error_and_bound(g, t, want)
                    if worst is None or err - bound > worst[0] - worst[1]:
                        worst = (err, bound, name)
            del checked
            result.update(error=worst[0], bound=worst[1], worst=worst[2])
            if worst[0] > worst[1]:
                return {**result, "cause": f"wrong numbers: {worst[2]} error {worst[0]:.3g} > bound {worst[1]:.3g} "
                                           f"(2× PyTorch's + 1 ulp; fp32: {FP32_TOLERANCE:g} relative)"}
            if not timed or (mode == "triton" and device.type != "cuda"):
                return result  # forced, and the interpreter's times would mean nothing: not timed
            args, grads = cases[0]
            timed = _ours(device, time_pair, lambda: run_op(spec, ours, args, grads, shapes.backward),  # fwd (+ bwd)
                          lambda: run_op(spec, theirs, args, grads, shapes.backward), device)
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


def seeded_randn(device: torch.device, seed: int = 0):
    """randn(*shape, dt=float32, scale=1.0): normal draws on `device` from a generator seeded with
    `seed`, cast to dt: the same inputs at every measurement."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

    return randn


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def run_op(spec: Measured, fn: Callable, args: dict, grads: list, backward: bool,
           upcast: bool = False) -> dict[str, torch.Tensor]:
    """{output and gradient name: tensor} of fn (an implementation of spec's op, or its reference)
    on fresh leaves copied from args (float64 copies when upcast), with upstream gradients `grads`."""
    # float64, not fp32: an fp32 reference of a 25,000-row dweight sum errs as much as what it judges
    leaves = {k: (a.detach().double() if upcast else a.detach()).requires_grad_(backward) for k, a in args.items()}
    with torch.set_grad_enabled(backward):
        outs = fn(*leaves.values(), *spec.constants)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if backward:
            torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    named = dict(zip(spec.outputs, (o.detach() for o in outs), strict=True))
    if backward:
        named.update({f"d{k}": leaf.grad for k, leaf in leaves.items()})
    return named


# fp32 (IEEE products): the tests' tolerance, a few ulps of the data (tests/test_attention.py).
FP32_TOLERANCE = 2e-5


def error_and_bound(got: torch.Tensor, theirs: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """The tests' rule, as (our error, PyTorch's error, the bound): our max error against the float64
    reference `want` may be at most twice PyTorch's own in that dtype plus one ulp at want's scale;
    in fp32 at least FP32_TOLERANCE × max(1, |want|). In half precision both errors are set by the
    output's rounding, so twice PyTorch's is a sharp test. In fp32 both sit at a few ulps set by
    the order of the sums, and each is the largest of thousands of heavy-tailed element errors: which
    of the two maxima is larger is chance (at Micro/4's shapes ours is 2.5× PyTorch's on dv and 0.4×
    on dq, with equal mean errors), while a real fault (tf32 products, a wrong mask) is off by 100×."""
    err, terr = _max_err(got, want), _max_err(theirs, want)
    magnitude = want.abs().max().item()
    bound = 2 * terr + torch.finfo(got.dtype).eps * magnitude
    if got.dtype == torch.float32:
        bound = max(bound, FP32_TOLERANCE * max(1.0, magnitude))
    return err, terr, bound


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
