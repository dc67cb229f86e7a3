"""RMSNorm and SwiGLU, and an opt-in swap of ONE model instance's modules onto them.

  rms_norm(x, weight, eps)  = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype), the statistics
                              in fp32: exactly HF's LlamaRMSNorm / Qwen2RMSNorm forward.
  swiglu(gate, up)          = silu(gate) * up, the activation inside LlamaMLP / Qwen2MLP.

Implementations (registry ops "rms_norm", "swiglu"): "reference" (torch, the HF math),
"triton" (kernels/triton_norms.py, forward + backward), "liger" (liger-kernel's ops, when
installed; CUDA only in practice: under Triton's CPU interpreter its kernels trip over the
interpreter's float-argument and libdevice gaps). Liger's SwiGLU backward writes the
gradients into `gate` and `up`: fine inside an MLP, where they are fresh activations, but do
not pass it tensors you still need.

`apply_kernels(model)` replaces the `forward` of this model's RMSNorm and MLP modules with
one calling these ops. It sets an instance attribute, so the class and every other model
(a teacher next to its student, a model built later) are untouched, and the returned
patch object undoes it exactly.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import registry

# Modules whose forward is exactly `rms_norm` / `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
# (Gemma's norms scale by 1 + weight and are deliberately absent.)
RMSNORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
KERNEL_NAMES = ("rms_norm", "swiglu")


def _rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    from .triton_norms import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def _swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    from .triton_norms import swiglu_triton

    return swiglu_triton(gate, up)


def _rms_norm_liger(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # in_place=False: Liger would otherwise overwrite the incoming gradient buffer
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def _swiglu_liger(gate: Tensor, up: Tensor) -> Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def _cuda_prefers_triton(device, size):
    return ("triton",) if device is not None and torch.device(device).type == "cuda" else ()


registry.register("rms_norm", "reference", _rms_norm_reference)
registry.register("rms_norm", "triton", _rms_norm_triton, requires=("triton",))
registry.register("rms_norm", "liger", _rms_norm_liger, requires=("liger",))
registry.register_auto("rms_norm", _cuda_prefers_triton)
registry.register("swiglu", "reference", _swiglu_reference)
registry.register("swiglu", "triton", _swiglu_triton, requires=("triton",))
registry.register("swiglu", "liger", _swiglu_liger, requires=("liger",))
registry.register_auto("swiglu", _cuda_prefers_triton)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, impl: str = "auto") -> Tensor:
    """HF Llama RMSNorm over the last dim of x; weight (H,). impl: auto/reference/triton/liger."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    return registry.get_kernel("rms_norm", impl, device=x.device)(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor, *, impl: str = "auto") -> Tensor:
    """silu(gate) * up, elementwise. impl: auto/reference/triton/liger."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return registry.get_kernel("swiglu", impl, device=gate.device)(gate, up)


# ---------------------------------------------------------------- per-instance patching


def _norm_forward(fn):
    def forward(self, hidden_states: Tensor) -> Tensor:
        return fn(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _mlp_forward(fn):
    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))

    return forward


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        type(module).__name__ in MLP_CLASSES
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    )


class KernelPatch:
    """Returned by `apply_kernels`: `.modules` maps module name -> op; call it to undo."""

    _MISSING = object()

    def __init__(self):
        self.modules: dict[str, str] = {}
        self.impls: dict[str, str] = {}
        self._saved: list[tuple[nn.Module, object]] = []

    def _swap(self, name: str, module: nn.Module, op: str, forward) -> None:
        self._saved.append((module, module.__dict__.get("forward", self._MISSING)))
        module.forward = types.MethodType(forward, module)  # instance attribute: this module only
        self.modules[name] = op

    def __call__(self) -> None:
        for module, previous in reversed(self._saved):
            if previous is self._MISSING:
                del module.forward
            else:
                module.forward = previous
        self._saved = []
        self.modules = {}


def apply_kernels(model: nn.Module, names: Sequence[str] = KERNEL_NAMES, impl: str = "auto") -> KernelPatch:
    """Route THIS model's RMSNorm modules ("rms_norm") and SwiGLU MLPs ("swiglu") through the
    kernel ops. The impl is resolved once, now, for the model's device (so a forced impl that
    cannot run fails here, not mid-step). Returns a `KernelPatch`; call it to undo.
    """
    unknown = set(names) - set(KERNEL_NAMES)
    if unknown:
        raise ValueError(f"unknown kernel names {sorted(unknown)}; choose from {KERNEL_NAMES}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    patch = KernelPatch()
    for op in names:
        patch.impls[op] = registry.resolve_impl(op, impl, device=device)
    norm_fn = registry.get_kernel("rms_norm", patch.impls["rms_norm"]) if "rms_norm" in names else None
    act_fn = registry.get_kernel("swiglu", patch.impls["swiglu"]) if "swiglu" in names else None
    for name, module in model.named_modules():
        if norm_fn is not None and type(module).__name__ in RMSNORM_CLASSES:
            patch._swap(name, module, "rms_norm", _norm_forward(norm_fn))
        elif act_fn is not None and _is_swiglu_mlp(module):
            patch._swap(name, module, "swiglu", _mlp_forward(act_fn))
    for op in names:
        if op not in patch.modules.values():
            patch()
            wanted = RMSNORM_CLASSES if op == "rms_norm" else MLP_CLASSES
            raise ValueError(
                f"apply_kernels: {type(model).__name__} has no module for {op!r} (looked for {', '.join(wanted)})"
            )
    return patch
