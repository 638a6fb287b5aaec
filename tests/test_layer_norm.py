"""Fused Triton LayerNorm (triton_kernels/layer_norm.py) against its PyTorch reference.

On a machine without CUDA the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported); row counts stay small because every program
is interpreted in Python. With CUDA the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from helpers.kernel_modules import LayerNorm

from triton_kernels.gate import MAX_WIDTH
from triton_kernels.layer_norm import (
    add_layer_norm,
    add_layer_norm_ref,
    add_layer_norm_supported,
    layer_norm,
    layer_norm_ref,
    layer_norm_supported,
)

device = "cuda" if torch.cuda.is_available() else "cpu"
_why_not = layer_norm_supported(torch.zeros(1, 8, device=device), torch.ones(8, device=device),
                                torch.zeros(8, device=device))
if _why_not is not None:
    pytest.skip(f"Triton LayerNorm cannot run here: {_why_not}", allow_module_level=True)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(shape, dtype=torch.float32, param_dtype=None, seed=0):
    """x, weight, bias, dy: generated in fp32 (non-zero mean, non-unit scale), then cast."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = 1 + 0.5 * torch.randn(d, generator=g)
    b = 0.5 * torch.randn(d, generator=g)
    dy = torch.randn(shape, generator=g)
    param_dtype = param_dtype or dtype
    return (x.to(device, dtype), w.to(device, param_dtype), b.to(device, param_dtype), dy.to(device, dtype))


def forward_backward(fn, x, w, b, dy, eps=1e-6):
    """fn's output and (dx, dweight, dbias) for upstream gradient dy, on fresh leaves."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, eps)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), dy))


def max_err(a, ref):
    return (a.float() - ref.float()).abs().max().item()


def assert_close_scaled(out, ref, tol, what=""):
    """max |out - ref| <= tol * max(1, max |ref|): relative to the tensor's scale, absolute near 0."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    bound = tol * max(1.0, ref.float().abs().max().item())
    assert max_err(out, ref) <= bound, f"{what}: max error {max_err(out, ref):.3g} > {bound:.3g}"


NAMES = ("y", "dx", "dweight", "dbias")


@pytest.mark.parametrize("width", [192, 384, 768, 1000, 1280, 37])
@pytest.mark.parametrize("rows", [1, 7, 197])
def test_fp32_matches_reference(width, rows):
    args = make_inputs((rows, width))
    got = forward_backward(layer_norm, *args)
    ref = forward_backward(layer_norm_ref, *args)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float32, name
        assert_close_scaled(g, r, 1e-5, name)


@pytest.mark.parametrize("shape", [(2, 197, 384), (2, 197, 1000), (3, 1, 5, 40)])
def test_fp32_batched_shapes(shape):
    args = make_inputs(shape, seed=1)
    got = forward_backward(layer_norm, *args)
    ref = forward_backward(layer_norm_ref, *args)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(g, r, 1e-5, name)


@pytest.mark.parametrize("width", [1, 2, 16384, MAX_WIDTH])
def test_edge_widths(width):
    args = make_inputs((3, width), seed=2)
    got = forward_backward(layer_norm, *args)
    ref = forward_backward(layer_norm_ref, *args)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(g, r, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [37, 768, 1000, 1280])
def test_low_precision_within_twice_torch_error(dtype, width):
    """Error against the fp32 reference (on the same rounded inputs) is at most twice that of
    PyTorch's own LayerNorm in the same dtype, plus about one ulp at the tensor's scale.
    (The interpreter rounds fp32 -> bf16 toward zero, up to 1 ulp, where a GPU rounds to nearest,
    1/2 ulp: under TRITON_INTERPRET=1 the bf16 output passes through the one-ulp allowance.)"""
    args = make_inputs((37, width), dtype=dtype, seed=3)
    got = forward_backward(layer_norm, *args)
    ours_torch = forward_backward(lambda x, w, b, eps: F.layer_norm(x, (width,), w, b, eps), *args)
    ref = forward_backward(layer_norm_ref, *(t.float() for t in args))
    for name, g, t, r in zip(NAMES, got, ours_torch, ref, strict=True):
        assert g.dtype == dtype, name
        atol = torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        assert max_err(g, r) <= 2 * max_err(t, r) + atol, (
            f"{name}: kernel error {max_err(g, r):.3g}, torch {dtype} error {max_err(t, r):.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_fp32_params(dtype):
    args = make_inputs((7, 1000), dtype=dtype, param_dtype=torch.float32, seed=4)
    y, dx, dw, db = forward_backward(layer_norm, *args)
    assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, torch.float32, torch.float32)
    ref = forward_backward(layer_norm_ref, *(t.float() for t in args))
    for name, g, r in zip(NAMES, (y, dx, dw, db), ref, strict=True):
        assert_close_scaled(g, r, 2 * torch.finfo(dtype).eps, name)


