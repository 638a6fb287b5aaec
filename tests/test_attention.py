"""The Triton attention kernel (triton_kernels/attention.py) against its PyTorch definition.

Runs on a CUDA GPU when there is one, else on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported). Interpreter runs are slow, so
the cases are a representative set (ViT lengths, tails, padded head dims, layouts), not a product.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the attention kernel needs it")

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the kernel cannot run here",
                allow_module_level=True)

attn = importlib.import_module("triton_kernels.attention")  # the module (the package exports the function)
from triton_kernels.attention import (FlashAttention, attention, attention_fwd,  # noqa: E402
                                      attention_ref, attention_supported)

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
    for name, t in zip(names, tensors):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"


def assert_close_fp32(got, want, tol=2e-5, names=("out", "dq", "dk", "dv")):
    """max |got - want| <= tol * max(1, max |want|): fp32 IEEE kernels agree to a few ulps of the data."""
    for name, a, b in zip(names, got, want):
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
    (1, 2, 50, 50, 80, None, "vit"),
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
    assert got[0].is_contiguous()
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
    for name, a, t, w in zip(("out", "dq", "dk", "dv"), got, torch_same_dtype, want):
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
    assert_close_fp32(got, run(attention_ref, q, k, v, g), tol=1e-4)


@pytest.mark.skipif(CUDA, reason="on GPU the GPU launch configurations run in every test")
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.float16), (96, torch.float32)],
                         ids=["fp16-d64", "fp16-d128", "fp32-d96"])
def test_gpu_block_shapes_under_interpreter(monkeypatch, d, dtype):
    """The GPU tile sizes (128 x 64 forward, 128/64-row held blocks in the backward, fp32 tiles) give
    the same numbers as the interpreter's: checks the launch shapes, not the compiler."""
    monkeypatch.setattr(attn, "_interpreting", lambda: False)
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
    assert_close_fp32(got, want, tol=1e-2)


@gpu
@pytest.mark.gpu
def test_gpu_backward_deterministic():
    q, k, v = make_qkv(2, 12, 197, 197, 64, "vit", dtype=torch.bfloat16)
    g = make_grad(2, 12, 197, 64, "vit", dtype=torch.bfloat16)
    a, b = run(attention, q, k, v, g), run(attention, q, k, v, g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
