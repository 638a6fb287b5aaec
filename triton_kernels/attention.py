"""Non-causal softmax attention, FlashAttention-2 style (forward + backward), for the ViT.

Public API: `attention(q, k, v, scale=None)` (differentiable) and `attention_ref` (the op's
definition: softmax in fp32, output in q.dtype); `attention_supported(q, k, v)` (None, or why the
kernel cannot take these inputs) states the input contract.

q: [B, H, Nq, D], k, v: [B, H, Nk, D], any strides (the ViT's permuted qkv views go in as they are;
strides are kernel arguments). Output: [B, H, Nq, D] in (B, Nq, H, D) memory order, in q.dtype:
`out.transpose(1, 2).reshape(B, Nq, H * D)` (how the ViT merges heads) is a view, not a copy.
Nq, Nk >= 1.
Head dims 1..128; a non-power-of-two D is padded to BLOCK_D = max(16, next_power_of_2(D)) lanes
with masked loads and stores (zeros in the pad change no dot product). fp16 / bf16 use tensor cores
with fp32 accumulation; fp32 uses exact IEEE products (`input_precision="ieee"`, never tf32).

Forward: one program per (query block, batch*head) walks all key blocks with an online softmax
(running max m_i, running sum l_i, fp32 accumulator) in base 2: scale*log2(e) is folded into the
scores so each exponential is one exp2. It saves LSE = logsumexp_j(scale * q.k_j) (natural log,
[B, H, Nq] fp32). Backward: delta = rowsum(dO * O), then a dk/dv kernel (one program per key block,
looping over query blocks) and a dq kernel (one program per query block, looping over key blocks),
both recomputing P = exp(scale * q k^T - LSE). No atomics: deterministic.

Tails: every tile load is masked (rows past N read as 0). Key columns past Nk get -inf before the
exponential, so they weigh exactly 0. A fully masked row cannot occur: each key block of the loop
starts below Nk, so it holds at least one real key and every row's running max is finite after the
first block, even for the pad rows past Nq (q = 0 there: scores 0, finite), whose results are
simply never stored.

Launches: every launcher runs its kernels on the input's own CUDA device, so tensors on cuda:1
need no torch.cuda.set_device. The launchers are the custom ops mpp_kernels::attention_fwd / _bwd,
registered as every op of this package is (`triton_kernels._launch`): triton_ops (torch.compile
traces into the kernels), or under TRITON_INTERPRET=1 opaque custom ops with fake impls; the
forward op carries its derivative (register_autograd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._configs import attention_configs
from triton_kernels._contracts import attention_supported  # noqa: F401 - this op's input contract, public here
from triton_kernels._launch import as_op, launch_device, wrap_triton
from triton_kernels.gate import interpreting

_LOG2E = 1.4426950408889634


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE (fp32 inputs): exact fp32 products; else fp16/bf16 tensor cores."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _head_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Lanes < HEAD_DIM. Power-of-two head dims get an all-true constant: masks stay uniform along D,
    so the compiler keeps vectorized loads and stores."""
    if HEAD_DIM == BLOCK_D:
        mask = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask = offs_d < HEAD_DIM
    return mask


