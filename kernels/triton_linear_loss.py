"""Triton chunk math for the linear losses: softmax, divergence and dlogits in one kernel.

The chunked loop in linear_loss.py still does the matmuls (cuBLAS does them best); this
replaces its ~15 torch passes over each (c, V) chunk with one program per row that streams
the row three times: (1) online max/sum-exp for student, teacher and, for CE at T != 1,
the untempered student; (2) loss terms and G = sum_j g_j; (3) dloss/dlogits written over
the student logits in place. Dense teachers and CE only: top-k teachers use the torch chunk
math. Imported only when impl="triton" is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOSS_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "tvd": 4}
NEG_INF: tl.constexpr = float("-inf")


@triton.jit
def _online_update(m, total, x):
    # per-lane running max m and sum of exp(x - m); all -inf lanes stay (m=-inf, 0), no NaN
    m_new = tl.maximum(m, x)
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    return m_new, total * tl.exp(m - m_safe) + tl.exp(x - m_safe)


@triton.jit
def _lse_finish(m, total):
    m_all = tl.max(m, axis=0)  # finite: every row has a finite logit
    return m_all + tl.log(tl.sum(total * tl.exp(m - m_all), axis=0))


@triton.jit
def _chunk_kernel(
    S,
    T,
    TGT,
    LOSS,
    stride_s,
    stride_t,
    V,
    inv_temp,
    beta,
    alpha,
    ce_weight,
    LOSS_KIND: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    HAS_CE: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)

    # pass 1: log-sum-exps
    mz = tl.full([BLOCK], NEG_INF, tl.float32)
    lz = tl.zeros([BLOCK], tl.float32)
    mt = tl.full([BLOCK], NEG_INF, tl.float32)
    lt = tl.zeros([BLOCK], tl.float32)
    ms = tl.full([BLOCK], NEG_INF, tl.float32)
    ls = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        vs = v0 + cols
        s = tl.load(s_row + vs, mask=vs < V, other=NEG_INF)
        if HAS_TEACHER:
            mz, lz = _online_update(mz, lz, s * inv_temp)
            mt, lt = _online_update(mt, lt, tl.load(t_row + vs, mask=vs < V, other=NEG_INF) * inv_temp)
        if HAS_CE:
            ms, ls = _online_update(ms, ls, s)
    if HAS_TEACHER:
        lse_z = _lse_finish(mz, lz)
        lse_t = _lse_finish(mt, lt)
    if HAS_CE:
        lse_s = _lse_finish(ms, ls)

    loss = 0.0
    if HAS_CE:
        tgt = tl.load(TGT + row)
        valid = tgt >= 0
        s_tgt = tl.load(s_row + tl.maximum(tgt, 0))
        loss = tl.where(valid, ce_weight * (lse_s - s_tgt), 0.0)

    # pass 2: divergence and G = sum_j g_j, g = d loss / d log q
    if HAS_TEACHER:
        acc = tl.zeros([BLOCK], tl.float32)
        gsum = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            vs = v0 + cols
            mask = vs < V
            logq = tl.load(s_row + vs, mask=mask, other=0.0) * inv_temp - lse_z
            logp = tl.load(t_row + vs, mask=mask, other=0.0) * inv_temp - lse_t
            term, g = _terms(logq, logp, beta, alpha, LOSS_KIND)
            acc += tl.where(mask, term, 0.0)
            gsum += tl.where(mask, g, 0.0)
        loss += tl.sum(acc, axis=0)
        G = tl.sum(gsum, axis=0)
    tl.store(LOSS + row, loss)

    # pass 3: dloss/ds over the logits: (g - q G) / T  +  ce_weight (softmax(s) - onehot)
    if WANT_GRAD:
        for v0 in range(0, V, BLOCK):
            vs = v0 + cols
            mask = vs < V
            s = tl.load(s_row + vs, mask=mask, other=0.0)
            ds = tl.zeros([BLOCK], tl.float32)
            if HAS_TEACHER:
                logq = s * inv_temp - lse_z
                logp = tl.load(t_row + vs, mask=mask, other=0.0) * inv_temp - lse_t
                term, g = _terms(logq, logp, beta, alpha, LOSS_KIND)
                ds = (g - tl.exp(logq) * G) * inv_temp
            if HAS_CE:
                onehot = tl.where((vs == tgt) & valid, 1.0, 0.0)
                ds += tl.where(valid, ce_weight * (tl.exp(s - lse_s) - onehot), 0.0)
            tl.store(s_row + vs, ds, mask=mask)


@triton.jit
def _terms(logq, logp, beta, alpha, LOSS_KIND: tl.constexpr):
    """Per-entry loss term and g_j = d loss / d log q_j (terms of g proportional to q dropped)."""
    q = tl.exp(logq)
    p = tl.exp(logp)
    if LOSS_KIND == 0:  # forward KL
        term = tl.where(p > 0, p * (logp - logq), 0.0)
        g = -p
    elif LOSS_KIND == 1:  # reverse KL
        term = tl.where(q > 0, q * (logq - logp), 0.0)
        g = term
    elif LOSS_KIND == 2:  # generalized JSD (TRL): m = beta p + (1 - beta) q
        logm = tl.log(beta * p + (1.0 - beta) * q)
        term = tl.where(p > 0, beta * p * (logp - logm), 0.0) + tl.where(
            q > 0, (1.0 - beta) * q * (logq - logm), 0.0
        )
        g = tl.where(q > 0, (1.0 - beta) * q * (logq - logm), 0.0)
    elif LOSS_KIND == 3:  # skew KL: m = alpha p + (1 - alpha) q
        m = alpha * p + (1.0 - alpha) * q
        term = tl.where(p > 0, p * (logp - tl.log(m)), 0.0)
        g = tl.where(m > 0, -(1.0 - alpha) * p * q / m, 0.0)
    else:  # TVD
        diff = q - p
        term = 0.5 * tl.abs(diff)
        g = 0.5 * q * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return term, g


def launch_chunk_kernel(spec, s: Tensor, t: Tensor | None, targets: Tensor | None, want_grad: bool) -> Tensor:
    """Per-row loss (c,) from fp32 student logits s (c, V) and teacher logits t; with want_grad,
    s is overwritten by dloss/ds. Three streamed passes over each row (see the module doc)."""
    c, V = s.shape
    has_teacher = spec.loss is not None
    has_ce = bool(spec.ce_weight)
    tgt = targets.contiguous() if has_ce else torch.zeros(1, dtype=torch.long, device=s.device)
    t = t if has_teacher else s  # dummy pointer when absent
    loss = torch.empty(c, dtype=torch.float32, device=s.device)
    loss_kind = _LOSS_CODES[_canonical(spec)] if has_teacher else 0
    block = min(triton.next_power_of_2(V), 2048 if s.is_cuda else 256)
    if c:
        _chunk_kernel[(c,)](
            s,
            t,
            tgt,
            loss,
            s.stride(0),
            t.stride(0),
            V,
            1.0 / spec.temperature,
            spec.beta,
            spec.alpha,
            float(spec.ce_weight),
            LOSS_KIND=loss_kind,
            HAS_TEACHER=has_teacher,
            HAS_CE=has_ce,
            WANT_GRAD=want_grad,
            BLOCK=block,
            **({"num_warps": 8} if s.is_cuda else {}),
        )
    return loss


def _canonical(spec) -> str:
    from .linear_loss import _canonical_loss

    return _canonical_loss(spec.loss, spec.beta, spec.alpha)
