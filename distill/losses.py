"""The distillation objective on top of the lean (chunked) loss kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..kernels import TeacherDense, TeacherTopK, linear_distill_loss
from ..train.config import field
from ..train.lm import decoder_hidden, output_weight


@dataclass
class LossConfig:
    kind: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = field(
        "jsd", help="divergence between teacher p and student q: KL(p||q), KL(q||p), generalized JSD(beta), "
                    "skew KL(alpha) = KL(p || alpha p + (1-alpha) q), or total variation")
    beta: float = field(0.5, help="JSD interpolation, as TRL: 0 = forward KL, 1 = reverse KL")
    alpha: float = field(0.1, help="skew KL mixing weight (DistiLLM)")
    temperature: float = field(1.0, help="softmax temperature applied to teacher and student logits")
    ce_weight: float = field(0.0, help="weight of an extra hard-label cross-entropy term on the data's next tokens")
    topk_tail: Literal["renorm", "bucket"] = field(
        "bucket", help="cached top-k teacher: renormalise over the k ids, or keep the rest as one tail bucket")
    chunk_size: int = field(1024, help="tokens per chunk of the lean loss (the [tokens x vocab] logits never exist whole)")

    def __post_init__(self):
        if not 0 <= self.beta <= 1:
            raise ValueError(f"loss.beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"loss.alpha must be in [0, 1), got {self.alpha}: skew KL compares the teacher with "
                             "alpha*teacher + (1-alpha)*student, so alpha=1 leaves no student in the loss; "
                             "alpha=0 is forward KL")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0:
            raise ValueError(f"loss.ce_weight must be >= 0, got {self.ce_weight}")


def teacher_of(batch: dict, keep: torch.Tensor, teacher_weight: torch.Tensor | None):
    """The teacher's view of the kept positions: dense hidden states or cached top-k."""
    if "teacher_hidden" in batch:
        th = batch["teacher_hidden"]
        return TeacherDense(th.reshape(-1, th.shape[-1])[keep], teacher_weight)
    if "teacher_topk_ids" in batch:
        ids, lps = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"]
        k = ids.shape[-1]
        return TeacherTopK(ids.reshape(-1, k)[keep], lps.reshape(-1, k)[keep])
    raise ValueError("the batch carries no teacher outputs (teacher_hidden or teacher_topk_*)")


class DistillLoss(nn.Module):
    """Σ w_i · (D(teacher_i ‖ student_i) + ce_weight · CE_i) over positions with weight > 0."""

    def __init__(self, student: nn.Module, cfg: LossConfig, teacher_weight: torch.Tensor | None = None):
        super().__init__()
        self.model = student
        self.cfg = cfg
        # Not a registered parameter/buffer: never trained, sharded or checkpointed.
        self._teacher_weight = [teacher_weight]

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        hidden = decoder_hidden(self.model, batch)
        H = hidden.shape[-1]
        w = batch["target_weights"].reshape(-1)
        keep = w > 0
        loss_sum = linear_distill_loss(
            hidden.reshape(-1, H)[keep], output_weight(self.model), teacher_of(batch, keep, self._teacher_weight[0]),
            w[keep], loss=c.kind, beta=c.beta, alpha=c.alpha, temperature=c.temperature, topk_tail=c.topk_tail,
            ce_weight=c.ce_weight, targets=batch["target_ids"].reshape(-1)[keep], chunk_size=c.chunk_size)
        return {"loss_sum": loss_sum, "weight": w.sum()}


@torch.no_grad()
def heldout_kl(student: nn.Module, batches: list[dict], teacher_weight: torch.Tensor | None,
               topk_tail: str = "bucket") -> float:
    """Token-weighted forward KL(teacher ‖ student) at T=1 on held-out batches.

    Exact with a live teacher; with a cached top-k teacher it is the KL between the two
    distributions coarse-grained to (top-k ids + one tail bucket), a lower bound of the exact KL
    (``topk_tail="bucket"``), or between the two renormalised over the k ids (``"renorm"``),
    an approximation that is no bound.
    """
    was = student.training
    student.eval()
    total, weight = 0.0, 0.0
    for batch in batches:
        hidden = decoder_hidden(student, batch)
        w = batch["target_weights"].reshape(-1)
        keep = w > 0
        ones = torch.ones(int(keep.sum()), device=w.device)
        total += float(linear_distill_loss(hidden.reshape(-1, hidden.shape[-1])[keep], output_weight(student),
                                           teacher_of(batch, keep, teacher_weight), ones, loss="forward_kl",
                                           topk_tail=topk_tail))
        weight += float(ones.sum())
    student.train(was)
    return total / max(weight, 1e-9)