@triton.jit
def _attn_fwd_kernel(
    Q,  # *[B, H, Nq, D] queries, any strides
    K,  # *[B, H, Nk, D] keys, any strides
    V,  # *[B, H, Nk, D] values, any strides
    Out,  # *[B, H, Nq, D] output, q.dtype
    LSE,  # *[B, H, Nq] fp32, contiguous: natural-log logsumexp of the scaled scores of each row
    qk_scale,  # softmax scale * log2(e): scaled scores go straight into exp2
    stride_qb, stride_qh, stride_qn, stride_qd,  # Q strides, in elements
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_ob, stride_oh, stride_on, stride_od,  # Out strides
    H,  # heads: program_id(1) = b * H + h
    N_Q,  # query rows (tail block masked)
    N_K,  # key rows (tail block masked, scores set to -inf)
    HEAD_DIM: tl.constexpr,  # true head dim D (<= BLOCK_D; lanes past it are masked)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    BLOCK_D: tl.constexpr,  # max(16, next_power_of_2(D))
    IEEE: tl.constexpr,  # fp32 inputs: IEEE-exact dot products
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64 base offsets: B*H*N*D may pass 2**31
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Out += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = _head_mask(offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the block holds >= 1 real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # 0 on the first step (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new

    acc = acc / l_i[:, None]  # l_i >= 1: the row max contributes exp2(0)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)
    tl.store(Out + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # *[B, H, N, D] forward output
    DO,  # *[B, H, N, D] upstream gradient, any strides
    Delta,  # *[B, H, N] fp32 out: rowsum(dO * O)
    stride_ob, stride_oh, stride_on, stride_od,  # Out strides
    stride_dob, stride_doh, stride_don, stride_dod,  # DO strides
    H,  # heads: program_id(1) = b * H + h
    N_Q,  # query rows
    HEAD_DIM: tl.constexpr,  # true head dim
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # padded head dim
):
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask = mask_m[:, None] & _head_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * N_Q + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # *[B, H, N, D] forward inputs, any strides
    DO,  # *[B, H, Nq, D] upstream gradient, any strides
    LSE,  # *[B, H, Nq] fp32 natural-log logsumexp saved by the forward
    Delta,  # *[B, H, Nq] fp32 rowsum(dO * O)
    DK, DV,  # *[B, H, Nk, D] gradient outputs, k.dtype
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale (dS -> dK)
    stride_qb, stride_qh, stride_qn, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_dob, stride_doh, stride_don, stride_dod,  # DO strides
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # DK strides (DV shares them)
    H,  # heads: program_id(1) = b * H + h
    N_Q,  # query rows
    N_K,  # key rows
    HEAD_DIM: tl.constexpr,  # true head dim
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows per program
    BLOCK_D: tl.constexpr,  # padded head dim
    IEEE: tl.constexpr,  # fp32 inputs: IEEE-exact dot products
):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    LSE += off_bh.to(tl.int64) * N_Q
    Delta += off_bh.to(tl.int64) * N_Q

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_K
    mask_d = _head_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N_Q
        qT = tl.load(Q + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_M]
        lse = tl.load(LSE + rows, mask=mask_m, other=0.0) * 1.4426950408889634  # log2 domain
        sT = _mma(k, qT, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE) * qk_scale
        # P^T; pad query columns and pad key rows weigh 0 (pad rows would give exp2(0 - lse) otherwise)
        sT = tl.where(mask_n[:, None] & mask_m[None, :], sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])
        do = tl.load(DO + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        dv = _mma(pT.to(do.dtype), do, dv, IEEE)
        delta = tl.load(Delta + rows, mask=mask_m, other=0.0)
        dpT = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, IEEE)
    dk = dk * sm_scale
    dk_offs = off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + dk_offs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + dk_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # *[B, H, N, D] forward inputs, any strides
    DO,  # *[B, H, Nq, D] upstream gradient, any strides
    LSE,  # *[B, H, Nq] fp32 natural-log logsumexp saved by the forward
    Delta,  # *[B, H, Nq] fp32 rowsum(dO * O)
    DQ,  # *[B, H, Nq, D] gradient output, q.dtype
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale (dS -> dQ)
    stride_qb, stride_qh, stride_qn, stride_qd,  # Q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_dob, stride_doh, stride_don, stride_dod,  # DO strides
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,  # DQ strides
    H,  # heads: program_id(1) = b * H + h
    N_Q,  # query rows
    N_K,  # key rows
    HEAD_DIM: tl.constexpr,  # true head dim
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    BLOCK_D: tl.constexpr,  # padded head dim
    IEEE: tl.constexpr,  # fp32 inputs: IEEE-exact dot products
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = _head_mask(offs_d, HEAD_DIM, BLOCK_D)
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * N_Q + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + off_bh.to(tl.int64) * N_Q + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=mask_dn, other=0.0)
        vT = tl.load(V + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=mask_dn, other=0.0)
        s = _mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))  # pad keys: P = 0, not exp2(0 - lse)
        p = tl.exp2(s - lse[:, None])
        dp = _mma(do, vT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_md)


