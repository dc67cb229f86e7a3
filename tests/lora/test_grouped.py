"""Grouped adapter training (lora/grouped.py): K users in one pass == K single-user PEFT runs."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from cogcore.bench.bench_refresh import train_single_peft
from cogcore.kernels import MultiLoRALinear
from cogcore.lora.grouped import (
    LoraShape,
    initial_adapter_weights,
    pack_user_rows,
    train_adapters_grouped,
)
from cogcore.lora.registry import write_adapter_dir
from cogcore.train.config import CogcoreError
from cogcore.train.data import builtin_records
from cogcore.train.lm import CausalLMLoss
from cogcore.train.loop import TrainConfig, read_metrics
from cogcore.train.model import load_model, load_tokenizer, model_hash

SEQ = 64
LORA = LoraShape(r=4, alpha=8.0, use_rslora=True)
# Tolerances: the adapters move ~2e-2 from their init in these runs; grouped and single
# differ only by float summation order (different batch shapes), measured <= 1e-6.
WEIGHT_ATOL = 2e-5
LOSS_RTOL = 1e-4


def cfg(**kw):
    base = dict(max_steps=12, micro_batch=2, grad_accum=2, lr=3e-3, warmup_steps=2, grad_clip=1.0,
                progress=False, tensorboard=False)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def users():
    """Three users with different amounts and kinds of data (alice cycles her rows most)."""
    recs = builtin_records("arithmetic", 420, 0)
    chat = builtin_records("chat-arithmetic", 60, 1)
    data = {
        "alice": recs[:40],
        "bob": recs[40:140] + chat[:30],
        "carol": [{"prompt": "Q: " + r["prompt"], "completion": r["completion"] * 2} for r in recs[140:300]],
    }
    held = {"alice": recs[300:340], "bob": recs[340:380], "carol": [
        {"prompt": "Q: " + r["prompt"], "completion": r["completion"] * 2} for r in recs[380:420]]}
    return data, held


def heldout_loss(lm, tok, records) -> float:
    rows = pack_user_rows(tok, records, SEQ)
    from cogcore.train.data import make_batch
    loss = CausalLMLoss(lm)
    with torch.no_grad():
        outs = [loss(make_batch(rows, torch.arange(i, min(i + 8, len(rows))))) for i in range(0, len(rows), 8)]
    return float(sum(o["loss_sum"] for o in outs) / sum(o["weight"] for o in outs))


def test_grouped_equals_single_runs(tok, users, tmp_path, one_thread):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    data, held = users
    model = load_model("tiny-llama")
    before = model_hash(model)
    grouped = train_adapters_grouped(model, tok, data, LORA, cfg(), tmp_path / "grouped", seq_len=SEQ)
    assert model_hash(model) == before, "the base must stay frozen"
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules()), "the patch must be undone"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags restored"

    metrics = [r for r in read_metrics(tmp_path / "grouped" / "metrics.jsonl") if "loss" in r]
    assert len(metrics) == 12 and {"loss/alice", "loss/bob", "loss/carol"} <= set(metrics[0])
    assert metrics[0]["loss"] == pytest.approx(sum(metrics[0][f"loss/{u}"] for u in data) / 3, rel=1e-6)

    for user, records in data.items():
        init = initial_adapter_weights(model, LORA, user, seed=0)
        single, res = train_single_peft(model, tok, records, LORA, cfg(), tmp_path / user, seq_len=SEQ,
                                        init=init, user=user)
        assert single.keys() == grouped[user].keys()
        assert metrics[-1][f"loss/{user}"] == pytest.approx(res.losses[-1], rel=LOSS_RTOL)
        moved = max(float((single[k] - init[k]).abs().max()) for k in single)
        assert moved > 1e-2, "the adapters must actually train for the comparison to mean anything"
        for k in single:
            assert single[k].shape == grouped[user][k].shape, k
            torch.testing.assert_close(grouped[user][k], single[k], atol=WEIGHT_ATOL, rtol=0, msg=k)

        # held-out loss: the grouped adapter as PEFT loads it from disk vs the single run's
        adapter_dir = write_adapter_dir(tmp_path / "adapters" / user, grouped[user], LORA.peft_config())
        peft_model = PeftModel.from_pretrained(load_model("tiny-llama"), str(adapter_dir))
        got = heldout_loss(peft_model, tok, held[user])
        ref_model = get_peft_model(load_model("tiny-llama"), LoraConfig(**LORA.peft_config()))
        set_peft_model_state_dict(ref_model, single)
        assert got == pytest.approx(heldout_loss(ref_model, tok, held[user]), rel=LOSS_RTOL)
        assert got < heldout_loss(load_model("tiny-llama"), tok, held[user]), "the adapter helps on its user's data"

    # users' adapters are their own: different data, different weights
    k = next(iter(grouped["alice"]))
    assert not torch.allclose(grouped["alice"][k], grouped["bob"][k])


def test_user_set_does_not_change_a_users_adapter(tok, users, tmp_path, one_thread):
    """alice trained alone and alongside bob and carol: the same adapter (per-user init, order, steps)."""
    data, _ = users
    model = load_model("tiny-llama")
    together = train_adapters_grouped(model, tok, data, LORA, cfg(max_steps=4), tmp_path / "k3", seq_len=SEQ,
                                      tokens_per_forward=1)  # also: one user per forward pass
    alone = train_adapters_grouped(model, tok, {"alice": data["alice"]}, LORA, cfg(max_steps=4), tmp_path / "k1",
                                   seq_len=SEQ)
    for k in alone["alice"]:
        torch.testing.assert_close(together["alice"][k], alone["alice"][k], atol=WEIGHT_ATOL, rtol=0)


def test_resume_and_warm_start(tok, users, tmp_path, one_thread):
    data, _ = users
    model = load_model("tiny-llama")
    full = train_adapters_grouped(model, tok, data, LORA, cfg(max_steps=6), tmp_path / "full", seq_len=SEQ)
    train_adapters_grouped(model, tok, data, LORA, cfg(max_steps=6, save_every=3), tmp_path / "cut", seq_len=SEQ,
                           stop_after=3)
    resumed = train_adapters_grouped(model, tok, data, LORA, cfg(max_steps=6, save_every=3), tmp_path / "cut",
                                     seq_len=SEQ)
    for u in data:
        for k in full[u]:
            torch.testing.assert_close(resumed[u][k], full[u][k], atol=1e-6, rtol=0)
    with pytest.raises(CogcoreError, match="grouped run for users"):
        train_adapters_grouped(model, tok, {"alice": data["alice"]}, LORA, cfg(max_steps=6), tmp_path / "cut",
                               seq_len=SEQ)
    # warm start: the given weights are where training starts (lr ~0: they come back unchanged)
    warm = train_adapters_grouped(model, tok, {"bob": data["bob"]}, LORA, cfg(max_steps=1, lr=1e-12),
                                  tmp_path / "warm", seq_len=SEQ, init={"bob": full["bob"]})
    for k in full["bob"]:
        torch.testing.assert_close(warm["bob"][k], full["bob"][k], atol=1e-9, rtol=0)


def test_layer_selection_equals_peft_layers_to_transform(tok, users, tmp_path, one_thread):
    """lora.layers=[-1]: adapters only on the last of tiny-llama's 2 decoder layers, trained grouped
    exactly as PEFT trains a LoraConfig(layers_to_transform=[1]), and loaded back by PEFT from disk."""
    from peft import PeftModel
    data, held = users
    upper = LoraShape(r=4, alpha=8.0, use_rslora=True, layers=(-1,))
    model = load_model("tiny-llama")
    grouped = train_adapters_grouped(model, tok, {"alice": data["alice"]}, upper, cfg(max_steps=6), tmp_path / "g",
                                     seq_len=SEQ)["alice"]
    assert grouped and all(".layers.1." in k for k in grouped), "only the last layer is adapted"
    assert len(grouped) == len(initial_adapter_weights(model, LORA, "alice")) // 2
    resolved = upper.for_model(model)
    assert resolved.layers == (1,) and resolved.peft_config()["layers_to_transform"] == [1]

    init = initial_adapter_weights(model, upper, "alice", seed=0)
    single, _ = train_single_peft(model, tok, data["alice"], resolved, cfg(max_steps=6), tmp_path / "s", seq_len=SEQ,
                                  init=init, user="alice")
    assert single.keys() == grouped.keys()
    for k in single:
        torch.testing.assert_close(grouped[k], single[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    adapter_dir = write_adapter_dir(tmp_path / "adapter", grouped, resolved.peft_config())
    peft_model = PeftModel.from_pretrained(load_model("tiny-llama"), str(adapter_dir))
    assert {n.split(".layers.")[1].split(".")[0] for n, _ in peft_model.named_parameters() if "lora_A" in n} == {"1"}
    assert heldout_loss(peft_model, tok, held["alice"]) < heldout_loss(load_model("tiny-llama"), tok, held["alice"])

    with pytest.raises(CogcoreError, match=r"lora.layers: layer indices \[2\] are out of range: the model has 2"):
        train_adapters_grouped(model, tok, {"alice": data["alice"]}, LoraShape(r=4, layers=(0, 2)), cfg(max_steps=1),
                               tmp_path / "bad", seq_len=SEQ)
    with pytest.raises(CogcoreError, match="resolve them against the model first"):
        upper.peft_config()
    assert LoraShape.of({"r": 4, "lora_alpha": 8, "layers_to_transform": 1}).layers == (1,)


def test_clear_errors(tok, users, tmp_path):
    data, _ = users
    model = load_model("tiny-llama")
    with pytest.raises(CogcoreError, match="user dave: none of its 1 records"):
        train_adapters_grouped(model, tok, {"alice": data["alice"], "dave": [{"prompt": "x", "completion": ""}]},
                               LORA, cfg(), tmp_path / "a", seq_len=SEQ)
    with pytest.raises(CogcoreError, match="no LoRA dropout"):
        LoraShape.of({"r": 4, "alpha": 8, "dropout": 0.1})
    with pytest.raises(CogcoreError, match="rank 4"):
        train_adapters_grouped(model, tok, {"alice": data["alice"]}, LoraShape(r=8), cfg(max_steps=1),
                               tmp_path / "b", seq_len=SEQ, init={"alice": initial_adapter_weights(model, LORA, "x")})
    # the refresh recipe's spec (targets / rslora field names) is understood
    spec = LoraShape.of(type("Spec", (), {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj"], "rslora": True})())
    assert spec == LoraShape(r=8, alpha=16.0, target_modules=("q_proj",), use_rslora=True) and spec.scale == 16 / 8**0.5


DRIVER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from cogcore.lora.grouped import LoraShape, train_adapters_grouped
    from cogcore.train.data import builtin_records
    from cogcore.train.distributed import setup, teardown
    from cogcore.train.loop import TrainConfig
    from cogcore.train.model import load_model, load_tokenizer
    di = setup()
    recs = builtin_records("arithmetic", 300, 0)
    data = {"alice": recs[:40], "bob": recs[40:140], "carol": recs[140:300]}
    cfg = TrainConfig(max_steps=5, micro_batch=2, grad_accum=1, lr=3e-3, warmup_steps=1, progress=False,
                      tensorboard=False)
    out = train_adapters_grouped(load_model("tiny-llama"), load_tokenizer("tiny-llama"), data,
                                 LoraShape(r=4, alpha=8.0), cfg, sys.argv[2], di, seq_len=64)
    if di.rank == 0:
        torch.save(out, sys.argv[1])
    teardown()
""")


def test_users_split_across_processes(tok, tmp_path, one_thread):
    """--nproc 2: each rank trains its users only; every user's adapter equals the one-process run."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
                           str(tmp_path / "two.pt"), str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert (tmp_path / "two" / "rank0" / "metrics.jsonl").is_file() and (tmp_path / "two" / "rank1").is_dir()
    recs = builtin_records("arithmetic", 300, 0)
    data = {"alice": recs[:40], "bob": recs[40:140], "carol": recs[140:300]}
    one = train_adapters_grouped(load_model("tiny-llama"), tok, data, LoraShape(r=4, alpha=8.0),
                                 cfg(max_steps=5, grad_accum=1, warmup_steps=1), tmp_path / "one", seq_len=64)
    assert two.keys() == one.keys() == data.keys()
    for u in data:
        for k in one[u]:
            torch.testing.assert_close(two[u][k], one[u][k], atol=WEIGHT_ATOL, rtol=0)
