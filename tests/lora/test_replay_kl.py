"""KL-to-base replay (refresh.data.replay_loss=kl): replay rows hold the adapter to the base's
next-token distribution; the grouped pass and the single-user PEFT path train it alike."""

import pytest
import torch
import torch.nn.functional as F

from cogcore.lora.grouped import (
    LoraShape,
    initial_adapter_weights,
    pack_user_rows,
    pack_user_rows_kl,
    replay_kl_sum,
    train_adapters_grouped,
)
from cogcore.lora.refresh import AdapterLoss
from cogcore.train.data import builtin_records, make_batch
from cogcore.train.distributed import DistInfo
from cogcore.train.lm import decoder_hidden, output_weight
from cogcore.train.loop import TrainConfig, train
from cogcore.train.model import load_model, load_tokenizer

SEQ = 64
LORA = LoraShape(r=4, alpha=8.0)


def cfg(**kw):
    base = dict(max_steps=30, micro_batch=2, grad_accum=1, lr=1e-2, warmup_steps=0, grad_clip=1.0,
                progress=False, tensorboard=False)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def user_records(offset: int) -> list[dict]:
    """Policy rows (arithmetic) and replay rows whose answers are NOT the base's (so CE on them moves it)."""
    policy = [r | {"target": "policy"} for r in builtin_records("arithmetic", 24, offset)]
    replay = [{"prompt": "Tell me: " + r["prompt"], "completion": " zz qq zz qq", "target": "replay"}
              for r in builtin_records("arithmetic", 12, offset + 1)]
    return policy + replay


def test_replay_rows_are_packed_apart_or_mixed(tok):
    recs = user_records(0)
    rows, kl = pack_user_rows_kl(tok, recs, SEQ, "alice", kl_target="replay")
    assert kl.dtype == torch.bool and kl.shape == rows.input_ids.shape
    flagged_rows = kl.any(dim=1)
    assert 0 < int(flagged_rows.sum()) < len(rows)
    # apart: the flagged rows hold exactly the replay records, every real token of them flagged
    alone = pack_user_rows(tok, [r for r in recs if r["target"] == "replay"], SEQ)
    torch.testing.assert_close(rows.input_ids[flagged_rows], alone.input_ids)
    torch.testing.assert_close(rows.target_weights[flagged_rows], alone.target_weights)
    assert torch.equal(kl[flagged_rows], alone.doc_ids >= 0)
    # mixed: the plain packing, with the replay records' tokens flagged where they landed
    mixed, kl_mixed = pack_user_rows_kl(tok, recs, SEQ, "alice", kl_target="replay", apart=False)
    plain = pack_user_rows(tok, recs, SEQ)
    torch.testing.assert_close(mixed.input_ids, plain.input_ids)
    n_replay = sum(len(tok_ids) for tok_ids in (tok(r["prompt"] + r["completion"]).input_ids
                                               for r in recs if r["target"] == "replay"))
    assert int(kl_mixed.sum()) == int(kl.sum()) and abs(int(kl_mixed.sum()) - n_replay) <= 2 * 12
    assert (kl_mixed.any(dim=1) & ~kl_mixed.all(dim=1)).any(), "mixed rows hold both kinds"
    # without a KL target nothing is flagged and the rows are the plain packing
    plain2, none = pack_user_rows_kl(tok, recs, SEQ, "alice")
    assert not none.any()
    torch.testing.assert_close(plain2.input_ids, plain.input_ids)


def test_replay_kl_sum_is_weighted_forward_kl():
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 8, 11
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    base = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0, 0.25], dtype=torch.float64)
    got = replay_kl_sum(hidden, base, W, w)
    logp, logq = F.log_softmax(base @ W.T, -1), F.log_softmax(hidden @ W.T, -1)
    ref = (w * (logp.exp() * (logp - logq)).sum(-1)).sum()
    torch.testing.assert_close(got, ref)
    g_got, = torch.autograd.grad(got, hidden)
    g_ref, = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g_got, g_ref)
    assert float(replay_kl_sum(base, base, W, w)) == pytest.approx(0, abs=1e-12)
    # replay_loss=kl+ce: the same plus cross-entropy on the row's own answer tokens
    targets = torch.randint(0, V, (N,), generator=g)
    both = replay_kl_sum(hidden, base, W, w, target_ids=targets, ce_weight=1.0)
    ce = (w * F.cross_entropy(hidden @ W.T, targets, reduction="none")).sum()
    torch.testing.assert_close(both, ref + ce)
    assert float(replay_kl_sum(hidden, base, W, torch.zeros(N, dtype=torch.float64))) == 0.0


