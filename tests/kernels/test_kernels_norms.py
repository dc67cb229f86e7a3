"""RMSNorm / SwiGLU ops, per-instance apply_kernels + undo, and a 20-step convergence check."""

import pytest
import torch

from cogcore.kernels import apply_kernels, linear_cross_entropy, rms_norm, swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_ops_are_the_hf_modules(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(19, eps=1e-5).to(dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(3, 37, 19, dtype=dtype)
    assert torch.equal(rms_norm(x, norm.weight, 1e-5, impl="reference"), norm(x))
    gate, up = torch.randn(37, 19, dtype=dtype), torch.randn(37, 19, dtype=dtype)
    assert torch.equal(swiglu(gate, up, impl="reference"), torch.nn.functional.silu(gate) * up)


def _steps(model, batches, loss_fn, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _hf_loss(model, ids):
    return model(ids, labels=ids).loss


def _chunked_ce_loss(model, ids):
    hidden = model.model(ids).last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = ids[:, 1:]
    weights = torch.ones_like(targets, dtype=torch.float32)
    total = linear_cross_entropy(
        hidden, model.lm_head.weight, targets, weights, chunk_size=16, impl="chunked"
    )
    return total / weights.sum()


def test_convergence_same_loss_with_kernels_and_chunked_ce(make_llama):
    g = torch.Generator().manual_seed(0)
    # learnable data: counting sequences (next = previous + 1) from random starts
    batches = [(torch.randint(0, 320, (4, 1), generator=g) + torch.arange(16)) % 320 for _ in range(20)]
    plain = _steps(make_llama(seed=1).train(), batches, _hf_loss)
    model = make_llama(seed=1).train()
    patch = apply_kernels(model)
    assert sorted(set(patch.modules.values())) == ["rms_norm", "swiglu"]
    fast = _steps(model, batches, _chunked_ce_loss)
    assert plain[-1] < plain[0] - 0.5, (
        f"the tiny model should learn in 20 steps: {plain[0]:.3f} -> {plain[-1]:.3f}"
    )
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-4, atol=2e-4)


def test_apply_kernels_is_per_instance_and_undo_is_exact(make_llama):
    model, other = make_llama(seed=2), make_llama(seed=2)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    patch = apply_kernels(model, impl="reference")
    n_norms = sum(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    assert list(patch.modules.values()).count("rms_norm") == n_norms == 2 * 2 + 1
    assert list(patch.modules.values()).count("swiglu") == 2
    assert all("forward" not in m.__dict__ for m in other.modules()), "a second model is untouched"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    # patching twice stacks; undoing in reverse order peels both off
    second = apply_kernels(model, names=("rms_norm",), impl="reference")
    second()
    assert all("forward" in model.get_submodule(name).__dict__ for name in patch.modules)
    patch()
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_apply_kernels_errors_are_clear(make_llama, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="unknown kernel names"):
        apply_kernels(make_llama(), names=("layer_norm",))
    with pytest.raises(ValueError, match="no module for 'rms_norm'"):
        apply_kernels(torch.nn.Sequential(torch.nn.Linear(3, 3)), names=("rms_norm",))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            apply_kernels(make_llama(), impl="triton")
