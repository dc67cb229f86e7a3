"""Cross-entropy and distillation losses on top of the lm_head, without all (N, V) logits.

Shapes: hidden (N, H) student final hidden states, weight (V, H) student lm_head weight,
targets (N,) long, weights (N,) float per-token loss weights (0 = the token does not count).
Both public losses return a fp32 SUM over tokens, sum_i w_i * loss_i; the caller divides by
its token count (so gradient accumulation across micro-batches stays exact).

Implementations (see registry.py for how one is chosen):
  reference  materialises the (N, V) logits and lets autograd do the rest; the ground truth.
  chunked    `_ChunkedLinearLoss`: forward walks `chunk_size` tokens at a time and keeps only
             the running sum; backward recomputes each chunk's logits from the saved inputs
             (nothing else is saved) and turns the analytic dloss/dlogits into grads for hidden
             and weight. The chunk math runs in place on at most five reused (chunk_size, V)
             fp32 buffers (`_Workspace`) instead of a dozen (N, V) autograd intermediates; the
             price is one extra student and one extra teacher matmul per chunk in backward.
             Rows whose weight is 0 are skipped entirely.
  triton     the same chunk loop with the dense-teacher softmax/divergence/gradient math in one
             Triton kernel per chunk (kernels/triton_linear_loss.py); top-k teachers use the
             torch chunk math. Needs CUDA, or TRITON_INTERPRET=1 on CPU (tests).

All softmax/divergence math is fp32 (float64 for float64 inputs, so gradcheck works), whatever
the input dtype; the matmuls run in the inputs' dtype. Only first derivatives are supported
(no double backward through the chunked path).

Distillation conventions (p = teacher, q = student, both at temperature T):
  forward_kl  KL(p || q)
  reverse_kl  KL(q || p)
  jsd         generalized JSD exactly as TRL's `GKDTrainer.generalized_jsd_loss`:
              m = beta * p + (1 - beta) * q,  beta * KL(p || m) + (1 - beta) * KL(q || m),
              with beta == 0 -> forward KL and beta == 1 -> reverse KL as special cases (TRL's
              own switch; note the mixture form tends to 0, not to KL, as beta -> 0).
  skew_kl     DistiLLM's skew KL: KL(p || alpha * p + (1 - alpha) * q); alpha = 0 is forward KL.
  tvd         0.5 * sum |p - q|.
The distillation term has no T**2 factor; the cross-entropy term (ce_weight) is at T = 1.

Top-k teachers (`TeacherTopK`: the teacher's top-k log-probs of its full T=1 softmax, ids
distinct per row) are compared over categories chosen by `topk_tail`:
  renorm  the k ids only: the teacher's top-k renormalised, the student's logits at those
          ids renormalised (the student gets gradient on those k logits only).
  bucket  the k ids plus one "tail" category: teacher tail mass 1 - sum(top-k) (floored at
          1e-6, so fp16 rounding of a near-complete top-k cannot make reverse-KL-type losses
          infinite), student tail = its full-softmax mass outside the ids. Needs k < V.
Temperature on a top-k teacher divides its log-probs (tail category included for bucket)
and renormalises over the categories; exact at T = 1, an approximation otherwise since the
teacher's full distribution is not available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import registry

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
TOPK_TAILS = ("renorm", "bucket")

_AUTO_CHUNK_MIN = 1 << 21  # N*V from which "auto" stops materialising logits (8 MiB in fp32)
_TAIL_FLOOR = 1e-6  # smallest teacher tail mass in "bucket" mode


@dataclass
class TeacherDense:
    """Teacher lm_head inputs; its logits hidden @ weight.T are made per chunk under no_grad."""

    hidden: Tensor  # (N, Ht)
    weight: Tensor  # (V, Ht)

    def __post_init__(self):
        if self.hidden.dim() < 2 or self.weight.dim() != 2 or self.hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"TeacherDense wants hidden (N, Ht) and weight (V, Ht), got {tuple(self.hidden.shape)} "
                f"and {tuple(self.weight.shape)}"
            )
        self.hidden = self.hidden.reshape(-1, self.hidden.shape[-1])

    def logits(self, rows=slice(None)) -> Tensor:
        with torch.no_grad():
            return self.hidden[rows] @ self.weight.T


@dataclass
class TeacherTopK:
    """The teacher's top-k ids and log-probs (of its full softmax at T = 1; fp16 is fine)."""

    ids: Tensor  # (N, k) long, distinct within a row
    logprobs: Tensor  # (N, k)

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape or self.ids.dim() < 2:
            raise ValueError(
                f"TeacherTopK wants ids and logprobs of the same shape (N, k), got {tuple(self.ids.shape)} "
                f"and {tuple(self.logprobs.shape)}"
            )
        self.ids = self.ids.reshape(-1, self.ids.shape[-1]).long()
        self.logprobs = self.logprobs.reshape(-1, self.logprobs.shape[-1])