@pytest.mark.parametrize("rows", [1023, 1500] + ([20000] if torch.cuda.is_available() else []))
def test_weight_bias_reduction_is_correct_and_deterministic(rows):
    """Many rows per backward program (4 programs under the interpreter), a last chunk shorter
    than the others, and a fixed-order sum: two backward passes agree bitwise."""
    x, w, b, dy = make_inputs((rows, 37), seed=5)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = layer_norm(x, w, b)
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b), dy)
    for name, g1, g2 in zip(NAMES[1:], first, second, strict=True):
        assert torch.equal(g1, g2), f"{name} differs between two identical backward passes"
    ref = forward_backward(layer_norm_ref, x, w, b, dy)
    for name, g, r in zip(NAMES[1:], first, ref[1:], strict=True):
        assert_close_scaled(g, r, 1e-5, name)


def test_non_contiguous_input_and_broadcast_gradient():
    """x a transposed view; dy from .sum() is an expanded (stride-0) tensor."""
    x, w, b, _ = make_inputs((40, 6), seed=6)
    x = x.t()  # [6, 40], non-contiguous
    w, b = w.new_ones(40) * 1.5, b.new_zeros(40) + 0.25
    grads = []
    for fn in (layer_norm, layer_norm_ref):
        xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
        y = fn(xx, ww, bb, 1e-6)
        (y * torch.arange(40.0, device=device)).sum().backward()
        grads.append((y.detach(), xx.grad, ww.grad, bb.grad))
    for name, g, r in zip(NAMES, *grads, strict=True):
        assert_close_scaled(g, r, 1e-5, name)


def test_zero_rows():
    x, w, b, dy = make_inputs((0, 64))
    y, dx, dw, db = forward_backward(layer_norm, x, w, b, dy)
    assert y.shape == dx.shape == (0, 64)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_only_requested_gradients():
    x, w, b, dy = make_inputs((5, 48))
    x.requires_grad_()
    y = layer_norm(x, w, b)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    assert w.grad is None and b.grad is None
    assert_close_scaled(dx, forward_backward(layer_norm_ref, x, w, b, dy)[1], 1e-5, "dx")


def test_supported_reasons():
    d = 768
    ok = {"weight": torch.ones(d, device=device), "bias": torch.zeros(d, device=device)}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.zeros(2, 3, d, dtype=dtype, device=device)
        assert layer_norm_supported(x, ok["weight"], ok["bias"]) is None  # fp32 params
        assert layer_norm_supported(x, ok["weight"].to(dtype), ok["bias"].to(dtype)) is None
    assert layer_norm_supported(torch.zeros(0, d, device=device), **ok) is None
    assert layer_norm_supported(torch.zeros(1, 16384, device=device), torch.ones(16384, device=device),
                                torch.zeros(16384, device=device)) is None

    reason = layer_norm_supported(torch.zeros(4, d, dtype=torch.float64, device=device), **ok)
    assert reason is not None and "float64" in reason
    wide = MAX_WIDTH + 1
    reason = layer_norm_supported(torch.zeros(1, wide, device=device), torch.ones(wide, device=device),
                                  torch.zeros(wide, device=device))
    assert reason is not None and str(wide) in reason and "limit" in reason
    x16 = torch.zeros(4, d, dtype=torch.float16, device=device)
    assert "dtype" in layer_norm_supported(x16, ok["weight"].bfloat16(), ok["bias"])
    assert "shape" in layer_norm_supported(torch.zeros(4, d + 1, device=device), **ok)
    assert layer_norm_supported(torch.zeros((), device=device), **ok) is not None
    assert "width 0" in layer_norm_supported(torch.zeros(3, 0, device=device), ok["weight"][:0], ok["bias"][:0])


