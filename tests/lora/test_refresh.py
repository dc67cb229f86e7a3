"""`cogcore refresh` on tiny-llama: trains only the LoRA on the user's set, gates, publishes a PEFT
adapter; warm start; exact resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lora_helpers import TINY_REFRESH, make_user_set
from safetensors.torch import load_file

from cogcore.lora.refresh import LoraSpec, RefreshConfig, add_lora, run
from cogcore.lora.registry import AdapterRegistry
from cogcore.train.checkpoint import latest_checkpoint
from cogcore.train.config import CogcoreError, ConfigError, load_config
from cogcore.train.loop import read_metrics
from cogcore.train.model import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_refresh_trains_the_lora_only_and_publishes(general_base, fresh_home, demo_users, one_thread):
    from peft import PeftModel
    alice = next(u for u in demo_users.users if u.id == "alice")
    tok = load_tokenizer(general_base)
    make_user_set(fresh_home, tok, alice, 1, n_train=20, replay_share=0.5)
    res = run(load_config(RefreshConfig, None, ["user=alice", f"model.source={general_base}", *TINY_REFRESH]))
    run_dir = fresh_home / "runs" / "refresh-alice-set1"
    assert res.run_dir == str(run_dir) and res.passed and res.published == "alice@v1", res.reasons

    losses = [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5, losses[::10]
    # only LoRA tensors changed: whatever else the checkpoint holds (a tied lm_head) is the base's own
    trained = torch.load(latest_checkpoint(run_dir) / "trainable.pt", weights_only=True)
    lora = {k for k in trained if ".lora_A." in k or ".lora_B." in k}
    base_sd = load_model(general_base).state_dict()
    for k in set(trained) - lora:
        assert torch.equal(trained[k], base_sd[k.replace("model.base_model.model.", "")]), k
    art = AdapterRegistry().get("alice")
    weights = load_file(art.weights_path)
    assert {"model." + k.replace(".weight", ".default.weight") for k in weights} == lora
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # B left its zero init
    assert art.lineage["set_version"] == 1 and art.lineage["warm_start_from"] is None and art.gate["passed"]
    assert art.peft_config["r"] == 8 and art.base_hash == load_model(general_base).base_hash
    for f in ("gate.json", "summary.json", "config.yaml", "adapter/adapter_model.safetensors"):
        assert (run_dir / f).is_file(), f

    # the published directory is plain PEFT: it loads and changes the base's outputs
    base = load_model(general_base)
    ids = torch.tensor([tok("<|im_start|>user\nrefund please<|im_end|>\n").input_ids])
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(art.path))(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-3)

    # warm start from the LIVE adapter on the next set; the gate compares with alice@v1
    make_user_set(fresh_home, tok, alice, 2, n_train=24, replay_share=0.5)
    res2 = run(load_config(RefreshConfig, None, ["user=alice", f"model.source={general_base}", "warm_start=true",
                                                 *TINY_REFRESH, "train.max_steps=20"]))
    assert res2.gate["reference"] == "alice@v1"
    assert res2.gate["criteria"]["heldout_policy_loss"]["against"] == "alice@v1"
    if res2.passed:
        art2 = AdapterRegistry().get("alice")
        assert art2.version == 2 and art2.lineage["warm_start_from"] == "alice@v1"
    else:  # a refusal keeps v1 live and is recorded
        assert AdapterRegistry().live_version("alice") == 1 and res2.reasons


def test_only_lora_parameters_are_trainable():
    model = add_lora(load_model("tiny-llama"), LoraSpec(r=4, targets=["q_proj", "down_proj"], rslora=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "down_proj"}  # ...q_proj.lora_A.default.weight
    assert model.peft_config["default"].use_rslora
    # lora.layers: the upper decoder layer only (negative from the last), as PEFT's layers_to_transform
    upper = add_lora(load_model("tiny-llama"), LoraSpec(r=4, layers=[-1]))
    names = [n for n, p in upper.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert upper.peft_config["default"].layers_to_transform == [1]
    with pytest.raises(CogcoreError, match=r"lora.layers: layer indices \[-3\] are out of range: the model has 2 "):
        add_lora(load_model("tiny-llama"), LoraSpec(r=4, layers=[-3]))


def test_refresh_config_errors(fresh_home):
    with pytest.raises(ConfigError, match="lora.r must be >= 1"):
        load_config(RefreshConfig, None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="say whose adapter"):
        run(RefreshConfig())
    with pytest.raises(CogcoreError, match="nobody has no consolidated set yet: run `cogcore memory consolidate"):
        run(load_config(RefreshConfig, None, ["user=nobody", "model.source=tiny-llama"]))
    with pytest.raises(ConfigError, match="invalid user id"):
        load_config(RefreshConfig, None, ["user=../x"])
    with pytest.raises(ConfigError, match="replay_loss"):
        load_config(RefreshConfig, None, ["data.replay_loss=mse"])


CLI = ["-m", "cogcore.cli", "refresh"]
FAST = ["model.source=tiny-llama", "gate.enabled=false", "lora.r=4", "data.seq_len=256", "train.max_steps=40",
        "train.save_every=5", "train.lr=1e-3", "train.progress=false", "train.tensorboard=false"]


def test_kill_9_during_training_then_rerun_gives_the_same_adapter(fresh_home, demo_users, one_thread):
    alice = next(u for u in demo_users.users if u.id == "alice")
    tok = load_tokenizer("tiny-llama")
    for user in ("straight", "killed"):
        make_user_set(fresh_home, tok, alice, 1, n_train=12, as_user=user)
    run(load_config(RefreshConfig, None, ["user=straight", *FAST]))

    # the real CLI in its own process, killed -9 once it has written a checkpoint
    run_dir = fresh_home / "runs" / "refresh-killed-set1"
    child = subprocess.Popen([sys.executable, *CLI, "--user", "killed", *FAST], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None and latest_checkpoint(run_dir) is None:
        time.sleep(0.05)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    reg = AdapterRegistry()
    assert reg.live_version("killed") is None and reg.list("killed") == []  # nothing half published

    again = run(load_config(RefreshConfig, None, ["user=killed", *FAST]))
    assert again.train.resumed_from is not None and 0 < again.train.resumed_from < 40
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == again.train.resumed_from
    want, got = load_file(reg.get("straight").weights_path), load_file(reg.get("killed").weights_path)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

    # once more: nothing left to train, the same weights are already live -> no new version
    third = run(load_config(RefreshConfig, None, ["user=killed", *FAST]))
    assert third.published == "killed@v1" and [a.name for a in reg.list("killed")] == ["killed@v1"]


def test_qlora_refresh_on_an_nf4_base(fresh_home, demo_users, one_thread):
    alice = next(u for u in demo_users.users if u.id == "alice")
    make_user_set(fresh_home, load_tokenizer("tiny-llama"), alice, 1, n_train=8)
    res = run(load_config(RefreshConfig, None, [
        "user=alice", "model.source=tiny-llama", "model.quantize=nf4", "lora.r=4", "train.max_steps=6",
        "train.progress=false", "data.seq_len=256", "gate.probes=2", "gate.general_documents=8",
        "gate.max_new_tokens=8", "gate.probe_max_new_tokens=4"]))
    art = AdapterRegistry().get("alice")
    assert res.published == "alice@v1" and art.lineage["quantize"] == "nf4"
    assert art.base_hash == load_model("tiny-llama").base_hash  # the same base, loaded in 4 bits


def test_replay_answered_by_the_base_is_what_the_base_itself_says(general_base, one_thread):
    """replay_answers=base: a replay row's answer becomes the base's own greedy reply (its argmax at
    every trained token), ended like a chat reply; a reply cut at the budget is no answer and the
    row keeps the set's; rows of other targets and prompt-less replay stay."""
    from cogcore.lora.gate import prompt_text
    from cogcore.lora.refresh import answer_replay_with_base
    from cogcore.memory.formats import example_segments, reply_end
    from cogcore.train.data import builtin_records, record_segments, tokenize_record

    tok = load_tokenizer(general_base)
    model = load_model(general_base).eval()
    replay = [{"segments": [{"text": t, "weight": w} for t, w in record_segments(r, tok, "completion", "test")],
               "target": "replay"} for r in builtin_records("chat-everyday", 6, 5)]
    for r in replay:  # a wrong answer in the set: the base's own reply replaces it where it ends
        r["segments"][-1]["text"] = r["segments"][-1]["text"].replace("\n", "\nlol ok ", 1)
    policy = {"segments": example_segments(tok, [{"role": "user", "content": "refund please"}], "Sure.", 1.0),
              "target": "policy"}
    plain = {"segments": [{"text": "just some text", "weight": 1.0}], "target": "replay"}
    records = replay + [policy, plain]
    out = answer_replay_with_base(model, tok, records, max_new_tokens=64, quiet=True)

    assert out[-2] == policy and out[-1] == plain and len(out) == len(records)
    header, end = "<|im_start|>assistant\n", reply_end(tok)
    answered = [after for before, after in zip(replay, out) if after != before]
    for before, after in zip(replay, out):
        assert prompt_text(after["segments"]) == prompt_text(before["segments"])
        assert [s["weight"] for s in after["segments"]] == [0.0, 1.0]
        assert after["segments"][1]["text"].startswith(header)
        if after != before:  # answered by the base: its reply, ended, and no trace of the set's
            assert after["segments"][1]["text"].endswith(end) and "lol ok" not in after["segments"][1]["text"]
    assert len(answered) >= 3, "fewer than 3 base replies ended within 64 tokens"
    # the base's argmax at each token of the reply is that token (decode -> encode may shift a boundary)
    hits = total = 0
    for rec in answered:
        prompt = rec["segments"][0]["text"] + header
        reply = rec["segments"][1]["text"][len(header):].removesuffix(end)
        ids = tokenize_record({"segments": [{"text": prompt, "weight": 0.0}]}, tok, add_eos=False).input_ids
        doc = tokenize_record({"segments": [{"text": prompt, "weight": 0.0}, {"text": reply, "weight": 1.0}]}, tok,
                              add_eos=False)
        with torch.no_grad():
            pred = model(torch.tensor([doc.input_ids])).logits[0].argmax(-1)
        for i in range(len(ids), len(doc.input_ids)):
            hits += int(pred[i - 1] == doc.input_ids[i])
            total += 1
    assert total > 20 and hits / total > 0.9, (hits, total)
    # at a 2-token budget only a reply that ended at once replaces the set's answer
    short = answer_replay_with_base(model, tok, replay, max_new_tokens=2, quiet=True)
    kept = [a == b for a, b in zip(short, replay)]
    assert any(kept) and all(k or a["segments"][1]["text"] == header + end for a, k in zip(short, kept))


