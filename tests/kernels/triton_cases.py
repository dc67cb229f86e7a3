"""Triton kernels vs the references, on CPU under TRITON_INTERPRET=1 (or on CUDA).

Not collected by the main run (the name is not test_*.py): triton's interpreter mode is fixed
when triton is imported, so `test_kernels_triton.py` runs this file in a fresh process with
TRITON_INTERPRET=1. By hand: TRITON_INTERPRET=1 pytest -q tests/kernels/triton_cases.py
Shapes are tiny: the interpreter is 100-1000x slower than a GPU.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA", allow_module_level=True)

from cogcore.kernels import (  # noqa: E402
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

# numpy warns about log(0) / inf - inf in masked lanes the kernels discard
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _grads(fn, inputs):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    torch.manual_seed(0)
    (out.float() * torch.randn(out.shape, device=out.device)).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in inputs]


def _leaf(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_()


@DTYPES
def test_rms_norm(dtype, assert_close):
    x, w = _leaf(2, 37, 19, dtype=dtype), _leaf(19, dtype=dtype, scale=0.2, shift=1.0)
    ref = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl="reference"), [x, w])
    got = _grads(lambda a, b: rms_norm(a, b, 1e-6, impl="triton"), [x, w])
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert_close(a, b, dtype, f"rms_norm {name}")


@DTYPES
def test_swiglu(dtype, assert_close):
    g, u = _leaf(37, 19, dtype=dtype, scale=3.0), _leaf(37, 19, dtype=dtype)
    ref = _grads(lambda a, b: swiglu(a, b, impl="reference"), [g, u])
    got = _grads(lambda a, b: swiglu(a, b, impl="triton"), [g, u])
    for name, a, b in zip(("y", "dg", "du"), got, ref):
        assert_close(a, b, dtype, f"swiglu {name}")


@DTYPES
def test_gathered_lora(dtype, assert_close):
    n, d_in, d_out, ranks = 4, 19, 23, (2, 6, 3, 6)
    torch.manual_seed(1)
    A = torch.randn(n, d_in, max(ranks), device=DEVICE) / d_in**0.5
    B = torch.randn(n, max(ranks), d_out, device=DEVICE)
    for a, r in enumerate(ranks):
        A[a, :, r:] = 0
        B[a, r:] = 0
    A, B = A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()
    x = _leaf(37, d_in, dtype=dtype)
    idx = torch.randint(-1, 3, (37,), device=DEVICE)  # adapter 3 absent, some rows without adapter
    scale = torch.rand(n, device=DEVICE) + 0.5
    ref = _grads(lambda *t: gathered_lora(*t, idx, scale, impl="loop"), [x, A, B])
    got = _grads(lambda *t: gathered_lora(*t, idx, scale, impl="triton"), [x, A, B])
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close(a, b, dtype, f"gathered_lora {name}")


def _loss_batch(dtype, n=37, h=19, v=131, ht=23, k=5):
    torch.manual_seed(2)
    hidden, weight = _leaf(n, h, dtype=dtype), _leaf(v, h, dtype=dtype, scale=0.5)
    t_hidden, t_weight = (
        torch.randn(n, ht, device=DEVICE).to(dtype),
        (torch.randn(v, ht, device=DEVICE) * 0.5).to(dtype),
    )
    weights = torch.rand(n, device=DEVICE)
    weights[::4] = 0
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[1::5] = -100
    lp, ids = torch.log_softmax((t_hidden @ t_weight.T).float(), -1).topk(k, dim=-1)
    return hidden, weight, t_hidden, t_weight, weights, targets, ids, lp


@pytest.mark.parametrize("loss", LOSSES)
def test_linear_distill_dense_fp32(loss, assert_close):
    hidden, weight, t_hidden, t_weight, weights, targets, _, _ = _loss_batch(torch.float32)
    kw = dict(loss=loss, beta=0.3, alpha=0.2, ce_weight=0.5, targets=targets, chunk_size=16)

    def fn(impl):
        return lambda h, w: linear_distill_loss(
            h, w, TeacherDense(t_hidden, t_weight), weights, impl=impl, **kw
        )

    for name, a, b in zip(
        ("loss", "dh", "dW"),
        _grads(fn("triton"), [hidden, weight]),
        _grads(fn("reference"), [hidden, weight]),
    ):
        assert_close(a, b, torch.float32, f"{loss} {name}")


@pytest.mark.parametrize("temperature", [2.0, 0.5])
@DTYPES
def test_linear_distill_temperature_and_dtype(dtype, temperature, assert_close):
    hidden, weight, t_hidden, t_weight, weights, _, _, _ = _loss_batch(dtype)

    def fn(impl):
        return lambda h, w: linear_distill_loss(
            h,
            w,
            TeacherDense(t_hidden, t_weight),
            weights,
            loss="jsd",
            temperature=temperature,
            chunk_size=16,
            impl=impl,
        )

    for name, a, b in zip(
        ("loss", "dh", "dW"),
        _grads(fn("triton"), [hidden, weight]),
        _grads(fn("reference"), [hidden, weight]),
    ):
        assert_close(a, b, dtype, f"T={temperature} {name}")


def test_linear_cross_entropy_and_topk_fallback(assert_close):
    hidden, weight, _, _, weights, targets, ids, lp = _loss_batch(torch.float32)

    def ce(impl):
        return lambda h, w: linear_cross_entropy(h, w, targets, weights, chunk_size=16, impl=impl)

    for a, b in zip(_grads(ce("triton"), [hidden, weight]), _grads(ce("reference"), [hidden, weight])):
        assert_close(a, b, torch.float32, "linear CE")

    def topk(impl):  # top-k teachers run the torch chunk math inside impl="triton"
        return lambda h, w: linear_distill_loss(
            h, w, TeacherTopK(ids, lp), weights, topk_tail="bucket", chunk_size=16, impl=impl
        )

    for a, b in zip(_grads(topk("triton"), [hidden, weight]), _grads(topk("reference"), [hidden, weight])):
        assert_close(a, b, torch.float32, "top-k via triton impl")


def test_apply_kernels_triton_tiny_llama(make_llama, assert_close):
    batches = [(torch.randint(0, 320, (2, 1)) + torch.arange(8)) % 320 for _ in range(3)]
    losses = {}
    for impl in ("reference", "triton"):
        model = make_llama(seed=3).to(DEVICE).train()
        patch = apply_kernels(model, impl=impl)
        assert set(patch.impls.values()) == {impl}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[impl] = []
        for ids in batches:
            loss = model(ids.to(DEVICE), labels=ids.to(DEVICE)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[impl].append(loss.detach())
        patch()
    assert_close(
        torch.stack(losses["triton"]), torch.stack(losses["reference"]), torch.float32, "3 SGD steps"
    )
