"""The Triton attention kernel (triton_kernels/attention.py) against its PyTorch definition.

Runs on a CUDA GPU when there is one, else on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported). Interpreter runs are slow, so
the cases are a representative set (ViT lengths, tails, padded head dims, layouts), not a product.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the attention kernel needs it")

from helpers.kernel_modules import FlashAttention

from triton_kernels.attention import (
    attention,
    attention_fwd,
    attention_ref,
    attention_supported,
)

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the kernel cannot run here",
                allow_module_level=True)

attn = importlib.import_module("triton_kernels.attention")  # the module (the package exports the function)
REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make_qkv(B, H, n_q, n_k, d, layout, dtype=torch.float32, gen=None):
    """q, k, v [B, H, N, D] in fp32 (cast later), laid out as the ViT or a test asks."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE)

    if layout == "vit":  # the ViT's qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        assert n_q == n_k
        return rand(B, n_q, 3, H, d).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "strided_d":  # head-dim stride != 1
        return [rand(B, H, d, n).to(dtype).transpose(-1, -2) for n in (n_q, n_k, n_k)]
    assert layout == "contiguous"
    return [rand(B, H, n, d).to(dtype) for n in (n_q, n_k, n_k)]


def make_grad(B, H, n_q, d, layout, dtype=torch.float32, gen=None):
    """dO; for the ViT layout as it arrives there: the gradient of out.transpose(1, 2).reshape(B, N, C)."""
    if layout == "vit":
        return torch.randn(B, n_q, H, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(B, H, n_q, d, generator=gen).to(DEVICE, dtype)


def run(fn, q, k, v, g):
    """[out, dq, dk, dv] of fn(q, k, v) with upstream gradient g."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


def assert_finite(tensors, names=("out", "dq", "dk", "dv")):
    for name, t in zip(names, tensors, strict=True):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"


def assert_close_fp32(got, want, tol=2e-5, names=("out", "dq", "dk", "dv")):
    """max |got - want| <= tol * max(1, max |want|): fp32 IEEE kernels agree to a few ulps of the data."""
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        err, mag = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
        assert err <= tol * mag, f"{name}: max error {err:.3g} > {tol * mag:.3g}"


# (B, H, Nq, Nk, D, scale, layout): ViT lengths with tails, N = 1, padded head dims (8, 48, 80, 96),
# non-default scales, the ViT's permuted views, a head-dim stride != 1 and Nq != Nk.
FP32_CASES = [
    (1, 1, 1, 1, 32, None, "vit"),
    (1, 2, 3, 3, 64, None, "vit"),
    (2, 1, 17, 17, 128, None, "vit"),
    (1, 2, 50, 50, 32, None, "vit"),
    (2, 2, 65, 65, 64, 0.3, "vit"),
    (1, 2, 197, 197, 64, None, "vit"),
    (1, 1, 197, 197, 128, None, "contiguous"),
    (1, 1, 257, 257, 32, 1.0, "vit"),
    (1, 1, 577, 577, 64, None, "vit"),
    (1, 1, 65, 65, 48, None, "vit"),
    (1, 2, 50, 50, 80, None, "vit"),  # ViT-H/14's head dim: BLOCK_D 128, lanes 80..127 masked
    (1, 1, 3, 3, 8, None, "contiguous"),
    (2, 3, 1, 65, 64, None, "contiguous"),  # the class token's query alone (ViT.forward's last block)
    (1, 2, 33, 65, 32, None, "contiguous"),  # some queries (MPP's corrupted patches) over all keys
    (1, 1, 17, 17, 16, 0.7, "strided_d"),
    (1, 1, 17, 65, 64, None, "contiguous"),
    (1, 2, 65, 33, 96, 0.05, "strided_d"),
]


@pytest.mark.parametrize("B,H,n_q,n_k,d,scale,layout", FP32_CASES)
def test_fp32_matches_reference(B, H, n_q, n_k, d, scale, layout):
    gen = torch.Generator().manual_seed(n_q * 1000 + n_k * 10 + d)
    q, k, v = make_qkv(B, H, n_q, n_k, d, layout, gen=gen)
    assert attention_supported(q, k, v) is None
    g = make_grad(B, H, n_q, d, layout, gen=gen)
    got = run(lambda *a: attention(*a, scale=scale), q, k, v, g)
    want = run(lambda *a: attention_ref(*a, scale=scale), q, k, v, g)
    assert got[0].transpose(1, 2).is_contiguous()  # (B, Nq, H, D) memory order
    assert_finite(got)
    assert_close_fp32(got, want)


@pytest.mark.parametrize("n,d", [(1, 32), (50, 64), (197, 80)])
def test_lse_and_module(n, d):
    """The saved LSE is the natural-log logsumexp of the scaled scores; FlashAttention == attention."""
    q, k, v = make_qkv(2, 2, n, n, d, "vit", gen=torch.Generator().manual_seed(n))
    out, lse = attention_fwd(q, k, v, 0.2)
    want = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.2, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(FlashAttention(scale=0.2)(q, k, v), out, atol=0, rtol=0)


def test_expanded_grad_and_partial_requires_grad():
    """out.sum().backward() sends a stride-0 dO; only k needing a gradient still works."""
    q, k, v = make_qkv(1, 2, 33, 33, 32, "vit", gen=torch.Generator().manual_seed(6))
    k_ref, k_ker = k.detach().requires_grad_(), k.detach().requires_grad_()
    attention(q, k_ker, v).sum().backward()
    attention_ref(q, k_ref, v).sum().backward()
    assert_close_fp32([k_ker.grad], [k_ref.grad], names=("dk",))


def _half_check(B, H, n, d, dtype, layout="vit", q_mult=1.0):
    """Kernel error vs the fp32 reference <= 2 x PyTorch's own same-dtype error (SDPA) + one ulp."""
    if dtype == torch.bfloat16 and INTERPRETING:
        pytest.skip("the Triton interpreter cannot compute in bfloat16 (bf16 scalars and dots are wrong "
                    "or raise there); bf16 runs on GPU")
    gen = torch.Generator().manual_seed(n * 7 + d)
    q, k, v = make_qkv(B, H, n, n, d, layout, dtype=dtype, gen=gen)  # ViT layout kept in `dtype`
    if q_mult != 1.0:
        q, k = q * q_mult, k * q_mult
    g = make_grad(B, H, n, d, layout, dtype=dtype, gen=gen)
    h = (q, k, v, g)
    want = run(attention_ref, *(x.float() for x in h))  # fp32 reference on the same rounded inputs
    got = run(attention, *h)
    torch_same_dtype = run(F.scaled_dot_product_attention, *h)
    assert_finite(got)
    for name, a, t, w in zip(("out", "dq", "dk", "dv"), got, torch_same_dtype, want, strict=True):
        assert a.dtype == dtype
        mag = max(1.0, w.abs().max().item())
        err = (a.float() - w).abs().max().item()
        bound = 2 * (t.float() - w).abs().max().item() + torch.finfo(dtype).eps * mag
        assert err <= bound, f"{dtype} {name}: error {err:.3g} > {bound:.3g} (2 x PyTorch's + 1 ulp)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,H,n,d", [(1, 2, 17, 64), (1, 2, 197, 64), (1, 1, 197, 128), (2, 1, 65, 48)])