def test_module_matches_nn_layer_norm():
    torch.manual_seed(7)
    ref = nn.LayerNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        ref.weight.normal_(1, 0.5)
        ref.bias.normal_(0, 0.5)
    ours = LayerNorm(96, eps=1e-6).to(device)
    assert isinstance(ours, nn.LayerNorm)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert LayerNorm(96).eps == nn.LayerNorm(96).eps
    x = torch.randn(2, 9, 96, device=device)
    outs = []
    for m in (ours, ref):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * y).sum().backward()
        outs.append((y.detach(), xx.grad, m.weight.grad, m.bias.grad))
    for name, g, r in zip(NAMES, *outs, strict=True):
        assert_close_scaled(g, r, 1e-5, name)


def test_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatch of the custom ops; a transposed x checks that
    the fake impls give the launchers' contiguous outputs whatever the input strides."""
    x, w, b, dy = make_inputs((5, 40), seed=8)
    torch.library.opcheck(torch.ops.mpp_kernels.layer_norm_fwd.default, (x.t().contiguous().t(), w, b, 1e-6))
    _y, mean, rstd = torch.ops.mpp_kernels.layer_norm_fwd(x, w, b, 1e-6)
    torch.library.opcheck(torch.ops.mpp_kernels.layer_norm_fwd.default, (x, w, b, 1e-6))
    torch.library.opcheck(torch.ops.mpp_kernels.layer_norm_bwd.default, (dy, x, w, mean, rstd))
    r = torch.randn_like(x)
    s, _, mean, rstd = torch.ops.mpp_kernels.add_layer_norm_fwd(x, r, w, b, 1e-6)
    torch.library.opcheck(torch.ops.mpp_kernels.add_layer_norm_fwd.default, (x, r, w, b, 1e-6))
    torch.library.opcheck(torch.ops.mpp_kernels.add_layer_norm_bwd.default, (dy, r, s, w, mean, rstd))
    torch.library.opcheck(torch.ops.mpp_kernels.add_layer_norm_fwd.default, (x.t().contiguous().t(), r, w, b, 1e-6))


def _compiled_matches_eager(backend):
    torch._dynamo.reset()

    def fn(x, w, b):
        return layer_norm(x * 2 - 1, w, b).square().sum(-1)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    x, w, b, _ = make_inputs((2, 9, 192), seed=9)
    dz = torch.randn(2, 9, device=device)
    got = forward_backward(lambda x, w, b, eps: compiled(x, w, b), x, w, b, dz)
    want = forward_backward(lambda x, w, b, eps: fn(x, w, b), x, w, b, dz)
    for name, g, r in zip(("out", "dx", "dweight", "dbias"), got, want, strict=True):
        assert_close_scaled(g, r, 1e-5, name)


def test_torch_compile_traces_the_autograd_function():
    """Dynamo + AOTAutograd trace the autograd.Function and both ops with fullgraph=True (fake
    tensors only; the kernels then run eagerly, so this also works under the interpreter)."""
    _compiled_matches_eager("aot_eager")


@gpu
@pytest.mark.gpu
def test_torch_compile_inductor_matches_eager():
    """Inductor sees through the triton_ops to the Triton kernels and launches them itself."""
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device_without_set_device():
    """Tensors on cuda:1 while cuda:0 is current: every launch (forward, backward, fused add) must
    run on cuda:1."""
    assert torch.cuda.current_device() == 0
    x, w, b, dy = (t.to("cuda:1") for t in make_inputs((197, 768), seed=20))
    got, want = forward_backward(layer_norm, x, w, b, dy), forward_backward(layer_norm_ref, x, w, b, dy)
    for name, g, r in zip(NAMES, got, want, strict=True):
        assert g.device == torch.device("cuda:1")
        assert_close_scaled(g, r, 1e-5, name)
    s, y = add_layer_norm(x, dy, w, b)
    assert_close_scaled(s, x + dy, 0, "s")
    assert_close_scaled(y, layer_norm_ref(x + dy, w, b), 1e-5, "y")


# ---- the fused residual add: (s, y) = (x + r, LayerNorm(x + r)) ----

ADD_NAMES = ("s", "y", "dx", "dr", "dweight", "dbias")


