"""Triton RMSNorm and SwiGLU (forward + backward). Imported only when impl="triton" is used.

Math in fp32, results in the input dtype, matching HF's LlamaRMSNorm rounding: the
normalised row is cast to x's dtype before the weight multiplies it. CPU tensors work under
TRITON_INTERPRET=1 (tests); kernels avoid libdevice so that the interpreter can run them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # HF rounds here
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    # each program: a run of rows; dx row by row, dw accumulated and written once per program
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            g = dy * w  # dL/dxhat (the cast to x's dtype passes the gradient through)
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _n_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)  # interpreter: few programs, each looping over rows


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as `weight * h.to(x.dtype)` does
        y = torch.empty(n_rows, n_cols, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows:
            _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        programs = max(_n_programs(n_rows, x2.device), 1)
        rows_per = triton.cdiv(n_rows, programs)
        dw_partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_partial,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                rows_per,
                BLOCK=triton.next_power_of_2(n_cols),
            )
        return dx.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _RMSNorm.apply(x, weight, float(eps))


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g, dtype=torch.promote_types(g.dtype, u.dtype))
        n = g.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, y, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](dy, g, u, dg, du, n, BLOCK=_SWIGLU_BLOCK)
        return dg, du


def swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    return _SwiGLU.apply(gate, up)