@dataclass(frozen=True)
class _LossSpec:
    loss: str | None  # None: cross-entropy only
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    topk_tail: str = "renorm"
    ce_weight: float = 0.0
    chunk_size: int = 1024
    chunk_math: str = "torch"  # or "triton"


def _validate(loss, beta, alpha, temperature, topk_tail):
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha (skew KL) must be in [0, 1), got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk_tail not in TOPK_TAILS:
        raise ValueError(f"unknown topk_tail {topk_tail!r}; choose one of {', '.join(TOPK_TAILS)}")


def _canonical_loss(loss: str, beta: float, alpha: float) -> str:
    # TRL's switch: generalized JSD at beta 0/1 IS forward/reverse KL, not the mixture limit
    if loss == "jsd" and beta == 0.0:
        return "forward_kl"
    if loss == "jsd" and beta == 1.0:
        return "reverse_kl"
    if loss == "skew_kl" and alpha == 0.0:
        return "forward_kl"
    return loss


def _upcast(t: Tensor) -> Tensor:
    """The loss-math dtype: fp32, or float64 for float64 inputs."""
    return t if t.dtype == torch.float64 else t.float()


# ---------------------------------------------------------------- reference (autograd) math


def _kl_terms(loga: Tensor, logb: Tensor) -> Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dim; terms with a_j = 0 are 0, grads stay finite."""
    zero = torch.isneginf(loga)
    loga_safe = torch.where(zero, 0.0, loga)
    logb_safe = torch.where(zero, 0.0, logb)
    return torch.where(zero, 0.0, loga_safe.exp() * (loga_safe - logb_safe)).sum(-1)


def _divergence(loss: str, logq: Tensor, logp: Tensor, beta: float, alpha: float) -> Tensor:
    """Per-row divergence between student log-probs logq and teacher log-probs logp (autograd)."""
    loss = _canonical_loss(loss, beta, alpha)
    if loss == "forward_kl":
        return _kl_terms(logp, logq)
    if loss == "reverse_kl":
        return _kl_terms(logq, logp)
    if loss == "jsd":  # written as TRL writes it: log m by logsumexp of the two weighted terms
        logm = torch.logsumexp(torch.stack([logq + math.log1p(-beta), logp + math.log(beta)]), dim=0)
        return beta * _kl_terms(logp, logm) + (1 - beta) * _kl_terms(logq, logm)
    if loss == "skew_kl":
        logm = torch.logsumexp(torch.stack([logp + math.log(alpha), logq + math.log1p(-alpha)]), dim=0)
        return _kl_terms(logp, logm)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)  # tvd


def _teacher_topk_logprobs(ids: Tensor, logprobs: Tensor, temperature: float, topk_tail: str) -> Tensor:
    """Teacher log-probs over the compared categories: (N, k) for renorm, (N, k+1) for bucket."""
    lp = _upcast(logprobs.detach())
    if topk_tail == "bucket":
        top_mass = torch.logsumexp(lp, -1, keepdim=True).clamp_max(0.0).exp()
        lp = torch.cat([lp, (1.0 - top_mass).clamp_min(_TAIL_FLOOR).log()], dim=-1)
    return torch.log_softmax(lp / temperature, dim=-1)


def _student_topk_logprobs(z: Tensor, ids: Tensor, topk_tail: str) -> Tensor:
    """Student log-probs over the same categories as `_teacher_topk_logprobs` (autograd)."""
    if topk_tail == "renorm":
        return torch.log_softmax(z.gather(1, ids), dim=-1)
    logq = torch.log_softmax(z, dim=-1)
    tail = torch.logsumexp(logq.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logq.gather(1, ids), tail], dim=-1)


def _check_topk(teacher: TeacherTopK, n: int, vocab: int, topk_tail: str) -> None:
    if teacher.ids.shape[0] != n:
        raise ValueError(f"teacher top-k has {teacher.ids.shape[0]} rows, the student {n}")
    if topk_tail == "bucket" and teacher.ids.shape[1] >= vocab:
        raise ValueError(
            f"topk_tail='bucket' needs k < V (got k={teacher.ids.shape[1]}, V={vocab}); use 'renorm'"
        )


def distill_loss_from_logits(
    student_logits: Tensor,
    teacher_logits_or_topk: Tensor | TeacherTopK,
    *,
    loss: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    topk_tail: str = "renorm",
) -> Tensor:
    """Per-token distillation loss (N,) in fp32 from full student logits (N, V) (reference).

    The teacher is either dense logits (N, V) or a `TeacherTopK`; it never receives gradient.
    Conventions for `loss`, `beta`, `alpha`, `temperature`, `topk_tail`: see the module doc.
    """
    _validate(loss, beta, alpha, temperature, topk_tail)
    z = _upcast(student_logits) / temperature
    teacher = teacher_logits_or_topk
    if isinstance(teacher, TeacherTopK):
        _check_topk(teacher, z.shape[0], z.shape[1], topk_tail)
        logq = _student_topk_logprobs(z, teacher.ids, topk_tail)
        logp = _teacher_topk_logprobs(teacher.ids, teacher.logprobs, temperature, topk_tail)
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} != student logits {tuple(student_logits.shape)}"
            )
        logq = torch.log_softmax(z, dim=-1)
        logp = torch.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1)
    return _divergence(loss, logq, logp, beta, alpha)


def cross_entropy_from_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy (N,) in fp32 (reference); negative targets (e.g. -100) give 0."""
    logits = _upcast(logits)
    valid = targets >= 0
    picked = logits.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, torch.logsumexp(logits, dim=-1) - picked, 0.0)


