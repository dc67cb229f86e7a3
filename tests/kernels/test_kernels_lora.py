"""Gathered multi-LoRA: vectorised vs loop, MultiLoRALinear vs PEFT, per-instance patching."""

import time

import pytest
import torch
from torch import nn

from cogcore.kernels import (
    MultiLoRALinear,
    apply_multi_lora,
    gathered_lora,
    layer_index,
    plan_segments,
    resolve_layers,
)

N, D_IN, D_OUT = 37, 19, 23
RANKS = (2, 6, 3, 6)  # zero-padded to r_max = 6


def make_stack(dtype, seed=0, n_rows=N, ranks=RANKS, absent=(3,), d_in=D_IN, d_out=D_OUT):
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    A = torch.randn(n, d_in, r_max, generator=g) / d_in**0.5
    B = torch.randn(n, r_max, d_out, generator=g)
    for a, r in enumerate(ranks):  # padding beyond each adapter's rank is zero
        A[a, :, r:] = 0
        B[a, r:] = 0
    idx = torch.randint(-1, n, (n_rows,), generator=g)
    for a in absent:
        idx[idx == a] = 0
    idx[:3] = -1
    x = torch.randn(n_rows, d_in, generator=g)
    scale = torch.rand(n, generator=g) + 0.5
    return [t.to(dtype).requires_grad_() for t in (x, A, B)] + [idx, scale]


def forward_backward(impl, x, A, B, idx, scale):
    for t in (x, A, B):
        t.grad = None
    y = gathered_lora(x, A, B, idx, scale, impl=impl)
    (y.float() * torch.linspace(-1, 1, y.shape[1])).sum().backward()
    return y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()


