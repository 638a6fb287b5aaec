"""Benchmark our Triton kernels against PyTorch on a GPU; print a table, write a JSON file.

    python scripts/bench_kernels.py                 # GPU: writes benchmarks/results/kernels-<gpu>.json
    python scripts/bench_kernels.py --smoke         # tiny shapes on CPU through Triton's interpreter:
                                                    # checks the script runs, measures nothing meaningful

LayerNorm in GB/s (forward, backward, both) against `torch.nn.functional.layer_norm`, and the
residual add fused with it against `x + r` then `layer_norm`; attention
in TFLOP/s (4·B·H·N²·D forward, 2.5× that backward) against every `scaled_dot_product_attention`
backend that runs; the device's copy bandwidth and a large bf16 matmul as ceilings. Every figure
of one table comes from the same process, so they compare as ratios on a shared, noisy machine.
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

from mpp.config import Parser
from mpp.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
# ViT-Ti/S/B at 224 px: N = 197 tokens, head dim 64; then longer sequences (384 px and beyond).
ATTENTION_SHAPES = [  # (name, B, H, N, D)
    ("Ti/16 224px", 256, 3, 197, 64), ("S/16 224px", 256, 6, 197, 64), ("B/16 224px", 256, 12, 197, 64),
    ("B/16 384px", 64, 12, 577, 64), ("B N=1024", 32, 12, 1024, 64),
]
LAYER_NORM_SHAPES = [("Ti", 256 * 197, 192), ("S", 256 * 197, 384), ("B", 256 * 197, 768),
                     ("L", 256 * 197, 1024), ("H", 256 * 257, 1280)]  # (name, rows, width)
SMOKE_ATTENTION = [("smoke", 1, 2, 65, 32)]
SMOKE_LAYER_NORM = [("smoke", 65, 192)]


def bench_ms(fn, cuda: bool) -> float:
    """Median milliseconds per call of fn, after warm-up."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def fwd_bwd_timers(forward, inputs: list[torch.Tensor], cuda: bool) -> dict[str, float]:
    """ms for forward, backward alone, and both, of `forward(*inputs)` (a tensor or a tuple of them)
    with fixed output gradients."""

    def outputs() -> tuple[torch.Tensor, ...]:
        out = forward(*inputs)
        return out if isinstance(out, tuple) else (out,)

    grads = tuple(torch.randn_like(o) for o in outputs())
    fwd = bench_ms(lambda: forward(*inputs), cuda)
    both = bench_ms(lambda: torch.autograd.grad(outputs(), inputs, grads), cuda)
    outs = outputs()  # backward alone: keep the graph for repeated backward passes
    bwd = bench_ms(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True), cuda)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def ceilings(device: str, cuda: bool, smoke: bool) -> dict[str, float]:
    n = (1 << 20) if smoke else (1 << 30)  # bytes copied
    src = torch.empty(n // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_gbs = 2 * n / (bench_ms(lambda: dst.copy_(src), cuda) * 1e-3) / 1e9  # read + write
    m = 256 if smoke else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_tflops = 2 * m**3 / (bench_ms(lambda: a @ b, cuda) * 1e-3) / 1e12
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tflops}


def torch_add_layer_norm(x, r, w, b, eps):
    s = x + r  # what the model's PyTorch path does: two kernels, s written and read back
    return s, F.layer_norm(s, s.shape[-1:], w, b, eps)