def test_half_precision_error_bound(B, H, n, d, dtype):
    _half_check(B, H, n, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_scores_stay_finite(dtype):
    """Scores ~ +-50 (q, k ~ 7 * N(0, 1)): the online softmax must neither overflow nor lose the row."""
    if dtype == torch.float16:
        _half_check(1, 2, 65, 64, dtype, q_mult=7.0)
        return
    q, k, v = make_qkv(1, 2, 65, 65, 64, "vit", gen=torch.Generator().manual_seed(3))
    q, k = q * 7, k * 7
    g = make_grad(1, 2, 65, 64, "vit", gen=torch.Generator().manual_seed(4))
    got = run(attention, q, k, v, g)
    assert_finite(got)
    assert_close_fp32(got, run(attention_ref, q, k, v, g), tol=1e-4)


def test_all_scores_very_negative():
    """Every score ~ -7000 (LSE too) with a key tail: the backward's pad keys must weigh 0, not
    exp(0 - LSE) = inf (which would turn dq into NaN)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 1, 17, 17, 64, "contiguous", gen=gen)
    q, k = q + 30.0, k - 30.0
    g = make_grad(1, 1, 17, 64, "contiguous", gen=gen)
    got = run(attention, q, k, v, g)
    assert_finite(got)
    # The backward rebuilds P = exp(s - LSE) from the fp32 LSE the forward saved; at |LSE| ~ 7000 that
    # LSE is known only to about one ulp, |s| * 2^-23 (~1e-3), and every P of the row, so dv = P^T dO,
    # carries that relative error (PyTorch keeps P itself). Twice that bound: still far below what a
    # wrongly weighted key would cost.
    s_max = (q @ k.transpose(-2, -1)).abs().max().item() * q.shape[-1] ** -0.5  # ~7200
    assert_close_fp32(got, run(attention_ref, q, k, v, g), tol=max(1e-4, 2 * s_max * 2.0 ** -23))


@pytest.mark.skipif(CUDA, reason="on GPU the GPU launch configurations run in every test")
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.float16), (96, torch.float32)],
                         ids=["fp16-d64", "fp16-d128", "fp32-d96"])
def test_gpu_block_shapes_under_interpreter(monkeypatch, d, dtype):
    """The GPU tile sizes (128 x 64 forward, 128/64-row held blocks in the backward, fp32 tiles) give
    the same numbers as the interpreter's: checks the launch shapes, not the compiler."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    assert attn._configs(64, torch.float16)["fwd"]["BLOCK_M"] == 128  # the GPU table is in use
    gen = torch.Generator().manual_seed(d)
    q, k, v = make_qkv(1, 1, 197, 197, d, "vit", dtype=dtype, gen=gen)
    g = make_grad(1, 1, 197, d, "vit", dtype=dtype, gen=gen)
    got = run(attention, q, k, v, g)
    monkeypatch.undo()
    want = run(attention, q, k, v, g)
    assert_finite(got)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert_close_fp32(got, want, tol=tol)


def test_supported_reasons(monkeypatch):
    q, k, v = make_qkv(1, 2, 17, 17, 64, "vit")
    assert attention_supported(q, k, v) is None
    assert "dtype" in attention_supported(q.double(), k.double(), v.double())
    assert "dtype" in attention_supported(q, k.half(), v)
    big = torch.zeros(1, 2, 17, 256, device=DEVICE)
    assert "head dim 256" in attention_supported(big, big, big)
    assert "mismatched shapes" in attention_supported(q, k[:, :, :5], v)
    assert "mismatched shapes" in attention_supported(q, k, v[:, :1])
    assert "4-D" in attention_supported(q[0], k[0], v[0])
    if INTERPRETING:
        b = [x.bfloat16() for x in (q, k, v)]
        assert "interpreter" in attention_supported(*b)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = [x.cpu() for x in (q, k, v)]
    assert "cpu tensors" in attention_supported(*c)


def test_output_is_bnhd_so_merging_heads_is_a_view():
    """out is [B, H, N, D] over a (B, N, H, D) buffer: the ViT's head merge costs no copy."""
    B, H, n, d = 2, 3, 17, 32
    q, k, v = make_qkv(B, H, n, n, d, "vit", gen=torch.Generator().manual_seed(11))
    out = attention(q, k, v)
    assert out.shape == (B, H, n, d)
    assert out.transpose(1, 2).is_contiguous() and not out.is_contiguous()
    merged = out.transpose(1, 2).reshape(B, n, H * d)
    assert merged.data_ptr() == out.data_ptr()  # a view of out's storage, no copy
    assert merged.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    torch.testing.assert_close(merged, attention_ref(q, k, v).transpose(1, 2).reshape(B, n, H * d),
                               atol=2e-5, rtol=2e-5)


def test_ops_pass_opcheck():
    """Schema, fake impl (shapes, dtypes and the BNHD output strides) and autograd registration."""
    q, k, v = make_qkv(1, 2, 17, 33, 16, "contiguous", gen=torch.Generator().manual_seed(12))
    torch.library.opcheck(torch.ops.mpp_kernels.attention_fwd.default, (q, k, v, 0.25))
    out, lse = attention_fwd(q, k, v, 0.25)
    g = make_grad(1, 2, 17, 16, "vit", gen=torch.Generator().manual_seed(13))  # strided dO
    torch.library.opcheck(torch.ops.mpp_kernels.attention_bwd.default, (g, q, k, v, out, lse, 0.25))


def test_torch_compile_aot_eager_matches_eager():
    """Dynamo + AOTAutograd trace the op and its registered backward with fullgraph=True (fake
    tensors only, the kernels then run eagerly: works under the interpreter); the compiled output
    has the eager output's (B, N, H, D) strides."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 33, 33, 32, "vit", gen=torch.Generator().manual_seed(14))
    g = make_grad(1, 2, 33, 32, "vit", gen=torch.Generator().manual_seed(15))

    def f(q, k, v):
        return attention(q, k, v) * 2.0

    got = run(torch.compile(f, backend="aot_eager", fullgraph=True), q, k, v, g)
    want = run(f, q, k, v, g)
    assert got[0].stride() == want[0].stride()
    assert_close_fp32(got, want, tol=0)


@pytest.mark.parametrize("make", [lambda: torch.zeros(2, 3), lambda: torch.zeros(2, 3, device="meta")],
                         ids=["cpu", "meta"])
def test_launch_device_is_a_null_context_off_cuda(make):
    from triton_kernels._launch import launch_device as _launch_device

    ctx = _launch_device(make())
    assert not isinstance(ctx, torch.cuda.device)
    with ctx:  # enters and exits without touching CUDA
        pass


def test_launch_device_skips_fake_cuda_tensors(monkeypatch):
    """torch.compile's fake CUDA tensors get no torch.cuda.device: tracing must not call CUDA (this
    machine may have none). Functional tensors over fakes: see the triton_op test below."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from triton_kernels._launch import launch_device as _launch_device

    def no_cuda(*args):
        raise AssertionError("torch.cuda.device called for a fake tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda")
        with _launch_device(fake):
            pass