def _reference_impl(hidden, weight, teacher, targets, weights, spec: _LossSpec) -> Tensor:
    logits = hidden @ weight.T  # (N, V): the memory the chunked path avoids
    per_token = _upcast(logits.new_zeros(hidden.shape[0]))
    if spec.loss is not None:
        teacher_in = teacher.logits() if isinstance(teacher, TeacherDense) else teacher
        per_token = per_token + distill_loss_from_logits(
            logits,
            teacher_in,
            loss=spec.loss,
            beta=spec.beta,
            alpha=spec.alpha,
            temperature=spec.temperature,
            topk_tail=spec.topk_tail,
        )
    if spec.ce_weight:
        per_token = per_token + spec.ce_weight * cross_entropy_from_logits(logits, targets)
    return (per_token * weights.to(per_token.dtype)).sum()


# ---------------------------------------------------------------- chunked (analytic) math


def _weighted_log_ratio(a: Tensor, loga: Tensor, logb: Tensor) -> Tensor:
    """sum_j a_j (log a_j - log b_j) with 0 where a_j = 0; no autograd, in-place temporaries."""
    out = loga - logb
    out.mul_(a).masked_fill_(a == 0, 0.0)
    return out.sum(-1)


def _log_mix(logp: Tensor, w: float, logq: Tensor) -> Tensor:
    """log(w * p + (1 - w) * q), one (c, C) temporary beyond the result."""
    out = logp + math.log(w)
    return torch.logaddexp(out, logq + math.log1p(-w), out=out)