@pytest.mark.parametrize("layout", ["ragged", "balanced", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_matches_loop(dtype, layout, assert_close):
    x, A, B, idx, scale = make_stack(dtype, n_rows=37 if layout == "ragged" else 32)
    if layout == "balanced":  # every adapter 8 rows, none without: the all-gather backward path
        idx = torch.arange(4).repeat_interleave(8)[
            torch.randperm(32, generator=torch.Generator().manual_seed(3))
        ]
        plan = plan_segments(idx, 4)
        assert plan.inverse_order is not None and not plan.contiguous
    if layout == "grouped":  # already in segment order: the no-gather path
        idx = torch.arange(4).repeat_interleave(8)
        assert plan_segments(idx, 4).contiguous
    ref = forward_backward("loop", x, A, B, idx, scale)
    got = forward_backward("torch", x, A, B, idx, scale)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close(a, b, dtype, name)
    with torch.no_grad():  # inference takes the path without an autograd node
        assert_close(gathered_lora(x, A, B, idx, scale, impl="torch"), ref[0], dtype, "y (no_grad)")
    assert (got[0][idx == -1] == 0).all(), "rows without adapter get no delta"
    assert (got[1][idx == -1] == 0).all(), "and no gradient"
    r = torch.tensor(RANKS)
    pad_A = torch.arange(A.shape[2])[None, :] >= r[:, None]  # (n, r_max) padded columns
    assert (got[2].permute(0, 2, 1)[pad_A] == 0).all() and (got[3][pad_A] == 0).all(), (
        "padding gets no gradient"
    )
    if layout == "ragged":
        assert (got[2][3] == 0).all() and (got[3][3] == 0).all(), "an absent adapter gets no gradient"


def test_unbalanced_batch_takes_the_segment_path(assert_close):
    """40 adapters, one holding most rows: padding would be 40x, so segments are looped."""
    x, A, B, idx, scale = make_stack(torch.float32, seed=1, n_rows=64, ranks=(4,) * 40, absent=())
    idx = torch.zeros(64, dtype=torch.long)
    idx[50:] = torch.arange(14) + 20
    idx[5] = -1
    plan = plan_segments(idx, 40)
    assert 40 * plan.max_rows > 4 * 64 + 64
    for a, b in zip(
        forward_backward("torch", x, A, B, idx, scale), forward_backward("loop", x, A, B, idx, scale)
    ):
        assert_close(a, b, torch.float32, "unbalanced")


def test_gradcheck_float64():
    x, A, B, idx, scale = make_stack(torch.float64, seed=2, n_rows=8, ranks=(2, 3), d_in=5, d_out=4)
    for index in (idx, torch.tensor([1, 0, 0, 1, 1, 0, 0, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])):
        # ragged with -1, balanced, grouped (no gathers)

        def fn(xx, aa, bb, index=index):
            return gathered_lora(xx, aa, bb, index, scale.double(), impl="torch")

        assert torch.autograd.gradcheck(fn, (x, A, B))


def test_plan_is_reused_for_the_same_index_tensor():
    from cogcore.kernels.lora import _PLANS

    idx = torch.tensor([1, 0, -1, 1])
    assert _PLANS.get(idx, 2) is _PLANS.get(idx, 2)
    plan = _PLANS.get(idx, 2)
    idx[0] = 0  # in-place change bumps the version: a new plan
    assert _PLANS.get(idx, 2) is not plan
    assert plan_segments(idx, 2).seg_start.tolist() == [0, 2, 3]


def test_index_out_of_range_is_an_error():
    x, A, B, _, scale = make_stack(torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        gathered_lora(x, A, B, torch.full((N,), 4), scale, impl="torch")


def _peft_model(n_adapters, rank, alpha, seed=0):
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        Block(), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj"]), "a0"
    )
    for a in range(1, n_adapters):
        model.add_adapter(f"a{a}", peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapters do something
            nn.init.normal_(p)
    return model.eval()


def test_multi_lora_linear_equals_peft_mixed_batch(assert_close):
    n, rank, alpha = 3, 4, 8
    peft_model = _peft_model(n, rank, alpha)
    layer = peft_model.base_model.model.q_proj
    multi = MultiLoRALinear(layer.base_layer, n, rank, alpha)
    for a in range(n):
        multi.set_adapter_weights(
            a, layer.lora_A[f"a{a}"].weight, layer.lora_B[f"a{a}"].weight, layer.scaling[f"a{a}"]
        )
    x = torch.randn(2, 5, D_IN)
    names = ["a0", "__base__", "a2", "a1", "a2", "a0", "__base__", "a1", "a1", "a0"]
    with torch.no_grad():
        expected = peft_model(x.view(10, D_IN), adapter_names=names)
        multi.adapter_index = torch.tensor([-1 if s == "__base__" else int(s[1:]) for s in names])
        got = multi(x).view(10, D_OUT)
    assert_close(got, expected, torch.float32, "vs PEFT mixed batch")
    # one adapter per sequence expands over the sequence
    multi.adapter_index = torch.tensor([2, -1])
    with torch.no_grad():
        got = multi(x)
        peft_model.set_adapter("a2")
        assert_close(got[0], peft_model(x[0]), torch.float32, "per-sequence adapter")
        assert_close(got[1], layer.base_layer(x[1]), torch.float32, "per-sequence base")


def test_fresh_adapters_change_nothing_and_grads_reach_only_lora(make_llama):
    model = make_llama()
    ids = torch.randint(0, 320, (3, 8))
    with torch.no_grad():
        before = model(ids).logits
    patch = apply_multi_lora(model, n_adapters=4, rank=(2, 4, 4, 8), alpha=16.0)
    assert len(patch.layers) == 2 * 7
    patch.set_adapter_index(torch.tensor([0, 3, -1]))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in patch.layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    out = model(ids).logits
    torch.testing.assert_close(out, before)  # B = 0 at init
    out.square().mean().backward()
    q = patch.layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_B.grad[[0, 3]].abs().sum() > 0
    assert (q.lora_B.grad[[1, 2]] == 0).all(), "adapters not in the batch get no gradient"
    assert q.base.weight.grad is None


def test_undo_restores_the_model_and_leaves_other_instances_alone(make_llama):
    model, other = make_llama(seed=0), make_llama(seed=0)
    originals = {name: m for name, m in model.named_modules()}
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    patch = apply_multi_lora(model, n_adapters=2, rank=4, target_modules=("q_proj", "down_proj"))
    for layer in patch.layers.values():
        nn.init.normal_(layer.lora_B)
    patch.set_adapter_index(torch.tensor([1, 0]))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
        assert not any(isinstance(m, MultiLoRALinear) for m in other.modules())
        torch.testing.assert_close(other(ids).logits, before)
    patch()
    assert {name: m for name, m in model.named_modules()} == originals
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_layer_selection_wraps_only_those_decoder_layers(make_llama):
    """layers= keeps PEFT's layers_to_transform rule: by decoder-layer index, negative from the last."""
    assert layer_index("model.layers.17.mlp.up_proj") == 17 and layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None and layer_index("model.layers_norm.weight") is None
    model = make_llama(seed=0, layers=4)
    assert resolve_layers(model, [-1, 0, -4]) == [0, 3] and resolve_layers(model, None) == []
    patch = apply_multi_lora(model, n_adapters=2, rank=4, target_modules=("q_proj", "up_proj"), layers=[-2, -1])
    assert sorted(patch.layers) == [f"model.layers.{i}.{m}" for i in (2, 3) for m in ("mlp.up_proj", "self_attn.q_proj")]
    patch()
    with pytest.raises(ValueError, match=r"layer indices \[4, -5\] are out of range: the model has 4 decoder layers"):
        apply_multi_lora(model, n_adapters=2, rank=4, layers=[4, -5, 1])
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules()), "a refused selection wraps nothing"


def test_bitsandbytes_4bit_base(assert_close, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    # bnb's CPU 4-bit matmul goes through torch.compile; compiling it is not what is tested here
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    torch.manual_seed(0)
    start = time.perf_counter()
    base = bnb.nn.Linear4bit(D_IN, D_OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    multi = MultiLoRALinear(base, n_adapters=2, rank=4, alpha=8.0)
    nn.init.normal_(multi.lora_B)
    x = torch.randn(6, D_IN, requires_grad=True)
    multi.adapter_index = torch.tensor([0, 1, -1, 1, 0, 0])
    y = multi(x)
    y.square().sum().backward()
    with torch.no_grad():
        expected = base(x) + gathered_lora(
            x, multi.lora_A, multi.lora_B, multi.adapter_index, multi.scale, impl="loop"
        )
    assert_close(y, expected, torch.float32, "4-bit base + LoRA")
    assert multi.lora_A.grad is not None and x.grad is not None
    assert time.perf_counter() - start < 30


def test_multi_lora_linear_trains_under_bf16_autocast():
    """The adapters run in their own dtype under autocast: the backward used to meet bf16 gradients
    against fp32 weights (RuntimeError: expected scalar type Float but found BFloat16)."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), n_adapters=3, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.adapter_index = torch.tensor([0, 2, 1, 2])
    x = torch.randn(4, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_B.grad).all() and layer.lora_B.grad.abs().sum() > 0
