"""Linear CE / distillation: chunked vs reference, gradchecks, conventions (TRL parity)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from cogcore.kernels import (
    LOSSES,
    TeacherDense,
    TeacherTopK,
    cross_entropy_from_logits,
    distill_loss_from_logits,
    linear_cross_entropy,
    linear_distill_loss,
)
from cogcore.kernels.linear_loss import _ChunkedLinearLoss

N, H, V, HT, K, CHUNK = 37, 19, 131, 23, 5, 16
TEACHERS = ("dense", "topk_renorm", "topk_bucket")


def make_batch(dtype, seed=0, n=N, h=H, v=V, ht=HT, k=K):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=g).to(dtype).requires_grad_()  # must get no grad
    t_weight = (torch.randn(v, ht, generator=g) * 0.5).to(dtype)
    weights = torch.rand(n, generator=g)
    weights[::4] = 0.0  # ignored tokens
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100  # ignored tokens may carry an ignore label
    logprobs, ids = torch.log_softmax((t_hidden @ t_weight.T).float().detach(), -1).topk(k, dim=-1)
    return hidden, weight, t_hidden, t_weight, weights, targets, ids, logprobs.half()


def teacher_for(kind, t_hidden, t_weight, ids, logprobs):
    if kind == "dense":
        return TeacherDense(t_hidden, t_weight), "renorm"
    return TeacherTopK(ids, logprobs), kind.split("_")[1]


def run(impl, batch, kind, **kw):
    hidden, weight, t_hidden, t_weight, weights, targets, ids, logprobs = batch
    teacher, tail = teacher_for(kind, t_hidden, t_weight, ids, logprobs)
    for t in (hidden, weight, t_hidden):
        t.grad = None
    loss = linear_distill_loss(
        hidden, weight, teacher, weights, topk_tail=tail, targets=targets, chunk_size=CHUNK, impl=impl, **kw
    )
    loss.backward()
    assert t_hidden.grad is None, "the teacher must not receive gradient"
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_matches_reference(loss, kind, dtype, assert_close):
    batch = make_batch(dtype)
    kw = dict(loss=loss, beta=0.3, alpha=0.2)
    ref = run("reference", batch, kind, **kw)
    got = run("chunked", batch, kind, **kw)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        assert_close(a, b, dtype, f"{loss}/{kind}/{name}")


@pytest.mark.parametrize("temperature,ce_weight", [(2.0, 0.0), (0.7, 0.5), (1.0, 1.0)])
@pytest.mark.parametrize("kind", TEACHERS)
def test_chunked_matches_reference_temperature_and_ce(kind, temperature, ce_weight, assert_close):
    batch = make_batch(torch.float32, seed=1)
    for loss in ("jsd", "reverse_kl"):
        kw = dict(loss=loss, temperature=temperature, ce_weight=ce_weight)
        for name, a, b in zip(
            ("loss", "dh", "dW"), run("chunked", batch, kind, **kw), run("reference", batch, kind, **kw)
        ):
            assert_close(a, b, torch.float32, f"{loss}/{kind}/T={temperature}/ce={ce_weight}/{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy(dtype, assert_close):
    hidden, weight, _, _, weights, targets, _, _ = make_batch(dtype)
    got = {}
    for impl in ("reference", "chunked"):
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, weights, chunk_size=CHUNK, impl=impl)
        loss.backward()
        got[impl] = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    for a, b in zip(got["chunked"], got["reference"]):
        assert_close(a, b, dtype, "linear CE")
    # the reference agrees with torch's cross-entropy (sum of weighted per-token CE)
    per_token = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100, reduction="none")
    assert_close(got["reference"][0], (per_token * weights).sum(), dtype, "vs F.cross_entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_frozen_weight(dtype, assert_close):
    """A frozen lm_head (LoRA): the chunked path makes d loss / d hidden in forward and only
    scales it in backward; it must equal the reference, under an upstream factor, and in
    float64 pass gradcheck."""
    hidden, weight, _, _, weights, targets, _, _ = make_batch(dtype, seed=5)
    weight = weight.detach()
    got = {}
    for impl in ("reference", "chunked"):
        hidden.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, weights, chunk_size=CHUNK, impl=impl)
        (3.0 * loss).backward()  # an upstream gradient other than 1
        got[impl] = (loss.detach(), hidden.grad.clone())
    for name, a, b in zip(("loss", "d hidden"), got["chunked"], got["reference"]):
        assert_close(a, b, dtype, f"frozen-weight CE {name}")
    assert float(got["chunked"][1].abs().sum()) > 0
    assert torch.count_nonzero(got["chunked"][1][::4]) == 0, "rows of weight 0 get no gradient"
    # the gradient made in forward is what backward returns: nothing else is kept
    h64, w64, *_ = make_batch(torch.float64, 6, 5, 3, 6)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    t = torch.randint(0, 6, (5,))
    fn = lambda hh: linear_cross_entropy(hh, w64.detach(), t, w, chunk_size=2, impl="chunked")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h64,), eps=1e-6, atol=1e-6)
    out = fn(h64)
    assert out.grad_fn is not None and len(out.grad_fn.saved_tensors) == 1


@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss, kind):
    n, h, v, k = 3, 3, 6, 2
    hidden, weight, t_hidden, t_weight, weights, targets, ids, logprobs = make_batch(
        torch.float64, 2, n, h, v, 4, k
    )
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    teacher, tail = teacher_for(kind, t_hidden.detach(), t_weight, ids, logprobs.double())
    kw = dict(
        loss=loss,
        beta=0.4,
        alpha=0.3,
        temperature=1.5,
        topk_tail=tail,
        ce_weight=0.3,
        targets=targets.clamp_min(0),
    )
    for impl in ("reference", "chunked"):

        def fn(hh, ww, impl=impl):
            return linear_distill_loss(hh, ww, teacher, weights, chunk_size=2, impl=impl, **kw)

        assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-6), f"{impl} {loss}/{kind}"


def test_gradcheck_chunked_function_directly():
    """The autograd.Function itself, not through the dispatcher, in float64."""
    from cogcore.kernels.linear_loss import _LossSpec

    hidden, weight, t_hidden, t_weight, weights, targets, _, _ = make_batch(torch.float64, 3, 5, 3, 6, 4)
    spec = _LossSpec("jsd", beta=0.5, ce_weight=1.0, chunk_size=2)
    fn = lambda hh, ww: _ChunkedLinearLoss.apply(  # noqa: E731
        hh, ww, t_hidden.detach(), t_weight, None, None, targets.clamp_min(0), weights.double().float(), spec
    )
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-6)


def test_jsd_beta_0_and_1_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(11, 29, generator=g), torch.randn(11, 29, generator=g)
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        torch.testing.assert_close(
            distill_loss_from_logits(s, t, loss="jsd", beta=beta), distill_loss_from_logits(s, t, loss=other)
        )
    # and forward KL is KL(teacher || student)
    expected = F.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="none", log_target=True
    ).sum(-1)
    torch.testing.assert_close(distill_loss_from_logits(s, t, loss="forward_kl"), expected)


def _trl_generalized_jsd_loss():
    """TRL's own `GKDTrainer.generalized_jsd_loss`, compiled from the installed trl source.

    Importing trl.experimental pulls in transformers' trainer stack (~10 s on the CI box), so
    the one static method is lifted out of the installed file with ast and run as written.
    """
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    path = Path(spec.origin).parent / "experimental" / "gkd" / "gkd_trainer.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss")
    fn.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


def test_jsd_matches_trl_generalized_jsd_loss():
    trl_jsd = _trl_generalized_jsd_loss()
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 7, 53, generator=g) * 3, torch.randn(2, 7, 53, generator=g) * 3
    for beta, temperature in itertools.product((0.0, 0.1, 0.5, 0.9, 1.0), (1.0, 2.0)):
        trl = trl_jsd(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
        ours = distill_loss_from_logits(
            s.view(14, 53), t.view(14, 53), loss="jsd", beta=beta, temperature=temperature
        )
        torch.testing.assert_close(
            ours, trl.view(14), rtol=1e-5, atol=1e-6, msg=f"beta={beta} T={temperature}"
        )


def test_skew_kl_and_tvd_definitions():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(9, 17, generator=g), torch.randn(9, 17, generator=g)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    alpha = 0.25
    m = alpha * p + (1 - alpha) * q
    torch.testing.assert_close(
        distill_loss_from_logits(s, t, loss="skew_kl", alpha=alpha), (p * (p.log() - m.log())).sum(-1)
    )
    torch.testing.assert_close(distill_loss_from_logits(s, t, loss="tvd"), 0.5 * (p - q).abs().sum(-1))


def test_topk_bucket_with_k_equal_v_minus_1_is_the_dense_loss():
    """With all but one id in the top-k, the tail bucket is that id: bucket == dense (T = 1)."""
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    lp, ids = torch.log_softmax(t, -1).topk(11, dim=-1)
    for loss in LOSSES:
        dense = distill_loss_from_logits(s, t, loss=loss)
        bucket = distill_loss_from_logits(s, TeacherTopK(ids, lp), loss=loss, topk_tail="bucket")
        torch.testing.assert_close(bucket, dense, rtol=1e-4, atol=1e-5, msg=loss)


def test_topk_renorm_is_the_dense_loss_on_the_kept_ids():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    lp, ids = torch.log_softmax(t, -1).topk(4, dim=-1)
    for loss, temperature in itertools.product(LOSSES, (1.0, 2.0)):
        renorm = distill_loss_from_logits(s, TeacherTopK(ids, lp), loss=loss, temperature=temperature)
        dense = distill_loss_from_logits(s.gather(1, ids), lp, loss=loss, temperature=temperature)
        torch.testing.assert_close(renorm, dense, msg=loss)


def test_zero_weight_rows_are_never_computed():
    """Rows with weight 0 are skipped by the chunked path, so even inf there cannot leak in."""
    hidden, weight, t_hidden, t_weight, weights, targets, _, _ = make_batch(torch.float32)
    poisoned = hidden.detach().clone()
    poisoned[weights == 0] = float("inf")
    poisoned.requires_grad_()
    loss = linear_distill_loss(
        poisoned, weight, TeacherDense(t_hidden, t_weight), weights, chunk_size=CHUNK, impl="chunked"
    )
    loss.backward()
    keep = weights != 0
    expected = linear_distill_loss(
        hidden[keep], weight, TeacherDense(t_hidden[keep], t_weight), weights[keep], impl="reference"
    )
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(poisoned.grad).all() and (poisoned.grad[~keep] == 0).all()


def test_chunked_saves_only_its_inputs():
    """No (N, V) tensor is kept for backward: every saved tensor is one of the inputs' sizes."""
    hidden, weight, t_hidden, t_weight, weights, targets, _, _ = make_batch(torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_distill_loss(
            hidden,
            weight,
            TeacherDense(t_hidden, t_weight),
            weights,
            impl="chunked",
            ce_weight=1.0,
            targets=targets,
        )
    loss.backward()
    assert saved and max(saved) <= max(weight.numel(), t_weight.numel(), hidden.numel(), t_hidden.numel())
    assert N * V not in saved


def test_accepts_batch_and_sequence_dims(assert_close):
    hidden, weight, t_hidden, t_weight, weights, targets, _, _ = make_batch(torch.float32, n=36)
    flat = linear_distill_loss(hidden, weight, TeacherDense(t_hidden, t_weight), weights, impl="chunked")
    shaped = linear_distill_loss(
        hidden.view(4, 9, H),
        weight,
        TeacherDense(t_hidden.view(4, 9, HT), t_weight),
        weights.view(4, 9),
        impl="chunked",
    )
    assert_close(shaped, flat, torch.float32, "3-D input")


def test_auto_picks_reference_when_small_and_chunked_when_large():
    from cogcore.kernels import resolve_impl

    assert resolve_impl("linear_distill", device="cpu", size=N * V) == "reference"
    assert resolve_impl("linear_distill", device="cpu", size=4096 * 49152) == "chunked"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss="kl"), "unknown distillation loss"),
        (dict(beta=1.5), "beta must be in"),
        (dict(alpha=1.0), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(topk_tail="drop"), "topk_tail"),
        (dict(ce_weight=1.0), "needs targets"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    hidden, weight, t_hidden, t_weight, weights, *_ = make_batch(torch.float32)
    with pytest.raises(ValueError, match=message):
        linear_distill_loss(hidden, weight, TeacherDense(t_hidden, t_weight), weights, **kwargs)


def test_bucket_needs_k_below_vocab():
    s = torch.randn(3, 5)
    lp, ids = torch.log_softmax(torch.randn(3, 5), -1).topk(5, dim=-1)
    with pytest.raises(ValueError, match="k < V"):
        distill_loss_from_logits(s, TeacherTopK(ids, lp), topk_tail="bucket")


def test_cross_entropy_from_logits_ignores_negative_targets():
    logits = torch.randn(4, 9)
    targets = torch.tensor([1, -100, 8, 0])
    ce = cross_entropy_from_logits(logits, targets)
    torch.testing.assert_close(ce, F.cross_entropy(logits, targets, reduction="none", ignore_index=-100))