def _divergence_and_grad(loss: str, logq: Tensor, logp: Tensor, beta: float, alpha: float, want_grad: bool):
    """(per-row divergence, g = d divergence / d logq or None) over the top-k categories,
    logq/logp (c, C) fp32, C = k or k + 1 (the dense path has its in-place twin below).

    g is the gradient with logq treated as free coordinates; the caller pushes it through
    the log-softmax (dz = g - q * sum g). Terms of g proportional to q are dropped since that
    projection removes them (e.g. the +q of d/dlogq [q log q]).
    """
    loss = _canonical_loss(loss, beta, alpha)
    p, q = logp.exp(), logq.exp()
    g = None
    if loss == "forward_kl":
        value = _weighted_log_ratio(p, logp, logq)
        if want_grad:
            g = p.neg_()
    elif loss == "reverse_kl":
        ratio = logq - logp
        value = (ratio * q).masked_fill_(q == 0, 0.0).sum(-1)
        if want_grad:
            g = ratio.mul_(q).masked_fill_(q == 0, 0.0)
    elif loss == "jsd":
        logm = _log_mix(logp, beta, logq)
        value = beta * _weighted_log_ratio(p, logp, logm) + (1 - beta) * _weighted_log_ratio(q, logq, logm)
        if want_grad:  # d/dq_j = (1 - beta) (log q_j - log m_j)
            g = logq.sub(logm).mul_(q).masked_fill_(q == 0, 0.0).mul_(1 - beta)
    elif loss == "skew_kl":
        logm = _log_mix(logp, alpha, logq)
        value = _weighted_log_ratio(p, logp, logm)
        if want_grad:  # d/dq_j = -(1 - alpha) p_j / m_j
            g = (logp + logq).sub_(logm).exp_().mul_(-(1 - alpha))
    else:  # tvd
        diff = q - p
        value = 0.5 * diff.abs().sum(-1)
        if want_grad:
            g = diff.sign_().mul_(q).mul_(0.5)
    return value, g