@gpu
@pytest.mark.gpu
def test_launch_device_guards_real_cuda_tensors():
    from triton_kernels._launch import launch_device as _launch_device

    assert isinstance(_launch_device(torch.zeros(1, device="cuda")), torch.cuda.device)


# The compiled-Triton ops (triton_ops, not the interpreter's custom ops), traced with fake CUDA
# tensors: the path torch.compile takes, which runs here without a GPU. A subprocess: Triton's
# mode is fixed when the kernels are defined, and this process interprets.
_TRITON_OP_FAKE = r"""
import json, torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._library.triton import get_triton_kernels_for_op
import triton_kernels.layer_norm  # registers the LayerNorm ops
from triton_kernels.attention import attention_bwd, attention_fwd

def no_cuda(*args):
    raise AssertionError("torch.cuda.device called while tracing")

torch.cuda.device = no_cuda
with FakeTensorMode():
    q, k, v = torch.empty(2, 197, 3, 3, 64, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    out, lse = attention_fwd(q, k, v, 0.125)
    dq, dk, dv = attention_bwd(out, q, k, v, out, lse, 0.125)
    x = torch.empty(394, 768, device="cuda", dtype=torch.bfloat16)
    y, _, _ = torch.ops.mpp_kernels.layer_norm_fwd(x, x[0], x[0], 1e-6)
    # AOTAutograd (what torch.compile runs before Inductor) decomposes the triton_op into its body
    graphs = []
    traced = aot_function(lambda q, k, v: attention_fwd(q, k, v, 0.125)[0] * 2,
                          fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)(q, k, v)
kernels = {op: [k.fn.__name__ for k in get_triton_kernels_for_op("mpp_kernels::" + op)]
           for op in ("attention_fwd", "attention_bwd", "layer_norm_fwd", "layer_norm_bwd")}
print(json.dumps({"op_type": type(attention_fwd).__name__, "out": [list(out.shape), list(out.stride())],
                  "lse": list(lse.stride()), "dq": list(dq.stride()), "ln": list(y.stride()),
                  "aot": list(traced.stride()), "aot_kernel": "triton_kernel_wrapper_functional" in graphs[0],
                  "kernels": kernels}))
"""


