"""Fused LayerNorm over the last dimension (forward + backward), Liger-Kernel style.

Public API: `layer_norm(x, weight, bias, eps)` and `layer_norm_ref` (the op's definition:
statistics in fp32, output in x.dtype); and the same for the fused residual add of a pre-norm
block, `add_layer_norm(x, r, weight, bias, eps)` → (x + r, LayerNorm(x + r)) and
`add_layer_norm_ref`. `layer_norm_supported` and `add_layer_norm_supported` (None or a reason)
state the input contract.

Forward: one program per row; the whole row sits in one block of BLOCK_D = next_power_of_2(D)
lanes, masked past D. mean and rstd are computed in fp32 and saved ([rows] fp32) for the backward.
Backward: each program walks a contiguous chunk of rows, writes dx per row and accumulates dweight,
dbias in fp32 registers; it stores one row of a [num_programs, D] fp32 buffer, which is summed with
torch afterwards. No atomics: for a given device and shape the result is bitwise reproducible.
Fused residual: the forward reads x and r and writes s = x + r and y (no separate add kernel, no
second read of s); the backward adds the residual stream's own gradient to dx in the same pass.

Launches: every launcher runs its kernels on the input's own CUDA device, so tensors on cuda:1
need no torch.cuda.set_device. The launchers are the custom ops mpp_kernels::layer_norm_fwd / _bwd
and add_layer_norm_fwd / _bwd, registered as every op of this package is (`triton_kernels._launch`):
triton_ops (torch.compile traces into the kernels), or under TRITON_INTERPRET=1 opaque custom ops
with fake impls; each forward op carries its derivative (register_autograd).
"""

import torch
import triton
import triton.language as tl

# Warps and backward program counts (triton_kernels._configs), under the names the launchers call
# (tests/test_kernels_compile.py replaces _bwd_num_programs here with an H100's count).
from triton_kernels._configs import layer_norm_bwd_programs as _bwd_num_programs
from triton_kernels._configs import layer_norm_warps as _num_warps

# The ops' input contracts, public here.
from triton_kernels._contracts import add_layer_norm_supported, layer_norm_supported  # noqa: F401
from triton_kernels._launch import as_op, launch_device, wrap_triton