class _Workspace:
    """(chunk, V) buffers reused by every chunk of one forward or backward call.

    On CPU a fresh (chunk, V) tensor page-faults on every chunk (measured ~7x slower than the
    same elementwise op in place), and the number of live buffers is the path's peak memory:
    so the chunk math below runs in place on at most five named fp32 buffers.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def buf(self, name: str, c: int, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.dtype
        key = (name, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
        return self._buffers[key][:c]

    def logits(self, name: str, h: Tensor, w: Tensor) -> Tensor:
        """h @ w.T into buffer `name`, in the math dtype (via a low-precision buffer if needed)."""
        out = self.buf(name, h.shape[0])
        if h.dtype == out.dtype:
            return torch.mm(h, w.T, out=out)
        return out.copy_(torch.mm(h, w.T, out=self.buf("lowp", h.shape[0], h.dtype)))


def _log_softmax_(x: Tensor, probs: Tensor) -> Tensor:
    """In place: x <- log_softmax(x) and probs <- softmax(x), rows of (c, V). Returns lse (c, 1)."""
    m = x.amax(-1, keepdim=True)
    torch.sub(x, m, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    lse = total.log_().add_(m)
    x.sub_(lse)
    return lse


def _project_(g: Tensor, q: Tensor) -> Tensor:
    """dz = g - q * sum(g): pushes g = d/dlog q through the log-softmax, in place on g."""
    return g.addcmul_(q, g.sum(-1, keepdim=True), value=-1.0)


def _dense_divergence_(
    loss: str,
    beta: float,
    alpha: float,
    logq: Tensor,
    q: Tensor,
    logp: Tensor,
    p: Tensor,
    scratch: Tensor,
    want_grad: bool,
):
    """Full-vocab divergence from workspace buffers (all (c, V) fp32, clobbered).

    Forward (want_grad False) returns (per-row value, None); backward returns (None, dz), dz =
    d value / d z over the tempered student logits z, in one of the buffers. The logits are
    finite (they come from a matmul), so only mixtures, which can underflow to 0, are clamped.
    """
    loss = _canonical_loss(loss, beta, alpha)
    tiny = torch.finfo(q.dtype).tiny
    if loss == "forward_kl":  # sum p (log p - log q);  dz = q - p
        if not want_grad:
            return logp.sub_(logq).mul_(p).sum(-1), None
        return None, q.sub_(p)
    if loss == "reverse_kl":  # sum q (log q - log p);  g = q (log q - log p)
        g = logq.sub_(logp).mul_(q)
        return (g.sum(-1), None) if not want_grad else (None, _project_(g, q))
    if loss == "jsd":  # beta p (log p - log m) + (1 - beta) q (log q - log m), m = beta p + (1 - beta) q
        if not want_grad:
            logm = torch.lerp(p, q, 1.0 - beta, out=scratch).clamp_min_(tiny).log_()
            return beta * logp.sub_(logm).mul_(p).sum(-1) + (1 - beta) * logq.sub_(logm).mul_(q).sum(-1), None
        logm = p.lerp_(q, 1.0 - beta).clamp_min_(tiny).log_()
        g = logq.sub_(logm).mul_(q)  # d/dlog q = (1 - beta) q (log q - log m); the factor comes last
        return None, _project_(g, q).mul_(1.0 - beta)
    if loss == "skew_kl":  # sum p (log p - log m), m = alpha p + (1 - alpha) q;  g = -(1 - alpha) p q / m
        if not want_grad:
            logm = q.lerp_(p, alpha).clamp_min_(tiny).log_()
            return logp.sub_(logm).mul_(p).sum(-1), None
        m = torch.lerp(p, q, 1.0 - alpha, out=logp).clamp_min_(tiny)
        g = p.mul_(q).div_(m).mul_(-(1.0 - alpha))
        return None, _project_(g, q)
    # tvd: 0.5 sum |p - q|;  g = 0.5 q sign(q - p)
    if not want_grad:
        return p.sub_(q).abs_().sum(-1).mul_(0.5), None
    g = p.sub_(q).sign_().mul_(q).mul_(-0.5)
    return None, _project_(g, q)


def _cross_entropy_part(spec: _LossSpec, ws: _Workspace, s: Tensor, targets: Tensor, want_grad: bool):
    """CE at T = 1 from raw logits s (left intact): (per-row loss, grad (c, V) in buffer "X" or None)."""
    valid = targets >= 0
    tgt = targets.clamp_min(0).unsqueeze(1)
    probs = ws.buf("X", s.shape[0])
    m = s.amax(-1, keepdim=True)
    torch.sub(s, m, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    loss = (total.log() + m - s.gather(1, tgt)).squeeze(1).masked_fill_(~valid, 0.0) * spec.ce_weight
    if not want_grad:
        return loss, None
    keep = valid.to(s.dtype).unsqueeze(1)
    grad = probs.div_(total).scatter_add_(1, tgt, -keep).mul_(keep * spec.ce_weight)  # softmax - onehot
    return loss, grad


def _topk_distill(spec: _LossSpec, z: Tensor, ids: Tensor, logp: Tensor, want_grad: bool):
    """Top-k teacher over its categories (see the module doc); z = tempered student logits (c, V).

    The category tensors are only (c, k); the (c, V) temporaries here allocate, which is fine
    for the top-k path (not the one the workspace is tuned for)."""
    if spec.topk_tail == "renorm":
        logr = torch.log_softmax(z.gather(1, ids), dim=-1)
        value, g = _divergence_and_grad(spec.loss, logr, logp, spec.beta, spec.alpha, want_grad)
        dz = (
            torch.zeros_like(z).scatter_(1, ids, g - logr.exp() * g.sum(-1, keepdim=True))
            if want_grad
            else None
        )
        return value, dz
    # bucket: categories = the k ids + everything else
    logq = torch.log_softmax(z, dim=-1)
    top = logq.gather(1, ids)
    tail = torch.logsumexp(logq.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
    value, g = _divergence_and_grad(
        spec.loss, torch.cat([top, tail], -1), logp, spec.beta, spec.alpha, want_grad
    )
    if not want_grad:
        return value, None
    # d log c_A / dz_v = [v in A] q_v / c_A - q_v, so for v in the tail
    # dz_v = g_tail * q_v / c_tail - q_v * G, and for v in ids dz_v = g_v - q_v * G
    G = g.sum(-1, keepdim=True)
    dz = (logq - tail).exp_().mul_(g[:, -1:])
    dz.sub_(logq.exp_().mul_(G))
    dz.scatter_(1, ids, g[:, :-1] - top.exp() * G)
    return value, dz


@dataclass
class _TeacherInputs:
    hidden: Tensor | None = None  # dense: (N, Ht)
    weight: Tensor | None = None  # dense: (V, Ht)
    ids: Tensor | None = None  # top-k: (N, k)
    logprobs: Tensor | None = None  # top-k: (N, k)


def _chunk_loss_and_grad(
    spec: _LossSpec,
    ws: _Workspace,
    h: Tensor,
    weight: Tensor,
    teacher: _TeacherInputs,
    rows,
    targets: Tensor | None,
    want_grad: bool,
):
    """One chunk: (per-row loss (c,) or None in backward, dloss/ds (c, V) or None in forward).

    Forward computes values only, backward gradients only (the loss is already known)."""
    s = ws.logits("S", h, weight)  # (c, V) student logits
    if spec.chunk_math == "triton" and (spec.loss is None or teacher.hidden is not None):
        from .triton_linear_loss import launch_chunk_kernel

        t = ws.logits("P", teacher.hidden[rows], teacher.weight) if spec.loss is not None else None
        loss = launch_chunk_kernel(spec, s, t, targets, want_grad)
        return (None, s) if want_grad else (loss, None)

    loss, grad = (None, None)
    if spec.ce_weight:
        loss, grad = _cross_entropy_part(spec, ws, s, targets, want_grad)
    if spec.loss is None:
        return loss, grad
    inv_t = 1.0 / spec.temperature
    z = s.mul_(inv_t) if spec.temperature != 1.0 else s
    if teacher.hidden is not None:
        q = ws.buf("Q", z.shape[0])
        _log_softmax_(z, q)  # z <- log q
        t = ws.logits("P", teacher.hidden[rows], teacher.weight)
        p = ws.buf("R", z.shape[0])
        _log_softmax_(t.mul_(inv_t) if spec.temperature != 1.0 else t, p)  # t <- log p
        scratch = None if want_grad else ws.buf("X", z.shape[0])  # in backward "X" may hold the CE grad
        value, dz = _dense_divergence_(spec.loss, spec.beta, spec.alpha, z, q, t, p, scratch, want_grad)
    else:
        ids = teacher.ids[rows]
        logp = _teacher_topk_logprobs(ids, teacher.logprobs[rows], spec.temperature, spec.topk_tail)
        value, dz = _topk_distill(spec, z, ids, logp, want_grad)
    if not want_grad:
        return (value if loss is None else loss.add_(value)), None
    dz = dz.mul_(inv_t) if spec.temperature != 1.0 else dz
    return None, (dz if grad is None else dz.add_(grad))


def _scaled_chunk_grad(ws: _Workspace, ds: Tensor, w: Tensor, grad_out, weight: Tensor) -> Tensor:
    """d loss_i / d s_i (c, V) times each row's weight and the upstream gradient, in place,
    then in ``weight``'s dtype (via the low-precision buffer) for the matmuls that follow."""
    ds = ds.mul_((w.to(ds.dtype) * grad_out).unsqueeze(1))
    if ds.dtype != weight.dtype:
        ds = ws.buf("lowp", ds.shape[0], weight.dtype).copy_(ds)
    return ds


