"""Which implementation of each kernel op runs.

Every op (``linear_cross_entropy``, ``linear_distill``, ``gathered_lora``, ``rms_norm``,
``swiglu``) has a pure-torch ``reference`` and one or more faster implementations. The op
modules register them here at import; callers ask ``resolve_impl(op, impl, device=...)``.

Choice, first match wins:
  1. the ``impl`` argument when it is not ``"auto"``;
  2. ``COGCORE_KERNEL_<OP>=<impl>`` (e.g. ``COGCORE_KERNEL_LINEAR_DISTILL=reference``);
  3. ``COGCORE_KERNEL_IMPL=<impl>`` for every op that has an impl of that name (ops without
     one, e.g. ``chunked`` for ``rms_norm``, keep their automatic choice);
  4. the op's automatic policy (device + problem size), skipping what is unavailable.
A forced impl (1-3) that cannot run here raises with the reason instead of falling back, so a
benchmark or a test never measures something other than what it asked for.

Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before triton was imported (tests only: the interpreter is 100-1000x slower). Triton is
never imported here; only ``find_spec`` is used, so importing cogcore.kernels stays cheap
and does not fix triton's interpreter mode for the process.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

IMPL_ENV = "COGCORE_KERNEL_IMPL"

# policy(device, size) -> impl names in order of preference; "reference" is always last
AutoPolicy = Callable[[torch.device | None, int | None], Sequence[str]]


@dataclass(frozen=True)
class KernelImpl:
    op: str
    name: str
    fn: Callable
    requires: tuple[str, ...] = ()  # any of "triton", "liger"


_TABLE: dict[str, dict[str, KernelImpl]] = {}
_AUTO: dict[str, AutoPolicy] = {}


def register(op: str, name: str, fn: Callable, *, requires: Sequence[str] = ()) -> None:
    _TABLE.setdefault(op, {})[name] = KernelImpl(op, name, fn, tuple(requires))


def register_auto(op: str, policy: AutoPolicy) -> None:
    _AUTO[op] = policy


def env_var(op: str) -> str:
    return f"COGCORE_KERNEL_{op.upper()}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when Triton kernels can run on `device` (default: CUDA if present), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if dev is not None and dev.type != "cpu":
        return f"no Triton path for device {dev.type!r}"
    if _interpreting():
        return None
    if dev is None and torch.cuda.is_available():
        return None
    return (
        "triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
        "before triton is imported (slow, for tests only)"
    )


def _unavailable_reason(impl: KernelImpl, device) -> str | None:
    for need in impl.requires:
        if need == "liger" and importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        if need in ("triton", "liger"):
            reason = triton_unavailable_reason(device)
            if reason:
                return reason
    return None


def _check_op(op: str) -> dict[str, KernelImpl]:
    if op not in _TABLE:
        raise KeyError(f"unknown kernel op {op!r}; known ops: {', '.join(sorted(_TABLE))}")
    return _TABLE[op]


def resolve_impl(op: str, impl: str = "auto", *, device=None, size: int | None = None) -> str:
    """Name of the implementation of `op` to run (see the module docstring for the order).

    `device` is where the op's tensors live; `size` a rough problem size the automatic
    policy may use (e.g. N*V for the linear losses).
    """
    impls = _check_op(op)
    forced, source = None, None
    if impl != "auto":
        forced, source = impl, f"impl={impl!r}"
    elif os.environ.get(env_var(op), "auto") != "auto":
        forced, source = os.environ[env_var(op)], f"{env_var(op)}={os.environ[env_var(op)]}"
    elif os.environ.get(IMPL_ENV, "auto") in impls:
        forced, source = os.environ[IMPL_ENV], f"{IMPL_ENV}={os.environ[IMPL_ENV]}"
    if forced is not None:
        if forced not in impls:
            raise ValueError(
                f"{op} has no implementation {forced!r} (asked by {source}); choose one of: {', '.join(impls)}"
            )
        reason = _unavailable_reason(impls[forced], device)
        if reason:
            raise RuntimeError(
                f"{op}: implementation {forced!r} (asked by {source}) cannot run here: {reason}"
            )
        return forced
    policy = _AUTO.get(op, lambda device, size: ())
    for name in (*policy(device, size), "reference"):
        if name in impls and _unavailable_reason(impls[name], device) is None:
            return name
    raise RuntimeError(f"{op}: no implementation can run here")  # reference never needs anything


def get_kernel(op: str, impl: str = "auto", *, device=None, size: int | None = None) -> Callable:
    return _check_op(op)[resolve_impl(op, impl, device=device, size=size)].fn


def available_kernels(device=None) -> dict[str, list[str]]:
    """Op name -> the implementations that can run here (on `device`, default CUDA if present)."""
    return {
        op: [name for name, impl in impls.items() if _unavailable_reason(impl, device) is None]
        for op, impls in sorted(_TABLE.items())
    }


def describe_kernels(device=None) -> list[tuple[str, str, str]]:
    """(op, impl, "ok" or why it cannot run) for every registered implementation, for printing."""
    return [
        (op, name, _unavailable_reason(impl, device) or "ok")
        for op, impls in sorted(_TABLE.items())
        for name, impl in impls.items()
    ]
