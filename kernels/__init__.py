"""Kernels for distillation and multi-adapter training, each as op -> module -> opt-in patch.

Every op has a pure-torch reference the tests hold the fast paths to; which implementation
runs is decided in `registry` (device, size, COGCORE_KERNEL_IMPL / COGCORE_KERNEL_<OP>).
Importing this package imports torch only; Triton, liger-kernel and bitsandbytes are loaded
on first use of an implementation that needs them.

  linear_loss  linear_cross_entropy, linear_distill_loss (+ references) without (N, V) logits
  lora         gathered_lora, MultiLoRALinear, apply_multi_lora: many adapters in one batch
  norms        rms_norm, swiglu, apply_kernels: swap one model instance's norms/MLP activation
  registry     resolve_impl, available_kernels
"""

from .linear_loss import (
    LOSSES,
    TOPK_TAILS,
    TeacherDense,
    TeacherTopK,
    cross_entropy_from_logits,
    distill_loss_from_logits,
    linear_cross_entropy,
    linear_distill_loss,
)
from .lora import (
    DEFAULT_TARGETS,
    MultiLoRALinear,
    MultiLoRAPatch,
    SegmentPlan,
    apply_multi_lora,
    gathered_lora,
    layer_index,
    plan_segments,
    resolve_layers,
    targeted_linears,
)
from .norms import KernelPatch, apply_kernels, rms_norm, swiglu
from .registry import available_kernels, describe_kernels, resolve_impl, triton_unavailable_reason

__all__ = [
    "DEFAULT_TARGETS",
    "KernelPatch",
    "LOSSES",
    "MultiLoRALinear",
    "MultiLoRAPatch",
    "SegmentPlan",
    "TOPK_TAILS",
    "TeacherDense",
    "TeacherTopK",
    "apply_kernels",
    "apply_multi_lora",
    "available_kernels",
    "cross_entropy_from_logits",
    "describe_kernels",
    "distill_loss_from_logits",
    "gathered_lora",
    "layer_index",
    "linear_cross_entropy",
    "linear_distill_loss",
    "plan_segments",
    "resolve_impl",
    "resolve_layers",
    "rms_norm",
    "swiglu",
    "targeted_linears",
    "triton_unavailable_reason",
]