def _row_chunks(rows: Tensor, n: int, chunk_size: int) -> list:
    """Chunks of the rows that count: slices when all n count (no gather), else index tensors."""
    if rows.numel() == n:
        return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    return list(rows.split(chunk_size))


class _ChunkedLinearLoss(torch.autograd.Function):
    """sum_i w_i * loss_i over chunks of rows; saves only its inputs, recomputes in backward.

    One exception: cross-entropy alone with a frozen ``weight`` (a LoRA or any frozen lm_head)
    whose ``hidden`` needs a gradient. There the chunk's softmax already holds the gradient, so
    forward computes d loss / d hidden as it goes and saves that (N, H) instead; backward only
    scales it. That skips the recomputed chunk logits, a third of the lm_head's matmuls.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, t_hidden, t_weight, t_ids, t_logprobs, targets, weights, spec: _LossSpec
    ):
        rows = torch.nonzero(weights).squeeze(1)  # tokens with weight 0 are never computed
        teacher = _TeacherInputs(t_hidden, t_weight, t_ids, t_logprobs)
        ws = _Workspace(
            min(spec.chunk_size, max(rows.numel(), 1)),
            weight.shape[0],
            _upcast(hidden[:0]).dtype,
            hidden.device,
        )
        grad_now = (spec.loss is None and spec.chunk_math != "triton"
                    and ctx.needs_input_grad[0] and not ctx.needs_input_grad[1])
        grad_h = torch.zeros_like(hidden) if grad_now else None
        total = _upcast(hidden.new_zeros(()))
        for r in _row_chunks(rows, weights.shape[0], spec.chunk_size):
            tgt = targets[r] if targets is not None else None
            if grad_now:
                loss_rows, ds = _cross_entropy_part(spec, ws, ws.logits("S", hidden[r], weight), tgt, want_grad=True)
                grad_h[r] = (_scaled_chunk_grad(ws, ds, weights[r], 1.0, weight) @ weight).to(hidden.dtype)
            else:
                loss_rows, _ = _chunk_loss_and_grad(spec, ws, hidden[r], weight, teacher, r, tgt, want_grad=False)
            total += (loss_rows * weights[r].to(loss_rows.dtype)).sum()
        ctx.spec = spec
        if grad_now:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(hidden, weight, t_hidden, t_weight, t_ids, t_logprobs, targets, weights, rows)
        ctx.grad_now = grad_now
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grad_now:  # d loss / d hidden was made in forward (frozen weight, cross-entropy only)
            grad_h, = ctx.saved_tensors
            return (grad_h * grad_out.to(grad_h.dtype),) + (None,) * 8
        hidden, weight, t_hidden, t_weight, t_ids, t_logprobs, targets, weights, rows = ctx.saved_tensors
        spec = ctx.spec
        teacher = _TeacherInputs(t_hidden, t_weight, t_ids, t_logprobs)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = _upcast(weight.new_zeros(weight.shape)) if need_w else None
        ws = _Workspace(
            min(spec.chunk_size, max(rows.numel(), 1)),
            weight.shape[0],
            _upcast(hidden[:0]).dtype,
            hidden.device,
        )
        for r in _row_chunks(rows, weights.shape[0], spec.chunk_size):
            h = hidden[r]
            tgt = targets[r] if targets is not None else None
            # the chunk's logits are recomputed in there: (c, V) never outlives its chunk
            _, ds = _chunk_loss_and_grad(spec, ws, h, weight, teacher, r, tgt, want_grad=True)
            ds = _scaled_chunk_grad(ws, ds, weights[r], grad_out, weight)
            if need_h:
                grad_h[r] = (ds @ weight).to(hidden.dtype)
            if need_w:
                if ds.dtype == grad_w.dtype:
                    grad_w.addmm_(ds.T, h)
                else:
                    grad_w += _upcast(ds.T @ h)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _chunked_impl(hidden, weight, teacher, targets, weights, spec: _LossSpec) -> Tensor:
    t_hidden = t_weight = t_ids = t_logprobs = None
    if isinstance(teacher, TeacherDense):
        t_hidden, t_weight = teacher.hidden.detach(), teacher.weight.detach()
    elif isinstance(teacher, TeacherTopK):
        t_ids, t_logprobs = teacher.ids, teacher.logprobs.detach()
    return _ChunkedLinearLoss.apply(
        hidden, weight, t_hidden, t_weight, t_ids, t_logprobs, targets, weights, spec
    )


def _triton_impl(hidden, weight, teacher, targets, weights, spec: _LossSpec) -> Tensor:
    return _chunked_impl(hidden, weight, teacher, targets, weights, replace(spec, chunk_math="triton"))


def _auto_policy(device, size):
    if size is not None and size < _AUTO_CHUNK_MIN:
        return ("reference",)
    if device is not None and torch.device(device).type == "cuda":
        return ("triton", "chunked")
    return ("chunked",)


for _op in ("linear_cross_entropy", "linear_distill"):
    registry.register(_op, "reference", _reference_impl)
    registry.register(_op, "chunked", _chunked_impl)
    registry.register(_op, "triton", _triton_impl, requires=("triton",))
    registry.register_auto(_op, _auto_policy)


# ---------------------------------------------------------------- public API


def _flatten(hidden: Tensor, weight: Tensor, targets: Tensor | None, weights: Tensor):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
        )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weights = _upcast(weights.reshape(-1).to(device=hidden.device))
    if weights.shape[0] != hidden.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} entries for {hidden.shape[0]} tokens")
    if targets is not None:
        targets = targets.reshape(-1)
        if targets.shape[0] != hidden.shape[0]:
            raise ValueError(f"targets has {targets.shape[0]} entries for {hidden.shape[0]} tokens")
    return hidden, targets, weights


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    chunk_size: int = 1024,
    impl: str = "auto",
) -> Tensor:
    """sum_i weights_i * CE(hidden_i @ weight.T, targets_i), a fp32 scalar (a SUM, not a mean).

    impl: "auto" (reference for small N*V, else chunked; triton on CUDA), "reference",
    "chunked" or "triton". Negative targets contribute 0.
    """
    hidden, targets, weights = _flatten(hidden, weight, targets, weights)
    spec = _LossSpec(loss=None, ce_weight=1.0, chunk_size=chunk_size)
    fn = registry.get_kernel(
        "linear_cross_entropy", impl, device=hidden.device, size=hidden.shape[0] * weight.shape[0]
    )
    return fn(hidden, weight, None, targets, weights, spec)


def linear_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher: TeacherDense | TeacherTopK,
    weights: Tensor,
    *,
    loss: str = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    topk_tail: str = "renorm",
    ce_weight: float = 0.0,
    targets: Tensor | None = None,
    chunk_size: int = 1024,
    impl: str = "auto",
) -> Tensor:
    """sum_i weights_i * (D_i + ce_weight * CE_i), a fp32 scalar (a SUM, not a mean).

    D_i is the divergence `loss` between the teacher and the student's softmax of
    hidden_i @ weight.T at `temperature`; CE_i the cross-entropy with `targets` at T = 1.
    Conventions (loss names, beta, alpha, temperature, topk_tail): see the module docstring.
    Gradients reach `hidden` and `weight`, never the teacher.
    """
    _validate(loss, beta, alpha, temperature, topk_tail)
    if ce_weight and targets is None:
        raise ValueError("ce_weight > 0 needs targets")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, targets, weights = _flatten(hidden, weight, targets, weights)
    if isinstance(teacher, TeacherDense):
        if teacher.hidden.shape[0] != hidden.shape[0] or teacher.weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"teacher hidden {tuple(teacher.hidden.shape)} / weight {tuple(teacher.weight.shape)} do not match "
                f"the student's {hidden.shape[0]} tokens and vocab {weight.shape[0]}"
            )
    elif isinstance(teacher, TeacherTopK):
        _check_topk(teacher, hidden.shape[0], weight.shape[0], topk_tail)
    else:
        raise TypeError(f"teacher must be TeacherDense or TeacherTopK, got {type(teacher).__name__}")
    spec = _LossSpec(loss, beta, alpha, temperature, topk_tail, ce_weight, chunk_size)
    fn = registry.get_kernel(
        "linear_distill", impl, device=hidden.device, size=hidden.shape[0] * weight.shape[0]
    )
    return fn(hidden, weight, teacher, targets, weights, spec)