@triton.jit
def _normalize_row(x, row, cols, mask, y_row, W, B, Mean, Rstd, n_cols, eps):
    """LayerNorm of one fp32 row x [BLOCK_D] (zero past D): stores y at y_row, mean and rstd at row."""
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)  # masked lanes must not enter the variance
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(y_row + cols, y.to(y_row.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # *[rows, D] input, x.dtype, unit column stride
    Y,  # *[rows, D] output, x.dtype, unit column stride
    W,  # *[D] weight (x.dtype or fp32)
    B,  # *[D] bias (x.dtype or fp32)
    Mean,  # *[rows] fp32: per-row mean, saved for the backward
    Rstd,  # *[rows] fp32: per-row 1 / sqrt(var + eps), saved for the backward
    stride_x,  # elements between consecutive rows of X
    stride_y,  # elements between consecutive rows of Y
    n_cols,  # D, the normalized width
    eps,  # variance epsilon (fp32)
    BLOCK_D: tl.constexpr,  # next_power_of_2(D): lanes per row, masked past D
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * D may exceed 2**31
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _normalize_row(x, row, cols, mask, Y + row * stride_y, W, B, Mean, Rstd, n_cols, eps)


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # *[rows, D] input (the residual stream), unit column stride
    R,  # *[rows, D] what is added to it (a branch's output), unit column stride; may differ in dtype
    S,  # *[rows, D] output: X + R in S's dtype (their promoted dtype), unit column stride
    Y,  # *[rows, D] output: LayerNorm(S), S's dtype, unit column stride
    W,  # *[D] weight (S's dtype or fp32)
    B,  # *[D] bias (S's dtype or fp32)
    Mean,  # *[rows] fp32: per-row mean of S, saved for the backward
    Rstd,  # *[rows] fp32: per-row rstd of S, saved for the backward
    stride_x,  # elements between consecutive rows of X
    stride_r,  # elements between consecutive rows of R
    stride_s,  # elements between consecutive rows of S
    stride_y,  # elements between consecutive rows of Y
    n_cols,  # D, the normalized width
    eps,  # variance epsilon (fp32)
    BLOCK_D: tl.constexpr,  # next_power_of_2(D): lanes per row, masked past D
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded to S's dtype before the statistics, as `x + r` followed by a LayerNorm would be.
    s = (x + r).to(S.dtype.element_ty)
    tl.store(S + row * stride_s + cols, s, mask=mask)
    _normalize_row(s.to(tl.float32), row, cols, mask, Y + row * stride_y, W, B, Mean, Rstd, n_cols, eps)


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # *[rows, D] forward input, unit column stride
    W,  # *[D] weight (x.dtype or fp32)
    DY,  # *[rows, D] upstream gradient, unit column stride
    DX,  # *[rows, D] output: gradient w.r.t. X, x.dtype, unit column stride
    DRES,  # *[rows, D] gradient reaching X by another path, added to DX (read only when HAS_DRES)
    Mean,  # *[rows] fp32 per-row mean from the forward
    Rstd,  # *[rows] fp32 per-row rstd from the forward
    DW_partial,  # *[num_programs, D] fp32 output: this program's sum of dy * xhat over its rows
    DB_partial,  # *[num_programs, D] fp32 output: this program's sum of dy over its rows
    stride_x,  # elements between consecutive rows of X
    stride_dy,  # elements between consecutive rows of DY
    stride_dx,  # elements between consecutive rows of DX
    stride_dres,  # elements between consecutive rows of DRES
    stride_partial,  # elements between consecutive rows of DW_partial / DB_partial
    n_rows,  # number of rows
    n_cols,  # D, the normalized width
    rows_per_program,  # rows in each program's contiguous chunk (the last one may get fewer)
    BLOCK_D: tl.constexpr,  # next_power_of_2(D): lanes per row, masked past D
    HAS_DRES: tl.constexpr,  # fused residual: X was x + r, and X's own gradient arrives in DRES
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Pointers advance row by row: 64-bit pointer arithmetic, no int32 row * stride overflow.
    start = row_start.to(tl.int64)
    x_ptr = X + start * stride_x
    dy_ptr = DY + start * stride_dy
    dx_ptr = DX + start * stride_dx
    dres_ptr = DRES + start * stride_dres
    mean_ptr = Mean + start
    rstd_ptr = Rstd + start
    for _ in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr)
        rstd = tl.load(rstd_ptr)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy  # zero on masked lanes (w and dy load as 0 there)
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols  # mean(w * dy * xhat)
        c2 = tl.sum(wdy, axis=0) / n_cols  # mean(w * dy)
        dx = (wdy - c2 - xhat * c1) * rstd
        if HAS_DRES:  # one pass instead of a second kernel adding the two gradients
            dx += tl.load(dres_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            dres_ptr += stride_dres
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
        mean_ptr += 1
        rstd_ptr += 1
    out = pid.to(tl.int64) * stride_partial + cols
    tl.store(DW_partial + out, dw_acc, mask=mask)
    tl.store(DB_partial + out, db_acc, mask=mask)


def _stats(x2d):
    """An empty [rows] fp32 buffer: per-row mean or rstd."""
    return x2d.new_empty(x2d.shape[0], dtype=torch.float32)


def _param_grad(x2d):
    """An empty [D] fp32 buffer: dweight or dbias."""
    return x2d.new_empty(x2d.shape[1], dtype=torch.float32)


def _layer_norm_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [rows, D] -> (y [rows, D] in x.dtype, mean [rows] fp32, rstd [rows] fp32)."""
    x2d, weight, bias = x2d.contiguous(), weight.contiguous(), bias.contiguous()
    rows, d = x2d.shape
    y, mean, rstd = torch.empty_like(x2d), _stats(x2d), _stats(x2d)
    if rows == 0:
        return y, mean, rstd
    block_d = triton.next_power_of_2(d)
    # `wrap_triton(<kernel name>)` spelled out: torch reads the op's kernels from this source
    # (torch._library.triton.get_inner_triton_kernels), e.g. for its compile cache keys.
    with launch_device(x2d):
        wrap_triton(_layer_norm_fwd_kernel)[(rows,)](
            x2d, y, weight, bias, mean, rstd, x2d.stride(0), y.stride(0), d, eps,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return y, mean, rstd


def _add_layer_norm_fwd(
    x2d: torch.Tensor, r2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d, r2d [rows, D] -> (s = x + r, y = LayerNorm(s), both in the promoted dtype; mean, rstd [rows] fp32)."""
    x2d, r2d, weight, bias = x2d.contiguous(), r2d.contiguous(), weight.contiguous(), bias.contiguous()
    rows, d = x2d.shape
    dtype = torch.promote_types(x2d.dtype, r2d.dtype)
    s2d = torch.empty_like(x2d, dtype=dtype)
    y, mean, rstd = torch.empty_like(s2d), _stats(x2d), _stats(x2d)
    if rows == 0:
        return s2d, y, mean, rstd
    block_d = triton.next_power_of_2(d)
    with launch_device(x2d):
        wrap_triton(_add_layer_norm_fwd_kernel)[(rows,)](
            x2d, r2d, s2d, y, weight, bias, mean, rstd, x2d.stride(0), r2d.stride(0), s2d.stride(0), y.stride(0),
            d, eps, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return s2d, y, mean, rstd


def _layer_norm_bwd(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [rows, D] in x.dtype, dweight [D] fp32, dbias [D] fp32)."""
    return _bwd_launch(dy2d, x2d, weight, mean, rstd, None)


def _add_layer_norm_bwd(
    dy2d: torch.Tensor, ds2d: torch.Tensor, s2d: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy2d: gradient of y = LayerNorm(s); ds2d: of s itself (the residual stream) ->
    (ds total = the gradient of both x and r [rows, D] in s.dtype, dweight [D] fp32, dbias [D] fp32)."""
    return _bwd_launch(dy2d, s2d, weight, mean, rstd, ds2d.contiguous())


def _bwd_launch(dy2d, x2d, weight, mean, rstd, dres2d):
    """The one backward launcher: LayerNorm's, plus dres2d (or nothing when None) added to dx."""
    dy2d, x2d, weight = dy2d.contiguous(), x2d.contiguous(), weight.contiguous()
    rows, d = x2d.shape
    dx = torch.empty_like(x2d)
    if rows == 0:
        zeros = torch.zeros(d, dtype=torch.float32, device=x2d.device)
        return dx, zeros, zeros.clone()
    block_d = triton.next_power_of_2(d)
    num_warps = _num_warps(block_d)
    rows_per_program = triton.cdiv(rows, _bwd_num_programs(rows, x2d.device, num_warps))
    programs = triton.cdiv(rows, rows_per_program)  # no program left with an empty chunk
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x2d.device)
    db_partial = torch.empty((programs, d), dtype=torch.float32, device=x2d.device)
    has_dres = dres2d is not None
    with launch_device(x2d):
        wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
            x2d, weight, dy2d, dx, dres2d if has_dres else dy2d, mean, rstd, dw_partial, db_partial,
            x2d.stride(0), dy2d.stride(0), dx.stride(0), dres2d.stride(0) if has_dres else 0, dw_partial.stride(0),
            rows, d, rows_per_program,
            BLOCK_D=block_d, HAS_DRES=has_dres, num_warps=num_warps,
        )
    return dx, dw_partial.sum(0), db_partial.sum(0)  # fixed-order reduction: deterministic


# The ops mpp_kernels::layer_norm_fwd / _bwd and add_layer_norm_fwd / _bwd. Their fake impls (used
# under the interpreter only; a triton_op is its own fake) give the launchers' contiguous outputs
# whatever the inputs' strides (the launchers call .contiguous() first), hence new_empty.
layer_norm_fwd = as_op("layer_norm_fwd", _layer_norm_fwd,
                       lambda x2d, weight, bias, eps: (x2d.new_empty(x2d.shape), _stats(x2d), _stats(x2d)))
layer_norm_bwd = as_op("layer_norm_bwd", _layer_norm_bwd, lambda dy2d, x2d, weight, mean, rstd: (
    x2d.new_empty(x2d.shape), _param_grad(x2d), _param_grad(x2d)))


def _add_fwd_fake(x2d, r2d, weight, bias, eps):
    s2d = x2d.new_empty(x2d.shape, dtype=torch.promote_types(x2d.dtype, r2d.dtype))
    return s2d, torch.empty_like(s2d), _stats(x2d), _stats(x2d)


add_layer_norm_fwd = as_op("add_layer_norm_fwd", _add_layer_norm_fwd, _add_fwd_fake)
add_layer_norm_bwd = as_op("add_layer_norm_bwd", _add_layer_norm_bwd, lambda dy2d, ds2d, s2d, weight, mean, rstd: (
    s2d.new_empty(s2d.shape), _param_grad(s2d), _param_grad(s2d)))


# Autograd on the forward ops (the package's one idiom, see triton_kernels._launch); the functional
# API reshapes [..., D] <-> [rows, D] around them. The backwards cast the fp32 dweight and dbias to
# the parameters' dtypes, and give None to an input that needs no gradient.
def _setup_context(ctx, inputs, output):
    x2d, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x2d, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x2d, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy.contiguous(), x2d, weight, mean, rstd)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw.to(weight.dtype) if need[1] else None,
            db.to(ctx.bias_dtype) if need[2] else None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# (s, y) = (x + r, LayerNorm(x + r)): a pre-norm block's residual add and the next LayerNorm in one
