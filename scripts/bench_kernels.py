"""Benchmark our Triton kernels against PyTorch on a GPU; print tables with ratios, write a JSON file.

    python scripts/bench_kernels.py                 # GPU: writes benchmarks/results/kernels-<gpu>.json
    python scripts/bench_kernels.py --quick --time-limit 80   # shorter timings, stops adding cases at 80 s
    python scripts/bench_kernels.py --smoke         # tiny shapes on CPU through Triton's interpreter:
                                                    # checks the script runs, measures nothing meaningful

Attention in TFLOP/s (4·B·H·Nq·Nk·D forward, 2.5× that backward), forward, backward alone and both,
in the ViT's own memory layout (q, k, v permuted views of the qkv projection's (B, N, 3, H, D)
output; the upstream gradient a (B, N, H, D) tensor seen as (B, H, N, D)), against every
`scaled_dot_product_attention` backend that runs (math, efficient, flash, cudnn). LayerNorm, and the
residual add fused with it, in GB/s at ViT widths as they run under bf16 autocast: an fp32 residual
stream plus a bf16 branch (add_layer_norm(x fp32, r bf16)), against eager PyTorch and against
`torch.compile` of the same PyTorch ops. The device's copy bandwidth and a large bf16 matmul are the
ceilings. Every ratio is ours / theirs in time (< 1: ours is faster); all figures of one table come
from the same process, so they compare as ratios on a shared, noisy machine. The JSON is rewritten
after each table, so a run stopped early keeps what it measured.

--smoke runs every code path at a Micro/4-sized shape, each timing one call after one warm-up, and
compiles PyTorch's ops with the aot_eager backend: the same dynamo and AOT-autograd graphs, forward
and backward, as on the GPU, but not Inductor's CPU code generation (C++ built by the system
compiler, tens of seconds, a path the GPU run never takes; gpu_check's compiled_step smoke does the
same). The JSON records the backend.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mpp.core.config import NON_NEGATIVE, Parser, number_flag
from mpp.core.provenance import git_commit
from mpp.model.ops import torch_add_layer_norm, torch_layer_norm

REPO = Path(__file__).resolve().parents[1]
# (name, B, H, N, D): ViT-B/16 and S/16 at 224 px (batch 128), Ti/4 at 32 px, H/14 (head dim 80,
# padded to 128 inside the kernel) and B/16 at 384 px.
ATTENTION_SHAPES = [
    ("B/16 224px", 128, 12, 197, 64), ("S/16 224px", 128, 6, 197, 64), ("Ti/4 32px", 256, 3, 65, 64),
    ("H/14 224px", 32, 16, 257, 80), ("B/16 384px", 16, 12, 577, 64),
]
# (name, rows = B·N, width): the same models' token counts.
LAYER_NORM_SHAPES = [("Ti/4", 256 * 65, 192), ("S/16", 128 * 197, 384), ("B/16", 128 * 197, 768),
                     ("H/14", 32 * 257, 1280)]
# Micro/4's 17 tokens: the interpreter runs every program in Python, and 17 still leaves a ragged
# tile (the interpreter's tiles are 32 and 64 rows) for the masks.
SMOKE_ATTENTION = [("smoke", 1, 2, 17, 32)]
SMOKE_LAYER_NORM = [("smoke", 17, 192)]
KINDS = ("fwd", "bwd", "fwd+bwd")
EPS = 1e-6  # the ViT's LayerNorm epsilon


class Clock:
    """Timing settings and the run's deadline (time.monotonic(); None: no limit)."""

    def __init__(self, cuda: bool, quick: bool, limit_s: float):
        self.cuda, self.quick = cuda, quick
        self.deadline = time.monotonic() + limit_s if limit_s > 0 else None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def ms(self, fn) -> float:
        """Milliseconds per call of fn after warm-up: do_bench's median on a GPU; on CPU (--smoke, whose
        times mean nothing) one call after one warm-up, since each interpreted call takes long."""
        if self.cuda:
            from triton.testing import do_bench

            warmup, rep = (10, 30) if self.quick else (25, 100)  # milliseconds of calls
            return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def fwd_bwd_timers(forward, inputs: list[torch.Tensor], grads: tuple[torch.Tensor, ...], clock: Clock) -> dict:
    """ms for forward, backward alone, and both, of `forward(*inputs)` (a tensor or a tuple of them)
    with the fixed output gradients `grads`. The inputs may be views (the ViT's q, k, v): the
    gradients are taken with respect to them, so no copy into a shared parent is timed."""

    def outputs() -> tuple[torch.Tensor, ...]:
        out = forward(*inputs)
        return out if isinstance(out, tuple) else (out,)

    fwd = clock.ms(lambda: forward(*inputs))
    both = clock.ms(lambda: torch.autograd.grad(outputs(), inputs, grads))
    outs = outputs()  # backward alone: keep the graph for repeated backward passes
    bwd = clock.ms(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def ceilings(device: str, clock: Clock, smoke: bool) -> dict[str, float]:
    n = (1 << 20) if smoke else (1 << 30)  # bytes copied
    src = torch.empty(n // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / (clock.ms(lambda: dst.copy_(src)) * 1e-3) / 1e9  # read + write
    m = 256 if smoke else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_tflops = 2 * m**3 / (clock.ms(lambda: a @ b) * 1e-3) / 1e12
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tflops}


def timed_rows(base: dict, impls: dict, inputs: list, grads: tuple, work: dict, unit: str, clock: Clock) -> list[dict]:
    """One row per implementation: ms, `unit` per second (work / time) and, for the others, the
    ratio ours / theirs in time. Our kernel is impls' first entry; an impl that raises is a row
    with its error, and the run goes on."""
    rows, ours = [], None
    for impl, fn in impls.items():
        row = {**base, "impl": impl}
        if clock.out_of_time():
            rows.append({**row, "skipped": "time limit"})
            continue
        try:
            ms = fwd_bwd_timers(fn, inputs, grads, clock)
        except Exception as e:  # noqa: BLE001 - a backend that does not run here, an OOM, a compile error
            rows.append({**row, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"})
            if clock.cuda:
                torch.cuda.empty_cache()
            continue
        row |= {f"{k}_ms": v for k, v in ms.items()} | {f"{k}_{unit}": work[k] / (v * 1e-3) / scale(unit)
                                                       for k, v in ms.items()}
        if ours is None:
            ours = ms
        else:
            row["ours_over_this"] = {k: ours[k] / ms[k] for k in KINDS}
        rows.append(row)
    return rows


def scale(unit: str) -> float:
    return {"GBps": 1e9, "TFLOPs": 1e12}[unit]


def bench_layer_norm(shapes, device: str, branch_dtype: torch.dtype, clock: Clock,
                     compile_backend: str = "inductor") -> list[dict]:
    """LayerNorm of the fp32 stream, and a block's residual add (fp32 stream + `branch_dtype` branch,
    as under autocast) fused with the LayerNorm after it, against the same PyTorch ops eager and
    compiled (torch.compile with `compile_backend`)."""
    from torch._functorch import config as functorch_config

    from triton_kernels import add_layer_norm, layer_norm

    ours = {"layer_norm": lambda x, w, b: layer_norm(x, w, b, EPS),
            "add_layer_norm": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)}
    # The model's PyTorch ops; the add is two kernels there, s written and read back (fp32 + bf16 -> fp32).
    eager = {"layer_norm": lambda x, w, b: torch_layer_norm(x, w, b, EPS),
             "add_layer_norm": lambda x, r, w, b: torch_add_layer_norm(x, r, w, b, EPS)}
    out = []
    # The backward-alone timing replays one graph's backward (retain_graph=True), which a compiled
    # backward with donated buffers refuses; donation saves memory, not time.
    with functorch_config.patch(donated_buffer=False):
        for name, rows, width in shapes:
            x = torch.randn(rows, width, device=device, requires_grad=True)  # the fp32 residual stream
            r = torch.randn(rows, width, device=device, dtype=branch_dtype, requires_grad=True)  # a branch's output
            w = (1 + 0.1 * torch.randn(width, device=device)).requires_grad_()
            b = (0.1 * torch.randn(width, device=device)).requires_grad_()
            xb, rb = x.element_size() * rows * width, r.element_size() * rows * width
            # Bytes a perfect kernel must move (weights, biases and per-row statistics are negligible):
            # LayerNorm: forward reads x, writes y; backward reads x, dy, writes dx.
            # Fused add: forward reads x, r, writes s, y; backward reads s, ds, dy, writes dx and dr
            # (one tensor when x and r share a dtype, both when r is the bf16 branch).
            moved = {"layer_norm": {"fwd": 2 * xb, "bwd": 3 * xb},
                     "add_layer_norm": {"fwd": 3 * xb + rb, "bwd": 4 * xb + (rb if r.dtype != x.dtype else 0)}}
            for op, inputs in (("layer_norm", [x, w, b]), ("add_layer_norm", [x, r, w, b])):
                work = moved[op] | {"fwd+bwd": moved[op]["fwd"] + moved[op]["bwd"]}
                impls = {"triton": ours[op], "torch": eager[op],
                         "torch-compile": torch.compile(eager[op], dynamic=False,  # fixed shapes, as training
                                                        backend=compile_backend)}
                outs = eager[op](*inputs)
                grads = tuple(torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,)))
                dtypes = f"x {str(x.dtype)[6:]}" + (f", r {str(r.dtype)[6:]}" if op == "add_layer_norm" else "")
                base = {"op": op, "shape": name, "rows": rows, "width": width, "dtypes": dtypes}
                out += timed_rows(base, impls, inputs, grads, work, "GBps", clock)
    return out


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def vit_qkv(B: int, H: int, N: int, D: int, device: str, dtype: torch.dtype):
    """q, k, v (B, H, N, D) as the ViT makes them, views of one (B, N, 3, H, D) projection output, and
    the upstream gradient as the ViT sends it: (B, N, H, D) memory seen as (B, H, N, D)."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dout = torch.randn(B, N, H, D, device=device, dtype=dtype).transpose(1, 2)
    return [q, k, v], dout


def bench_attention(shapes, device: str, dtype: torch.dtype, clock: Clock) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    from triton_kernels import attention

    out = []
    for name, B, H, N, D in shapes:
        inputs, dout = vit_qkv(B, H, N, D, device, dtype)
        flops = {"fwd": 4 * B * H * N * N * D}
        flops |= {"bwd": 2.5 * flops["fwd"], "fwd+bwd": 3.5 * flops["fwd"]}
        impls = {"triton": lambda q, k, v: attention(q, k, v)}
        for backend, enum in sdpa_backends().items():
            def run(q, k, v, enum=enum):
                with sdpa_kernel([enum]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls[f"sdpa-{backend}"] = run
        base = {"op": "attention", "shape": name, "B": B, "H": H, "N": N, "D": D, "layout": "vit"}
        out += timed_rows(base, impls, inputs, (dout,), flops, "TFLOPs", clock)
        del inputs, dout
        if clock.cuda:
            torch.cuda.empty_cache()
    return out


def print_table(rows: list[dict], unit: str) -> None:
    print(f"{'op':<16}{'shape':<12}{'impl':<16}{'fwd':>9}{'bwd':>9}{'fwd+bwd':>9}  {unit:<7}"
          f"{'ours/this in time:':>19}{'fwd':>7}{'bwd':>7}{'both':>7}")
    for r in rows:
        head = f"{r['op']:<16}{r['shape']:<12}{r['impl']:<16}"
        if "error" in r or "skipped" in r:
            print(f"{head}  not run: {r.get('error') or r['skipped']}")
            continue
        ratio = r.get("ours_over_this")
        print(head + "".join(f" {r[f'{k}_{unit}']:8.4g}" for k in KINDS) + " " * 28
              + ("".join(f" {ratio[k]:6.3g}" for k in KINDS) if ratio else ""))


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--quick", action="store_true", help="shorter timings (10 ms warm-up, 30 ms of calls)")
    number_flag(parser, "--time-limit", float, NON_NEGATIVE, default=0.0, metavar="SECONDS",
                help="cases not started by then are recorded as skipped (0: no limit)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="attention's dtype and the LayerNorm branch's (the autocast dtype)")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/kernels-<gpu>.json)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA GPU here: the kernel benchmark needs one (use --smoke to check the script on CPU)")
        return
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32  # the interpreter has no bf16
    clock = Clock(cuda, args.quick, args.time_limit)
    compile_backend = "inductor" if cuda else "aot_eager"  # --smoke: see the module's docstring
    import triton

    gpu = torch.cuda.get_device_name() if cuda else f"cpu-interpreter-{platform.machine()}"
    info = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(REPO), "dtype": str(dtype).removeprefix("torch."),
            "layout": "vit: q, k, v views of (B, N, 3, H, D); dO (B, N, H, D) seen as (B, H, N, D)",
            "ratio": "ours_over_this: our time / this implementation's time (< 1: ours faster)",
            "timing": ("triton.testing.do_bench median" + (" (quick)" if args.quick else "")) if cuda
            else "perf_counter, one call after one warm-up (smoke)", "compile_backend": compile_backend}
    print(" ".join(f"{k}={v}" for k, v in info.items() if k not in ("layout", "ratio")))
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    out = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {**info, "complete": False}

    def write() -> None:  # after each table: a run stopped early keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    result["ceilings"] = ceilings(device, clock, args.smoke)
    print(f"ceilings: copy {result['ceilings']['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {result['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    write()
    result["attention"] = bench_attention(SMOKE_ATTENTION if args.smoke else ATTENTION_SHAPES, device, dtype, clock)
    print_table(result["attention"], "TFLOPs")
    write()
    result["layer_norm"] = bench_layer_norm(SMOKE_LAYER_NORM if args.smoke else LAYER_NORM_SHAPES, device, dtype,
                                            clock, compile_backend)
    print_table(result["layer_norm"], "GBps")
    result["complete"] = not any("skipped" in r for r in result["attention"] + result["layer_norm"])
    write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