def test_triton_op_fake_path_without_cuda_calls():
    """The triton_op's body as its own fake impl on fake CUDA tensors: BNHD output strides, no CUDA
    call (the device guard skips fakes), also when AOTAutograd decomposes the op into its kernel
    launch (functional tensors), and torch finds every kernel of each op in the source.
    (Not the LayerNorm backward: its program count reads the real GPU's SM count, which the graph
    Inductor traces from that body needs.)"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _TRITON_OP_FAKE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    B, H, n, d = 2, 3, 197, 64
    assert got["op_type"] == "CustomOpDef"
    assert got["out"] == [[B, H, n, d], [n * H * d, d, H * d, 1]]
    assert got["lse"] == [H * n, n, 1] and got["dq"] == [H * n * d, n * d, d, 1]
    assert got["ln"] == [768, 1]
    assert got["aot_kernel"] and got["aot"] == got["out"][1]  # traced into the kernel, same strides
    assert got["kernels"] == {
        "attention_fwd": ["_attn_fwd_kernel"],
        "attention_bwd": ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"],
        "layer_norm_fwd": ["_layer_norm_fwd_kernel"],
        "layer_norm_bwd": ["_layer_norm_bwd_kernel"],
    }


# ---- the package: lazy imports, and the function/submodule name clash ----

def test_package_import_does_not_import_triton():
    code = ("import sys, triton_kernels; "
            "bad = [m for m in ('triton', 'triton_kernels.gate', 'triton_kernels.attention') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def test_package_exports_functions_not_submodules():
    """`from triton_kernels import attention` is the function even after `import
    triton_kernels.attention` (which binds submodules as package attributes); import_module gives
    the module. In a subprocess: here the submodules are imported already."""
    code = """
