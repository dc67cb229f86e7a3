"""Triton (and Liger) vs reference on CUDA at realistic sizes. Skipped without a GPU.

Run with: pytest -m gpu tests/kernels   (bench/gpu_check.sh does, on an H200)
"""

import importlib.util

import pytest
import torch

from cogcore.kernels import (
    LOSSES,
    TeacherDense,
    TeacherTopK,
    apply_kernels,
    gathered_lora,
    linear_cross_entropy,
    linear_distill_loss,
    rms_norm,
    swiglu,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# GPU reductions reorder sums; a little looser than the CPU tolerances
GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def _close(actual, expected, dtype, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    assert err <= GPU_TOL[dtype], f"{what}: relative error {err:.3g} > {GPU_TOL[dtype]}"


def _grads(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    torch.manual_seed(0)
    (out.float() * torch.randn(out.shape, device=out.device)).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in inputs]


def _leaf(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device="cuda") * scale + shift).to(dtype).requires_grad_()


@DTYPES
@pytest.mark.parametrize("impl", ["triton", "liger"])
def test_rms_norm_cuda(impl, dtype):
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    x, w = _leaf(4, 1023, 2049, dtype=dtype), _leaf(2049, dtype=dtype, scale=0.1, shift=1.0)
    ref = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl="reference"), [x, w])
    got = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl=impl), [x, w])
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        _close(a, b, dtype, f"{impl} rms_norm {name}")


@DTYPES
@pytest.mark.parametrize("impl", ["triton", "liger"])
def test_swiglu_cuda(impl, dtype):
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    g, u = _leaf(4093, 1537, dtype=dtype, scale=3.0), _leaf(4093, 1537, dtype=dtype)
    ref = _grads(lambda a, b: swiglu(a, b, impl="reference"), [g, u])
    # liger's backward writes the gradients into its inputs: hand it copies
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    got = _grads(lambda a, b: swiglu(a, b, impl=impl), [g2, u2])
    for name, a, b in zip(("y", "dg", "du"), got, ref):
        _close(a, b, dtype, f"{impl} swiglu {name}")


@DTYPES
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gathered_lora_cuda(impl, dtype):
    n, d, r, rows = 16, 2048, 16, 1021
    A = _leaf(n, d, r, dtype=dtype, scale=d**-0.5)
    B = _leaf(n, r, d, dtype=dtype)
    x = _leaf(rows, d, dtype=dtype)
    idx = torch.randint(-1, n, (rows,), device="cuda")
    scale = torch.rand(n, device="cuda") + 0.5
    ref = _grads(lambda *t: gathered_lora(*t, idx, scale, impl="loop"), [x, A, B])
    got = _grads(lambda *t: gathered_lora(*t, idx, scale, impl=impl), [x, A, B])
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        _close(a, b, dtype, f"{impl} gathered_lora {name}")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_linear_distill_cuda(impl, loss):
    n, h, v = 1024, 576, 49152
    hidden, weight = _leaf(n, h, dtype=torch.float32), _leaf(v, h, dtype=torch.float32, scale=0.05)
    t_hidden, t_weight = torch.randn(n, h, device="cuda"), torch.randn(v, h, device="cuda") * 0.05
    weights = (torch.rand(n, device="cuda") > 0.2).float()
    targets = torch.randint(0, v, (n,), device="cuda")

    def fn(i):
        return lambda a, b: linear_distill_loss(
            a, b, TeacherDense(t_hidden, t_weight), weights, loss=loss, ce_weight=0.5, targets=targets, impl=i
        )

    for name, a, b in zip(
        ("loss", "dh", "dW"), _grads(fn(impl), [hidden, weight]), _grads(fn("reference"), [hidden, weight])
    ):
        _close(a, b, torch.float32, f"{impl} {loss} {name}")


def test_linear_bf16_and_topk_cuda():
    n, h, v, k = 1024, 576, 49152, 64
    hidden, weight = _leaf(n, h, dtype=torch.bfloat16), _leaf(v, h, dtype=torch.bfloat16, scale=0.05)
    targets = torch.randint(0, v, (n,), device="cuda")
    weights = torch.ones(n, device="cuda")
    ce = [
        _grads(lambda a, b, i=i: linear_cross_entropy(a, b, targets, weights, impl=i), [hidden, weight])
        for i in ("triton", "reference")
    ]
    for a, b in zip(*ce):
        _close(a, b, torch.bfloat16, "bf16 linear CE")
    lp, ids = torch.log_softmax(torch.randn(n, v, device="cuda") * 3, -1).topk(k, dim=-1)
    for tail in ("renorm", "bucket"):
        out = [
            _grads(
                lambda a, b, i=i, tail=tail: linear_distill_loss(
                    a, b, TeacherTopK(ids, lp.half()), weights, topk_tail=tail, impl=i
                ),
                [hidden, weight],
            )
            for i in ("chunked", "reference")
        ]
        for a, b in zip(*out):
            _close(a, b, torch.bfloat16, f"bf16 top-k {tail}")


def test_apply_kernels_cuda_matches_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 1024, (4, 128), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        patch = apply_kernels(model)
        assert set(patch.impls.values()) == {"triton"}, patch.impls
        after = model(ids).logits
        patch()
    _close(after, before, torch.float32, "patched tiny Llama logits")
