import json

import pytest
import torch

from cogcore.train.config import CogcoreError
from cogcore.train.data import DataConfig, Document, load_documents, pack
from cogcore.train.distributed import DistInfo
from cogcore.train.lm import CausalLMLoss
from cogcore.train.loop import TrainConfig, lr_lambda, train
from cogcore.train.model import load_model, load_tokenizer
from cogcore.train.sft import LoraConfig, add_lora


@pytest.fixture(scope="module")
def rows():
    tok = load_tokenizer("tiny-llama")
    docs, _ = load_documents(DataConfig(source="builtin:arithmetic", builtin_size=300), tok)
    return pack(docs, 64, tok.pad_token_id)


def cfg(**kw):
    base = dict(max_steps=12, micro_batch=4, lr=3e-3, warmup_steps=2, progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_metrics_are_written(rows, tmp_path):
    model = load_model("tiny-llama")
    res = train(CausalLMLoss(model), rows, cfg(max_steps=30), tmp_path, DistInfo())
    assert res.losses[-1] < res.losses[0] - 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(lines[0])


def test_accumulation_equals_one_big_batch(rows, tmp_path):
    a = load_model("tiny-llama")
    b = load_model("tiny-llama")
    ra = train(CausalLMLoss(a), rows, cfg(max_steps=3, micro_batch=8, grad_accum=1), tmp_path / "a", DistInfo())
    rb = train(CausalLMLoss(b), rows, cfg(max_steps=3, micro_batch=2, grad_accum=4), tmp_path / "b", DistInfo())
    assert ra.losses == pytest.approx(rb.losses, abs=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_loss_is_normalised_by_tokens_not_by_micro_batch(tmp_path):
    """A micro-batch with 1 trained token must not count as much as one with 60."""
    torch.manual_seed(0)
    short = Document([5, 6], [0, 1])
    long = Document(torch.randint(0, 256, (61,)).tolist(), [0] + [1] * 60)
    rows = pack([short, long], 64, 0, packing=False)
    model = load_model("tiny-llama")
    lm = CausalLMLoss(model)
    with torch.no_grad():
        from cogcore.train.data import make_batch
        per = [lm(make_batch(rows, torch.tensor([i]))) for i in range(2)]
    expected = float(sum(o["loss_sum"] for o in per) / sum(o["weight"] for o in per))
    res = train(lm, rows, cfg(max_steps=1, micro_batch=1, grad_accum=2, lr=1e-9, warmup_steps=0), tmp_path, DistInfo())
    assert res.losses[0] == pytest.approx(expected, rel=1e-5)


def test_lora_trains_adapter_and_leaves_base_untouched(rows, tmp_path):
    model = add_lora(load_model("tiny-llama"), LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(CausalLMLoss(model), rows, cfg(max_steps=5), tmp_path, DistInfo())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_resume_is_exact(rows, tmp_path):
    full = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=10, save_every=3), tmp_path / "full", DistInfo())
    part = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=10, save_every=3), tmp_path / "cut",
                 DistInfo(), stop_after=7)  # checkpoints at 3 and 6, then "dies" after step 7
    assert part.steps == 7
    rest = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=10, save_every=3), tmp_path / "cut", DistInfo())
    assert rest.resumed_from == 6
    assert rest.losses == pytest.approx(full.losses[6:], abs=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the step logged after the checkpoint is not duplicated


def test_resume_refuses_another_base_model(rows, tmp_path):
    train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=2), tmp_path, DistInfo(), base_hash="a" * 64)
    with pytest.raises(CogcoreError, match="was made for base model aaaaaaaaaaaa"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4), tmp_path, DistInfo(), base_hash="b" * 64)


def test_corrupt_checkpoint_is_explained(rows, tmp_path):
    train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=2), tmp_path, DistInfo())
    ckpt = next((tmp_path / "checkpoints").glob("step-*"))
    (ckpt / "trainable.pt").write_bytes(b"garbage")
    with pytest.raises(CogcoreError, match="unreadable.*delete that folder"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4), tmp_path, DistInfo())


def test_too_little_data_is_explained(tmp_path):
    rows = pack([Document([1, 2, 3], [0, 1, 1])], 16, 0)
    with pytest.raises(CogcoreError, match="one step needs 4"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(), tmp_path, DistInfo())


def test_schedule_warms_up_then_decays_to_min():
    c = cfg(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(c)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)