# pass over the rows, forward and backward. Both outputs are used (s goes on as the residual
# stream); one left out of the loss gets a zero gradient (materialized by autograd).
def _add_setup_context(ctx, inputs, output):
    x2d, r2d, weight, bias, _eps = inputs
    s2d, _y, mean, rstd = output
    ctx.save_for_backward(s2d, weight, mean, rstd)
    ctx.dtypes = (x2d.dtype, r2d.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _add_backward(ctx, ds, dy, _dmean, _drstd):
    s2d, weight, mean, rstd = ctx.saved_tensors
    dtype = s2d.dtype  # the gradients arrive in s's dtype
    grad, dw, db = add_layer_norm_bwd(dy.to(dtype), ds.to(dtype), s2d, weight, mean, rstd)
    x_dtype, r_dtype, bias_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    return (grad.to(x_dtype) if need[0] else None,  # d(x + r)/dx = d(x + r)/dr = 1
            grad.to(r_dtype) if need[1] else None,
            dw.to(weight.dtype) if need[2] else None,
            db.to(bias_dtype) if need[3] else None,
            None)


add_layer_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup_context)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) = (x + residual, LayerNorm(s)) in one kernel; x, residual [..., D] of one shape, s and y
    in their promoted dtype; differentiable in all four. Inputs must pass `add_layer_norm_supported`."""
    d = x.shape[-1]
    s2d, y2d, _, _ = add_layer_norm_fwd(x.reshape(-1, d), residual.reshape(-1, d), weight, bias, float(eps))
    return s2d.view(x.shape), y2d.view(x.shape)  # [rows, D] -> [..., D]


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's definition in plain PyTorch."""
    s = x + residual
    return s, layer_norm_ref(s, weight, bias, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm of x [..., D] over its last dim with weight, bias [D]; differentiable in all three.
    Inputs must pass `layer_norm_supported` (this function does not check)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # [rows, D]
    return layer_norm_fwd(x2d, weight, bias, float(eps))[0].view(x.shape)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The op's definition in plain PyTorch: statistics and affine in fp32, output cast to x.dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    return y.to(x.dtype)
