"""Triton gathered multi-LoRA: BGMV row kernels + SGMV-style segment reductions.

  forward   u = shrink(x, A)            u_i = x_i @ A[idx_i]                (N, r)  fp32
            y = expand(u, B, scale)     y_i = scale[idx_i] * u_i @ B[idx_i] (N, d_out)
  backward  v  = shrink(dy, B^T)        v_i = dy_i @ B[idx_i]^T            (N, r)  fp32
            dx = expand(v, A^T, scale)
            dA[a] = scale_a * sum_{i in a} x_i^T v_i     (segment reduction over sorted rows)
            dB[a] = scale_a * sum_{i in a} u_i^T dy_i
The transposed operands are strided views, never copies. Rows with idx = -1 give zero
output and zero dx. Imported only when impl="triton" is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _shrink(
    X,
    W,
    IDX,
    OUT,
    stride_xn,
    stride_xk,
    stride_wa,
    stride_wk,
    stride_wr,
    d_in,
    rank,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # OUT[i, :] = X[i, :] @ W[idx_i]   (one row per program: a matrix-vector product)
    i = tl.program_id(0).to(tl.int64)
    a = tl.load(IDX + i)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if a >= 0:
        for k0 in range(0, d_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + i * stride_xn + ks * stride_xk, mask=ks < d_in, other=0.0).to(tl.float32)
            w = tl.load(
                W + a * stride_wa + ks[:, None] * stride_wk + rs[None, :] * stride_wr,
                mask=(ks[:, None] < d_in) & (rs[None, :] < rank),
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x[:, None] * w, axis=0)
    tl.store(OUT + i * rank + rs, acc, mask=rs < rank)


@triton.jit
def _expand(
    U,
    W,
    IDX,
    SCALE,
    OUT,
    stride_wa,
    stride_wr,
    stride_wn,
    stride_on,
    rank,
    d_out,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # OUT[i, n-block] = scale[idx_i] * U[i, :] @ W[idx_i][:, n-block]
    i = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.load(IDX + i)
    rs = tl.arange(0, BLOCK_R)
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    if a >= 0:
        u = tl.load(U + i * rank + rs, mask=rs < rank, other=0.0)
        w = tl.load(
            W + a * stride_wa + rs[:, None] * stride_wr + ns[None, :] * stride_wn,
            mask=(rs[:, None] < rank) & (ns[None, :] < d_out),
            other=0.0,
        ).to(tl.float32)
        y = tl.sum(u[:, None] * w, axis=0) * tl.load(SCALE + a).to(tl.float32)
    tl.store(OUT + i * stride_on + ns, y.to(OUT.dtype.element_ty), mask=ns < d_out)


@triton.jit
def _segment_xty(
    P,
    Q,
    ORDER,
    SEG_START,
    SCALE,
    OUT,
    stride_pn,
    stride_qn,
    dim_p,
    dim_q,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    IEEE: tl.constexpr,
):
    # OUT[a, p-block, q-block] = scale_a * sum over rows i of segment a of P[i, p]^T Q[i, q]
    a = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(SEG_START + a)
    end = tl.load(SEG_START + a + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        rows = tl.load(ORDER + ms, mask=ms < end, other=0).to(tl.int64)
        p = tl.load(
            P + rows[:, None] * stride_pn + ps[None, :],
            mask=(ms[:, None] < end) & (ps[None, :] < dim_p),
            other=0.0,
        ).to(tl.float32)
        q = tl.load(
            Q + rows[:, None] * stride_qn + qs[None, :],
            mask=(ms[:, None] < end) & (qs[None, :] < dim_q),
            other=0.0,
        ).to(tl.float32)
        if IEEE:
            acc += tl.dot(tl.trans(p), q, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(p), q)
    acc = acc * tl.load(SCALE + a).to(tl.float32)
    out = OUT + a.to(tl.int64) * dim_p * dim_q + ps[:, None] * dim_q + qs[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(ps[:, None] < dim_p) & (qs[None, :] < dim_q))


def _pow2(n: int, lo: int = 16) -> int:
    return max(triton.next_power_of_2(n), lo)


def _shrink_rows(x: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """(N, r) fp32: x_i @ W[idx_i], W any strided (n, d_in, r) view."""
    n_rows, d_in = x.shape
    rank = W.shape[2]
    out = torch.empty(n_rows, rank, dtype=torch.float32, device=x.device)
    _shrink[(n_rows,)](
        x,
        W,
        idx,
        out,
        x.stride(0),
        x.stride(1),
        W.stride(0),
        W.stride(1),
        W.stride(2),
        d_in,
        rank,
        BLOCK_K=min(_pow2(d_in), 128),
        BLOCK_R=_pow2(rank),
    )
    return out


def _expand_rows(u: Tensor, W: Tensor, idx: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, d_out) in `dtype`: scale[idx_i] * u_i @ W[idx_i], W any strided (n, r, d_out) view."""
    n_rows, rank = u.shape
    d_out = W.shape[2]
    out = torch.empty(n_rows, d_out, dtype=dtype, device=u.device)
    block_n = min(_pow2(d_out), 128)
    _expand[(n_rows, triton.cdiv(d_out, block_n))](
        u,
        W,
        idx,
        scale,
        out,
        W.stride(0),
        W.stride(1),
        W.stride(2),
        out.stride(0),
        rank,
        d_out,
        BLOCK_N=block_n,
        BLOCK_R=_pow2(rank),
    )
    return out


def _segment_reduce(P: Tensor, Q: Tensor, plan, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(n_adapters, dim_p, dim_q): scale_a * P[seg a]^T Q[seg a]."""
    P, Q = P.contiguous(), Q.contiguous()
    dim_p, dim_q = P.shape[1], Q.shape[1]
    out = torch.empty(plan.n_adapters, dim_p, dim_q, dtype=dtype, device=P.device)
    bp, bq = min(_pow2(dim_p), 64), min(_pow2(dim_q), 64)
    grid = (plan.n_adapters, triton.cdiv(dim_p, bp), triton.cdiv(dim_q, bq))
    _segment_xty[grid](
        P,
        Q,
        plan.order,
        plan.seg_start,
        scale,
        out,
        P.stride(0),
        Q.stride(0),
        dim_p,
        dim_q,
        BLOCK_M=16,
        BLOCK_P=bp,
        BLOCK_Q=bq,
        IEEE=dtype == torch.float32,
    )
    return out


class _GatheredLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, idx, scale, plan):
        x = x.contiguous()
        u = _shrink_rows(x, A, idx)  # (N, r) fp32, unscaled
        y = _expand_rows(u, B, idx, scale, x.dtype)
        ctx.save_for_backward(x, A, B, idx, scale, u)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, idx, scale, u = ctx.saved_tensors
        plan = ctx.plan
        dy = dy.contiguous()
        v = _shrink_rows(dy, B.transpose(1, 2), idx)  # (N, r) fp32: dy_i @ B[idx_i]^T
        dx = _expand_rows(v, A.transpose(1, 2), idx, scale, x.dtype) if ctx.needs_input_grad[0] else None
        dA = _segment_reduce(x, v, plan, scale, A.dtype) if ctx.needs_input_grad[1] else None
        dB = _segment_reduce(u, dy, plan, scale, B.dtype) if ctx.needs_input_grad[2] else None
        return dx, dA, dB, None, None, None


def gathered_lora_triton(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, scale: Tensor, plan) -> Tensor:
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    return _GatheredLoRA.apply(x, A, B, idx.long().contiguous(), scale, plan)