def add_forward_backward(fn, x, r, w, b, ds, dy, eps=1e-6):
    """fn's (s, y) and the gradients of x, r, weight, bias for upstream gradients ds (of s) and dy (of y)."""
    x, r, w, b = (t.detach().requires_grad_() for t in (x, r, w, b))
    s, y = fn(x, r, w, b, eps)
    return (s.detach(), y.detach(), *torch.autograd.grad((s, y), (x, r, w, b), (ds.to(s.dtype), dy.to(y.dtype))))


def make_add_inputs(shape, dtype=torch.float32, residual_dtype=None, seed=0):
    x, w, b, dy = make_inputs(shape, dtype=dtype, param_dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    r = torch.randn(shape, generator=g).to(device, residual_dtype or dtype)
    ds = torch.randn(shape, generator=g).to(device)
    return x, r, w, b, ds, dy


@pytest.mark.parametrize("width", [37, 192, 384, 1000])
@pytest.mark.parametrize("rows", [1, 197])
def test_add_layer_norm_fp32_matches_reference(width, rows):
    args = make_add_inputs((rows, width), seed=10)
    got = add_forward_backward(add_layer_norm, *args)
    want = add_forward_backward(add_layer_norm_ref, *args)
    for name, g, r in zip(ADD_NAMES, got, want, strict=True):
        assert g.dtype == r.dtype, name
        assert_close_scaled(g, r, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layer_norm_low_precision_and_mixed(dtype):
    """All in `dtype`, and an fp32 residual stream plus a `dtype` branch (as under autocast): s and y
    in the promoted dtype, each gradient in its input's dtype, errors as the plain LayerNorm's."""
    for x_dtype in (dtype, torch.float32):
        args = make_add_inputs((37, 768), dtype=x_dtype, residual_dtype=dtype, seed=11)
        got = add_forward_backward(add_layer_norm, *args)
        ours_torch = add_forward_backward(add_layer_norm_ref, *args)  # the same ops in PyTorch, same dtypes
        x, r, w, b, ds, dy = args
        ref = add_forward_backward(add_layer_norm_ref, x.float(), r.float(), w, b, ds, dy)
        assert [t.dtype for t in got] == [x_dtype, x_dtype, x_dtype, dtype, torch.float32, torch.float32]
        for name, g, t, rf in zip(ADD_NAMES, got, ours_torch, ref, strict=True):
            atol = torch.finfo(dtype).eps * max(1.0, rf.abs().max().item())
            assert max_err(g, rf) <= 2 * max_err(t, rf) + atol, (
                f"{name} ({x_dtype} + {dtype}): kernel error {max_err(g, rf):.3g}, torch {max_err(t, rf):.3g}")


def test_add_layer_norm_one_output_unused_and_deterministic():
    """Only y in the loss (s's gradient is zero), only s (y's is zero); two backwards agree bitwise."""
    x, r, w, b, ds, dy = make_add_inputs((1023, 37), seed=12)
    x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
    s, y = add_layer_norm(x, r, w, b)
    first = torch.autograd.grad(y, (x, r, w, b), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, r, w, b), dy, retain_graph=True)
    assert all(torch.equal(a, c) for a, c in zip(first, second, strict=True))
    want = add_forward_backward(add_layer_norm_ref, x, r, w, b, torch.zeros_like(ds), dy)
    for name, g, ref in zip(ADD_NAMES[2:], first, want[2:], strict=True):
        assert_close_scaled(g, ref, 1e-5, name)
    dx, dr = torch.autograd.grad(s, (x, r), ds)
    assert torch.equal(dx, ds) and torch.equal(dr, ds)  # d(x + r) = ds exactly, nothing from y


def test_add_layer_norm_module_and_supported_reasons():
    torch.manual_seed(13)
    norm = LayerNorm(48, eps=1e-6).to(device)
    x, r = torch.randn(2, 5, 48, device=device), torch.randn(2, 5, 48, device=device)
    s, y = norm.add(x, r)
    assert torch.equal(s, x + r)
    assert_close_scaled(y, layer_norm_ref(x + r, norm.weight, norm.bias, 1e-6), 1e-5, "y")
    w, b = norm.weight, norm.bias
    assert add_layer_norm_supported(x, r, w, b) is None
    assert add_layer_norm_supported(x, r.half(), w, b) is None  # promoted to fp32
    assert "no broadcasting" in add_layer_norm_supported(x, r[:, :1], w, b)
    assert "float64" in add_layer_norm_supported(x, r.double(), w, b)
    assert "shape" in add_layer_norm_supported(x, r, w[:4], b)