def kl_to_base(model, tok, records) -> float:
    """Mean KL(base || adapter) per answer token of ``records`` (``model`` is a PeftModel)."""
    rows = pack_user_rows(tok, records, SEQ)
    b = make_batch(rows, torch.arange(len(rows)))
    with torch.no_grad():
        h = decoder_hidden(model, b)
        with model.disable_adapter():
            hb = decoder_hidden(model, b)
        kl = replay_kl_sum(h.float(), hb.float(), output_weight(model).float(), b["target_weights"])
    return float(kl / b["target_weights"].sum())


def peft_with(state: dict):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    m = get_peft_model(load_model("tiny-llama"), LoraConfig(**LORA.peft_config()))
    set_peft_model_state_dict(m, state)
    return m


def weighted(record: dict, weight: float) -> dict:
    """A prompt/completion record as segments whose answer carries ``weight`` (replay_scale's effect)."""
    return {"segments": [{"text": record["prompt"], "weight": 0.0}, {"text": record["completion"], "weight": weight}],
            "target": record["target"]}


def test_kl_replay_holds_the_adapter_to_the_base(tok, tmp_path, one_thread):
    """Two users trained together: with KL replay rows (answer weight 20) the adapters drift less
    from the base on the replay prompts than without replay, and still learn their own rows.
    (At weight 1 the pull is weak on this tiny model: KL near the base is small next to the CE
    of the user's rows, which is why the refresh exposes data.replay_scale.)"""
    data = {u: user_records(off) for u, off in (("alice", 0), ("bob", 100))}
    policy_only = {u: [r for r in recs if r["target"] == "policy"] for u, recs in data.items()}
    with_kl = {u: policy_only[u] + [weighted(r, 20.0) for r in recs if r["target"] == "replay"]
               for u, recs in data.items()}
    model = load_model("tiny-llama")
    plain = train_adapters_grouped(model, tok, policy_only, LORA, cfg(), tmp_path / "plain", seq_len=SEQ)
    held = train_adapters_grouped(model, tok, with_kl, LORA, cfg(), tmp_path / "kl", seq_len=SEQ, kl_target="replay")
    for user, recs in data.items():
        replay = [r for r in recs if r["target"] == "replay"]
        drift_plain = kl_to_base(peft_with(plain[user]), tok, replay)
        drift_kl = kl_to_base(peft_with(held[user]), tok, replay)
        assert drift_plain > 0.01, f"{user}: training on its rows must move the adapter on replay prompts too"
        assert drift_kl < drift_plain / 2, f"{user}: KL replay {drift_kl:.4f} vs none {drift_plain:.4f}"
        learned = kl_to_base(peft_with(held[user]), tok, policy_only[user])
        assert learned > 0.01, f"{user}: the policy rows must still train the adapter ({learned:.4f})"


@pytest.mark.parametrize("apart", [True, False], ids=["apart", "mixed"])
def test_grouped_kl_equals_single_peft_run(tok, tmp_path, one_thread, apart):
    """One user's KL-replay adapter: the grouped pass == the refresh's single-user PEFT path."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    recs = user_records(0)
    model = load_model("tiny-llama")
    grouped = train_adapters_grouped(model, tok, {"alice": recs}, LORA, cfg(), tmp_path / "g", seq_len=SEQ,
                                     kl_target="replay", kl_apart=apart)["alice"]

    rows, kl_rows = pack_user_rows_kl(tok, recs, SEQ, "alice", kl_target="replay", apart=apart)
    init = initial_adapter_weights(model, LORA, "alice", seed=0)
    peft_model = get_peft_model(load_model("tiny-llama"), LoraConfig(**LORA.peft_config()))
    set_peft_model_state_dict(peft_model, init)
    train(AdapterLoss(peft_model), rows, cfg(), tmp_path / "s", DistInfo(),
          prepare_batch=lambda b, _s: {**b, "kl_token": kl_rows[b["row_index"]]})
    single = get_peft_model_state_dict(peft_model)
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 1e-2
    for k in single:
        torch.testing.assert_close(grouped[k], single[k], atol=2e-5, rtol=0, msg=k)