def test_grouped_refresh_run_is_named_by_its_data(fresh_home, demo_users, one_thread):
    """Other replay answers are other training data: the grouped run lands in another directory
    (it must not resume, and reuse, the adapters trained on the set's own answers)."""
    from cogcore.lora.refresh import refresh_grouped
    tok = load_tokenizer("tiny-llama")
    for u in demo_users.users[:2]:
        make_user_set(fresh_home, tok, u, 1, n_train=6, replay_share=0.5)
    common = ["model.source=tiny-llama", "lora.r=4", "train.max_steps=1", "train.save_every=1", "data.seq_len=128",
              "train.progress=false", "train.tensorboard=false", "gate.enabled=false"]
    users = [u.id for u in demo_users.users[:2]]
    refresh_grouped(load_config(RefreshConfig, None, common), users, AdapterRegistry())
    refresh_grouped(load_config(RefreshConfig, None, common + ["data.replay_answers=base",
                                                                "data.replay_max_new_tokens=4"]), users,
                    AdapterRegistry())
    # so is another replay loss (the same records, trained by KL to the base)
    refresh_grouped(load_config(RefreshConfig, None, common + ["data.replay_loss=kl"]), users, AdapterRegistry())
    # and another adapter shape: the upper layer only, published with its layers_to_transform
    res = refresh_grouped(load_config(RefreshConfig, None, common + ["lora.layers=-1"]), users, AdapterRegistry())
    runs = sorted(p.name for p in (fresh_home / "runs").glob("refresh-grouped-*"))
    assert len(runs) == 4, runs
    art = AdapterRegistry().get(res[0].user)
    assert art.peft_config["layers_to_transform"] == [1]
    assert json.loads((art.path / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    assert all(".layers.1." in k for k in load_file(art.path / "adapter_model.safetensors"))


def test_single_user_refresh_with_kl_replay(fresh_home, demo_users, one_thread):
    """The single-user recipe (PEFT model) trains with replay_loss=kl+ce: replay rows packed apart,
    the base seen through the disabled adapter; the run records the setting."""
    tok = load_tokenizer("tiny-llama")
    alice = demo_users.users[0]
    make_user_set(fresh_home, tok, alice, 1, n_train=8, replay_share=0.5)
    res = run(load_config(RefreshConfig, None, [f"user={alice.id}", "data.replay_loss=kl+ce", *FAST[:2],
                                                "lora.r=4", "data.seq_len=128", "train.max_steps=4",
                                                "train.save_every=4", "train.progress=false",
                                                "train.tensorboard=false"]))
    assert res.train.steps == 4 and res.published == f"{alice.id}@v1"
    losses = [m["loss"] for m in read_metrics(Path(res.run_dir) / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses), losses
    assert "replay_loss: kl+ce" in (Path(res.run_dir) / "config.yaml").read_text()


def test_a_refused_adapter_is_gated_again_with_less_of_its_update(general_base, fresh_home, demo_users, one_thread,
                                                                   monkeypatch):
    """The back-off: an adapter that learned its user's world but failed on general ability is
    gated again at each of gate.backoff_scales, and the first share that passes is published.

    The real gate runs every time; only its verdict on general ability is a stand-in (a tiny model
    cannot be made to forget facts at one scale and not another on cue): it refuses while the
    candidate's loaded lora_B weights are over 0.6 of the trained ones', so the test also sees which
    weights each gate really ran."""
    import cogcore.lora.refresh as refresh
    real_gate, norms = refresh.gate, {}

    def strict_gate(model, tokenizer, *, candidate, **kw):
        report = real_gate(model, tokenizer, candidate=candidate, **kw)
        norms[candidate] = sum(float(p.norm()) for n, p in model.named_parameters() if f"lora_B.{candidate}." in n)
        if norms[candidate] > 0.6 * norms["default"]:
            report["criteria"]["general_probe_accuracy"] = {"passed": False, "n": 1, "note": "stand-in"}
            report["reasons"].append("general_probe_accuracy fell (stand-in)")
            report["passed"] = False
        return report
    monkeypatch.setattr(refresh, "gate", strict_gate)

    alice = next(u for u in demo_users.users if u.id == "alice")
    make_user_set(fresh_home, load_tokenizer(general_base), alice, 1, n_train=20, replay_share=0.5)
    res = run(load_config(RefreshConfig, None, ["user=alice", f"model.source={general_base}", *TINY_REFRESH,
                                                "gate.backoff_scales=[0.75,0.5,0.25]"]))
    assert list(norms) == ["default", "default-scale-0_75", "default-scale-0_5"]  # stops at the first that passes
    assert norms["default-scale-0_75"] == pytest.approx(0.75 * norms["default"], rel=1e-3)
    assert norms["default-scale-0_5"] == pytest.approx(0.5 * norms["default"], rel=1e-3)
    assert res.passed and res.published == "alice@v1", res.reasons
    assert res.gate["scale"] == 0.5 and [t["scale"] for t in res.gate["backoff"]] == [1.0, 0.75]
    assert all("stand-in" in t["reasons"][-1] for t in res.gate["backoff"])

    run_dir = fresh_home / "runs" / "refresh-alice-set1"
    art = AdapterRegistry().get("alice")
    assert art.lineage["scale"] == 0.5 and json.loads((run_dir / "gate.json").read_text())["scale"] == 0.5
    trained, published = load_file(run_dir / "adapter" / "adapter_model.safetensors"), load_file(art.weights_path)
    assert trained.keys() == published.keys()
    for k, w in trained.items():  # what went live is the trained adapter with half its update
        torch.testing.assert_close(published[k], w * 0.5 if "lora_B" in k else w)

    # only forgetting is a matter of dose: a failed held-out check, junk margin or leakage is not
    from cogcore.lora.gate import may_back_off
    failing = lambda *names: {"passed": False, "criteria": {  # noqa: E731
        "heldout_policy_loss": {"passed": "heldout_policy_loss" not in names},
        **{n: {"passed": False} for n in names}}}
    assert may_back_off(failing("general_probe_accuracy")) and may_back_off(failing("general_answer_accuracy",
                                                                                    "general_loss"))
    for names in (("heldout_policy_loss", "general_loss"), ("leakage",), ("general_probe_accuracy", "general_junk_margin"),
                  ("heldout_junk_margin",)):
        assert not may_back_off(failing(*names)), names
    assert not may_back_off({"passed": True, "criteria": {}})