def test_qlora_on_a_4bit_base(rows, tmp_path):
    """The same loading switch gives an NF4 base (bitsandbytes); LoRA trains on top of it."""
    pytest.importorskip("bitsandbytes")
    from cogcore.train.model import ModelSpec
    model = load_model(ModelSpec(source="tiny-llama", quantize="nf4"))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.base_hash == load_model("tiny-llama").base_hash  # the adapter's base is the same weights
    model = add_lora(model, LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = train(CausalLMLoss(model), rows, cfg(max_steps=3), tmp_path, DistInfo())
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_resume_with_a_changed_config_is_refused_with_the_keys_listed(rows, tmp_path):
    run_config = {"data": {"seq_len": 64, "source": "builtin:arithmetic"}, "name": "a"}
    train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4, save_every=2), tmp_path, DistInfo(),
          run_config=run_config, stop_after=2)
    changed = {**run_config, "data": {**run_config["data"], "seq_len": 128}}
    with pytest.raises(CogcoreError, match=r"another config \(data.seq_len 64 -> 128, train.lr 0.003 -> 0.5\).*"
                                           r"new name.*train.resume=force"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4, lr=0.5), tmp_path, DistInfo(),
              run_config=changed)
    # keys that only say how long the run goes and what it logs may change
    res = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=6, log_every=3, save_every=0,
                                                                  progress=True, keep_checkpoints=3),
                tmp_path, DistInfo(), run_config={**run_config, "name": "b"})
    assert res.resumed_from == 2 and res.steps == 6
    # force: the user asked for it
    res = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=8, lr=0.5, resume="force"), tmp_path,
                DistInfo(), run_config=changed)
    assert res.resumed_from == 6 and res.steps == 8


def test_corrupt_resume_files_are_one_line_errors(rows, tmp_path):
    train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=2), tmp_path, DistInfo())
    ckpt = next((tmp_path / "checkpoints").glob("step-*"))
    good_state = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(good_state[: len(good_state) // 2])  # torn
    with pytest.raises(CogcoreError, match=r"state.json is unreadable.*delete the folder .*step-00000002"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4), tmp_path, DistInfo())
    (ckpt / "state.json").write_text(good_state)
    (ckpt / "scheduler.pt").write_bytes(b"not a pickle")
    with pytest.raises(CogcoreError, match=r"scheduler.pt is unreadable.*delete the folder"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=4), tmp_path, DistInfo())


def test_a_torn_last_metrics_line_is_tolerated(rows, tmp_path):
    train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=6, save_every=3), tmp_path, DistInfo(),
          stop_after=4)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # kill -9 in the middle of a write
    res = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=6, save_every=3), tmp_path, DistInfo())
    assert res.resumed_from == 3
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 7))
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(CogcoreError, match=r"metrics.jsonl line 2 is not a metrics row"):
        train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=6), tmp_path, DistInfo())


def test_tokens_seen_counts_tokens_not_loss_weights(tmp_path):
    """Half-weighted documents with padding: tokens are what the model read, the weights apart."""
    docs = [Document(list(range(3, 3 + n)), [0.0] + [0.5] * (n - 1)) for n in (20, 30, 11, 40)]
    rows = pack(docs, 64, 0, packing=False)  # 4 rows, 101 real tokens, 155 padding slots
    res = train(CausalLMLoss(load_model("tiny-llama")), rows, cfg(max_steps=3, micro_batch=2, grad_accum=2),
                tmp_path, DistInfo())
    assert res.tokens_seen == 3 * 101
    assert res.trained_tokens == 3 * 97
    assert res.loss_weight_sum == pytest.approx(3 * 97 * 0.5)
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["tokens"] == 3 * 101 and last["trained_tokens"] == 3 * 97
    state = json.loads(next((tmp_path / "checkpoints").glob("step-*")).joinpath("state.json").read_text())
    assert state["tokens_seen"] == 3 * 101 and state["loss_weight_sum"] == pytest.approx(3 * 97 * 0.5)


def test_a_lora_checkpoint_holds_only_trainable_weights_and_resumes_exactly(rows, tmp_path):
    """Tied embeddings (lm_head = embed_tokens, frozen) must not be saved with the adapter."""
    def lora_model():
        torch.manual_seed(0)
        m = load_model("tiny-llama")
        m.config.tie_word_embeddings = True
        m.tie_weights()
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
        return add_lora(m, LoraConfig(r=4, alpha=8))
    c = cfg(max_steps=6, save_every=3)
    full = train(CausalLMLoss(lora_model()), rows, c, tmp_path / "full", DistInfo())
    train(CausalLMLoss(lora_model()), rows, c, tmp_path / "cut", DistInfo(), stop_after=4)
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000003" / "trainable.pt", weights_only=True)
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k][:3]
    rest = train(CausalLMLoss(lora_model()), rows, c, tmp_path / "cut", DistInfo())
    assert rest.resumed_from == 3 and rest.losses == pytest.approx(full.losses[3:], abs=1e-6)


def test_adam_eps_damps_the_steps_of_weights_with_tiny_gradients():
    from cogcore.train.loop import make_optimizer

    def first_step(eps: float) -> float:
        w = torch.nn.Parameter(torch.zeros(4, 4))
        opt = make_optimizer([w], TrainConfig(lr=1e-3, adam_eps=eps))
        w.grad = torch.full((4, 4), 1e-6)   # a gradient far below eps
        opt.step()
        return w.detach().abs().max().item()

    assert first_step(1e-8) == pytest.approx(1e-3, rel=0.02)   # Adam moves it by ~lr whatever the gradient
    assert first_step(1e-4) < 2e-5
    with pytest.raises(ValueError, match="adam_eps must be > 0"):
        TrainConfig(adam_eps=-1)
