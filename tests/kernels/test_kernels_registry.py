"""Implementation choice: argument > COGCORE_KERNEL_<OP> > COGCORE_KERNEL_IMPL > auto policy."""

import subprocess
import sys

import pytest
import torch

import cogcore.kernels  # noqa: F401  (registers every op)
from cogcore.kernels import available_kernels, describe_kernels, resolve_impl

OPS = {"linear_cross_entropy", "linear_distill", "gathered_lora", "rms_norm", "swiglu"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("COGCORE_KERNEL_IMPL", "TRITON_INTERPRET", *(f"COGCORE_KERNEL_{op.upper()}" for op in OPS)):
        monkeypatch.delenv(name, raising=False)


def test_every_op_has_a_reference_and_lists_its_impls():
    table = available_kernels(device="cpu")
    assert set(table) == OPS
    assert all("reference" in impls for impls in table.values())
    assert "chunked" in table["linear_distill"] and "torch" in table["gathered_lora"]
    rows = describe_kernels(device="cpu")
    assert ("rms_norm", "triton") in {(op, impl) for op, impl, _ in rows}


def test_importing_the_package_imports_only_torch():
    """No triton (its interpreter mode is fixed at import), no transformers, no cogcore.train."""
    code = "import sys, cogcore.kernels; print(sorted(m for m in ('triton', 'transformers', 'cogcore.train', 'liger_kernel', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_auto_on_cpu():
    assert resolve_impl("gathered_lora", device="cpu") == "torch"
    assert resolve_impl("rms_norm", device="cpu") == "reference"
    assert resolve_impl("linear_cross_entropy", device="cpu", size=10) == "reference"
    assert resolve_impl("linear_cross_entropy", device="cpu", size=10**8) == "chunked"


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("COGCORE_KERNEL_IMPL", "reference")
    assert resolve_impl("gathered_lora", device="cpu") == "reference"
    assert resolve_impl("linear_distill", device="cpu", size=10**8) == "reference"
    monkeypatch.setenv("COGCORE_KERNEL_IMPL", "chunked")  # ops without "chunked" keep auto
    assert resolve_impl("linear_distill", device="cpu", size=10**8) == "chunked"
    assert resolve_impl("gathered_lora", device="cpu") == "torch"
    monkeypatch.setenv("COGCORE_KERNEL_GATHERED_LORA", "loop")  # per-op beats global
    assert resolve_impl("gathered_lora", device="cpu") == "loop"
    assert resolve_impl("gathered_lora", "torch", device="cpu") == "torch"  # an explicit argument beats env


def test_forced_impl_errors_say_why(monkeypatch):
    with pytest.raises(ValueError, match="has no implementation 'cuda_graph'"):
        resolve_impl("rms_norm", "cuda_graph")
    monkeypatch.setenv("COGCORE_KERNEL_RMS_NORM", "nope")
    with pytest.raises(ValueError, match="COGCORE_KERNEL_RMS_NORM=nope"):
        resolve_impl("rms_norm")
    with pytest.raises(KeyError, match="unknown kernel op"):
        resolve_impl("flash_attention")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_impl("linear_distill", "triton", device="cpu")
        from cogcore.kernels import gathered_lora

        x = torch.randn(3, 4)
        with pytest.raises(RuntimeError, match="cannot run here"):
            gathered_lora(
                x,
                torch.randn(2, 4, 2),
                torch.randn(2, 2, 5),
                torch.tensor([0, 1, -1]),
                torch.ones(2),
                impl="triton",
            )