def _configs(block_d: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Each kernel's launch keywords (the tables, and why: triton_kernels._configs), the interpreter's
    under TRITON_INTERPRET=1."""
    return attention_configs(block_d, dtype, interpreting())


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fwd_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for the forward; the launcher and the fake impl share it, so the strides agree."""
    B, H, n_q, d = q.shape
    # [B, H, Nq, D] view of a (B, Nq, H, D) buffer: the ViT's out.transpose(1, 2).reshape(B, N, H*D)
    # is then a free view, not a copy per layer.
    out = torch.empty((B, n_q, H, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)  # contiguous: the kernels index it flat
    return out, lse


def _bwd_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (dq, dk, dv), contiguous [B, H, N, D] in each input's dtype."""
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    return dq, dk, dv


def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Nq, D] in (B, Nq, H, D) memory order, q.dtype; lse [B, H, Nq] fp32 natural-log
    logsumexp of the scaled scores)."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    out, lse = _fwd_outputs(q)
    block_d = _block_d(d)
    cfg = _configs(block_d, q.dtype)["fwd"]
    grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)
    # `wrap_triton(<kernel name>)` spelled out: torch reads the op's kernels from this source
    # (torch._library.triton.get_inner_triton_kernels), e.g. for its compile cache keys.
    with launch_device(q):
        wrap_triton(_attn_fwd_kernel)[grid](
            q, k, v, out, lse, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, n_q, n_k, HEAD_DIM=d, BLOCK_D=block_d, IEEE=q.dtype == torch.float32, **cfg)
    return out, lse


def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each contiguous in its input's dtype. do, out: any strides; lse from the forward."""
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    block_d = _block_d(d)
    cfgs = _configs(block_d, q.dtype)
    ieee = q.dtype == torch.float32
    delta = torch.empty((B, H, n_q), device=q.device, dtype=torch.float32)
    dq, dk, dv = _bwd_outputs(q, k, v)

    with launch_device(q):
        cfg = cfgs["pre"]
        wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, n_q, HEAD_DIM=d, BLOCK_D=block_d, **cfg)
        cfg = cfgs["dkdv"]
        wrap_triton(_attn_bwd_dkdv_kernel)[(triton.cdiv(n_k, cfg["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, scale * _LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
            H, n_q, n_k, HEAD_DIM=d, BLOCK_D=block_d, IEEE=ieee, **cfg)
        cfg = cfgs["dq"]
        wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(n_q, cfg["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, scale * _LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, n_q, n_k, HEAD_DIM=d, BLOCK_D=block_d, IEEE=ieee, **cfg)
    return dq, dk, dv


# The ops mpp_kernels::attention_fwd / attention_bwd; under the interpreter the allocation helpers
# are their fake impls.
attention_fwd = as_op("attention_fwd", _attention_fwd, lambda q, k, v, scale: _fwd_outputs(q))
attention_bwd = as_op("attention_bwd", _attention_bwd, lambda do, q, k, v, out, lse, scale: _bwd_outputs(q, k, v))


# Autograd on the forward op (the package's one idiom, see triton_kernels._launch): eager,
# torch.compile(fullgraph=True) and torch.export all see one op whose backward is attention_bwd.
def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v, non-causal, no dropout. q: [B, H, Nq, D]; k, v: [B, H, Nk, D], any
    strides → [B, H, Nq, D] in q.dtype, in (B, Nq, H, D) memory order. scale defaults to D**-0.5.
    Differentiable. Inputs must pass `attention_supported` (this function does not check)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fwd(q, k, v, scale)[0]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The op's definition in PyTorch: scores and softmax in fp32, output in q.dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