import importlib, types, triton_kernels
import triton_kernels.attention, triton_kernels.layer_norm
from triton_kernels import attention, layer_norm, add_layer_norm_ref
assert callable(attention) and not isinstance(attention, types.ModuleType), attention
assert callable(layer_norm) and not isinstance(layer_norm, types.ModuleType), layer_norm
mod = importlib.import_module("triton_kernels.attention")
assert isinstance(mod, types.ModuleType) and mod.attention is attention
assert importlib.import_module("triton_kernels.layer_norm").layer_norm is layer_norm
assert sorted(triton_kernels.__all__) == sorted(triton_kernels._EXPORTS)
assert set(triton_kernels.__all__) <= set(dir(triton_kernels))
try:
    triton_kernels.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("no AttributeError")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    import triton_kernels  # and in this process, where the test module imported the submodule first

    assert triton_kernels.attention is attention
    assert importlib.import_module("triton_kernels.attention") is attn


# ---- GPU only -----------------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [197, 577])
def test_gpu_real_sizes(n, dtype):
    _half_check(8, 12, n, 64, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 128])
def test_gpu_bf16_head_dims(d):
    _half_check(4, 6, 197, d, torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(2, 4, 197, 197, 64, "vit", dtype=torch.bfloat16)
    g = make_grad(2, 4, 197, 64, "vit", dtype=torch.bfloat16)

    def f(q, k, v):
        return attention(q, k, v) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    got, want = run(compiled, q, k, v, g), run(f, q, k, v, g)
    assert got[0].stride() == want[0].stride()  # Inductor keeps the op's (B, N, H, D) output layout
    assert_close_fp32(got, want, tol=1e-2)


@gpu
@pytest.mark.gpu
def test_gpu_backward_deterministic():
    q, k, v = make_qkv(2, 12, 197, 197, 64, "vit", dtype=torch.bfloat16)
    g = make_grad(2, 12, 197, 64, "vit", dtype=torch.bfloat16)
    a, b = run(attention, q, k, v, g), run(attention, q, k, v, g)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device_without_set_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches must run on cuda:1."""
    assert torch.cuda.current_device() == 0
    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, 197, 3, 4, 64, generator=gen).to("cuda:1", torch.bfloat16)
               .permute(2, 0, 3, 1, 4).unbind(0))
    g = torch.randn(2, 197, 4, 64, generator=gen).to("cuda:1", torch.bfloat16).transpose(1, 2)
    got = run(attention, q, k, v, g)
    want = run(attention_ref, *(x.float() for x in (q, k, v, g)))
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert_close_fp32([t.float() for t in got], want, tol=3e-2)