def bench_layer_norm(shapes, device: str, dtype: torch.dtype, cuda: bool) -> list[dict]:
    """LayerNorm, and a block's residual add fused with the LayerNorm after it (`add_layer_norm`)
    against the same two steps in PyTorch (x + r, then F.layer_norm)."""
    from triton_kernels.layer_norm import add_layer_norm, layer_norm

    rows_out = []
    for name, rows, width in shapes:
        x, r = (torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.randn(width, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(width, device=device, dtype=dtype, requires_grad=True)
        # Bytes a perfect kernel must move (weights, biases and per-row statistics are negligible):
        # LayerNorm: forward reads x, writes y; backward reads x, dy, writes dx.
        # Fused add: forward reads x, r, writes s, y; backward reads s, dy, ds, writes one dx = dr.
        unit = rows * width * x.element_size()
        cases = {
            "layer_norm": ([x, w, b], {"fwd": 2 * unit, "bwd": 3 * unit, "fwd+bwd": 5 * unit}, {
                "triton": lambda x, w, b: layer_norm(x, w, b, 1e-6),
                "torch": lambda x, w, b: F.layer_norm(x, (width,), w, b, 1e-6)}),
            "add_layer_norm": ([x, r, w, b], {"fwd": 4 * unit, "bwd": 4 * unit, "fwd+bwd": 8 * unit}, {
                "triton": lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-6),
                "torch": lambda x, r, w, b: torch_add_layer_norm(x, r, w, b, 1e-6)}),
        }
        for op, (inputs, moved, impls) in cases.items():
            for impl, fn in impls.items():
                ms = fwd_bwd_timers(fn, inputs, cuda)
                rows_out.append({"op": op, "shape": name, "rows": rows, "width": width, "impl": impl,
                                 **{f"{k}_ms": v for k, v in ms.items()},
                                 **{f"{k}_GBps": moved[k] / (v * 1e-3) / 1e9 for k, v in ms.items()}})
    return rows_out


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def bench_attention(shapes, device: str, dtype: torch.dtype, cuda: bool) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    from triton_kernels.attention import attention

    rows_out = []
    for name, B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        flops = {"fwd": 4 * B * H * N * N * D}
        flops |= {"bwd": 2.5 * flops["fwd"], "fwd+bwd": 3.5 * flops["fwd"]}
        impls = {"triton": lambda q, k, v: attention(q, k, v)}
        for backend, enum in sdpa_backends().items():
            def run(q, k, v, enum=enum):
                with sdpa_kernel([enum]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls[f"sdpa-{backend}"] = run
        for impl, fn in impls.items():
            try:
                ms = fwd_bwd_timers(fn, [q, k, v], cuda)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that does not run here
                rows_out.append({"op": "attention", "shape": name, "impl": impl, "error": str(e).splitlines()[0][:160]})
                if cuda:
                    torch.cuda.empty_cache()
                continue
            rows_out.append({"op": "attention", "shape": name, "B": B, "H": H, "N": N, "D": D, "impl": impl,
                             **{f"{k}_ms": v for k, v in ms.items()},
                             **{f"{k}_TFLOPs": flops[k] / (v * 1e-3) / 1e12 for k, v in ms.items()}})
    return rows_out


def print_table(rows: list[dict], unit: str) -> None:
    print(f"{'op':<16}{'shape':<13}{'impl':<16}{'fwd':>9}{'bwd':>9}{'fwd+bwd':>9}  {unit}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<16}{r['shape']:<13}{r['impl']:<16}  not run: {r['error']}")
        else:
            print(f"{r['op']:<16}{r['shape']:<13}{r['impl']:<16}"
                  + "".join(f"{r[f'{k}_{unit}']:9.1f}" for k in ("fwd", "bwd", "fwd+bwd")))


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
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
    dtype = getattr(torch, args.dtype) if cuda else torch.float32  # the interpreter runs fp32 best
    import triton

    gpu = torch.cuda.get_device_name() if cuda else f"cpu-interpreter-{platform.machine()}"
    info = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(REPO), "dtype": str(dtype).removeprefix("torch."),
            "timing": "triton.testing.do_bench median" if cuda else "perf_counter median of 3 (smoke)"}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    ceiling = ceilings(device, cuda, args.smoke)
    print(f"ceilings: copy {ceiling['copy_GBps']:.0f} GB/s, bf16 matmul {ceiling['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    ln = bench_layer_norm(SMOKE_LAYER_NORM if args.smoke else LAYER_NORM_SHAPES, device, dtype, cuda)
    print_table(ln, "GBps")
    attn = bench_attention(SMOKE_ATTENTION if args.smoke else ATTENTION_SHAPES, device, dtype, cuda)
    print_table(attn, "TFLOPs")

    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    out = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "ceilings": ceiling, "layer_norm": ln, "attention": attn}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
