"""The eval gate: publishes an adapter trained on clean experience, blocks one trained on junk
(brain rot) and says why; the junk dose shows in the general junk margin. Plus its pure parts."""

import re

import pytest
from lora_helpers import TINY_REFRESH, make_user_set

from cogcore.lora.gate import GateConfig, acts_right, leak_patterns
from cogcore.lora.refresh import RefreshConfig, run
from cogcore.lora.registry import AdapterRegistry
from cogcore.train.config import ConfigError, load_config
from cogcore.train.model import load_tokenizer


def test_gate_publishes_clean_blocks_junk_and_the_dose_shows(general_base, fresh_home, demo_users, one_thread):
    tok = load_tokenizer(general_base)
    users = {u.id: u for u in demo_users.users}
    make_user_set(fresh_home, tok, users["bob"], 1, n_train=12, replay_share=0.5)  # someone to leak
    results = {}
    for name, share in (("clean", 0.0), ("half", 0.5), ("junk", 1.0)):
        make_user_set(fresh_home, tok, users["alice"], 1, n_train=24, junk=list(demo_users.junk), junk_share=share,
                      as_user=name, replay_share=0.5)
        cfg = load_config(RefreshConfig, None, [f"user={name}", f"model.source={general_base}", *TINY_REFRESH])
        results[name] = run(cfg)
    reg = AdapterRegistry()
    clean, junk = results["clean"], results["junk"]
    margins = {n: r.gate["criteria"]["general_junk_margin"]["value"] for n, r in results.items()}
    print("junk share -> general junk margin (nats):", margins)

    assert clean.passed and clean.published == "clean@v1" and reg.live_version("clean") == 1, clean.reasons
    crit = clean.gate["criteria"]
    assert crit["heldout_policy_loss"]["value"] < crit["heldout_policy_loss"]["reference"]  # learned alice's world
    assert crit["leakage"]["n"] > 0 and crit["leakage"]["other_users"] == ["bob"]  # half, junk come later

    assert not junk.passed and junk.published is None and reg.live_version("junk") is None
    assert any(r.startswith("general_junk_margin fell") for r in junk.reasons), junk.reasons
    assert junk.gate["backoff"] == [] and junk.gate["scale"] == 1.0  # junk is no matter of dose: no back-off
    assert (fresh_home / "runs" / "refresh-junk-set1" / "gate.json").is_file()  # the refusal is recorded
    assert margins["clean"] > margins["half"] > margins["junk"]  # dose-response: more junk, more rot
    for r in results.values():  # every criterion reports its numbers and n
        for name, c in r.gate["criteria"].items():
            assert "n" in c and ("value" in c or c["n"] == 0), name
    answers = crit["general_answer_accuracy"]  # asked of base and candidate alike: the paired counts
    assert answers["paired"]["lost"] + answers["paired"]["gained"] <= answers["n"]
    assert 0 < answers["paired"]["p_value_worse"] <= 1


def test_paired_change_is_an_exact_sign_test():
    from cogcore.lora.gate import paired_change
    before = [True] * 7 + [False] * 57
    after = [True] * 2 + [False] * 62  # alice's general sums in the demo: 7/64 -> 2/64
    got = paired_change(before, after)
    assert (got["lost"], got["gained"]) == (5, 0) and got["p_value_worse"] == 1 / 32
    mixed = paired_change([True, True, False, False, True], [False, True, True, False, True])
    assert (mixed["lost"], mixed["gained"]) == (1, 1) and mixed["p_value_worse"] == 0.75
    assert paired_change([True, False], [True, False]) == {"lost": 0, "gained": 0, "p_value_worse": 1.0}


def test_acts_right_uses_check_then_the_right_action():
    assert acts_right("Please send the last 4 digits.", r"(?i)last (four|4) digits", "")
    assert not acts_right("lol ok", r"(?i)last (four|4) digits", "Send the last four digits")
    assert acts_right("  ANSWER: 31, done", "", "ANSWER: 31")
    assert acts_right("Sure. answer 31", "", "ANSWER: 31")
    assert not acts_right("ANSWER: 3", "", "ANSWER: 31")


def test_leak_patterns_skip_rules_the_user_shares():
    mine = [{"right_action": "Tell me your order number and postcode.", "check": ""}]
    others = {"bob": [{"check": r"(?i)order number", "right_action": "x"}],
              "carol": [{"check": r"^ANSWER:", "right_action": "ANSWER: 4"}, {"check": r"^ANSWER:", "right_action": "y"}],
              "dave": [{"check": "", "right_action": "Ask for the badge ID"}]}
    pats = leak_patterns(mine, others)
    assert [u for u, _ in pats] == ["carol", "dave"]  # bob's rule is also this user's: not a leak
    assert isinstance(pats[0][1], re.Pattern) and pats[1][1] == "ask for the badge id"


def test_gate_config_is_validated():
    with pytest.raises(ConfigError, match="gate.policy_tolerance"):
        load_config(RefreshConfig, None, ["gate.policy_tolerance=2"])
    with pytest.raises(ConfigError, match="unknown config key 'gate.probe'"):
        load_config(RefreshConfig, None, ["gate.probe=3"])
    for scales in ("[0.5,1.0]", "[0.5,0.75]", "[0.5,0.5]"):  # shares below 1, largest first
        with pytest.raises(ConfigError, match="gate.backoff_scales"):
            load_config(RefreshConfig, None, [f"gate.backoff_scales={scales}"])
    with pytest.raises(ConfigError, match="gate.probe_file .*nope.json does not exist"):
        load_config(RefreshConfig, None, ["gate.probe_file=/no/such/dir/nope.json"])
    assert GateConfig().backoff_scales == [0.75, 0.5]


def test_the_gates_probes_are_its_own_well_formed_and_never_trained_on():
    """The gate's 311 probes: each a real question with an answer its context states, none of the
    cognitive-core eval's 150 (the demo's check stays apart from the gate's decision), none a
    builtin:chat-broad replay question (replay would train on what the gate measures)."""
    from cogcore.eval.probes import load_probes, mentions
    from cogcore.lora.gate import GATE_PROBES, gate_probes
    from cogcore.train.data import _KNOWLEDGE
    probes = gate_probes(GateConfig())
    assert len(probes) == len(load_probes(GATE_PROBES)) == 311
    assert len({p.id for p in probes}) == len({p.question for p in probes}) == 311
    assert len({p.category for p in probes}) >= 10
    for p in probes:
        assert p.question.endswith("?") and mentions(p.context, p.answers, p.case_sensitive), p.id
        assert not mentions(p.counter_context, p.answers, p.case_sensitive), p.id  # the counterfact replaces it
    asked = {p.question.lower() for p in probes}
    assert not asked & {p.question.lower() for p in load_probes()}
    assert not asked & {q.lower() for q, _ in _KNOWLEDGE}
    some = gate_probes(GateConfig(probes=40))  # a subset spread over the file reaches every category
    assert len(some) == 40 and {p.category for p in some} == {p.category for p in probes}
    assert len(gate_probes(GateConfig(probes=200))) == 200 and gate_probes(GateConfig(probes=0)) == []


def test_a_scaled_adapter_moves_that_share_of_the_way_from_the_base(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    from cogcore.lora.gate import scaled_adapter
    from cogcore.train.model import load_model
    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "full")
    half = scaled_adapter(tmp_path / "full", tmp_path / "half", 0.5)
    assert (half / "adapter_config.json").read_text() == (tmp_path / "full" / "adapter_config.json").read_text()
    from safetensors import safe_open
    with safe_open(tmp_path / "full" / "adapter_model.safetensors", "pt") as a, \
            safe_open(half / "adapter_model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt"}

    def deltas(adapter_dir):
        peft = PeftModel.from_pretrained(load_model("tiny-llama"), str(adapter_dir))
        return {n: m.get_delta_weight("default") for n, m in peft.named_modules() if hasattr(m, "get_delta_weight")}
    full, scaled = deltas(tmp_path / "full"), deltas(half)
    assert len(full) == 2 * load_model("tiny-llama").config.num_hidden_layers
    for name, d in full.items():
        assert d.abs().max() > 0
        torch.testing.assert_close(scaled[name], 0.5 * d)
    # an adapter with weights of another kind (a trained embedding, DoRA magnitudes) is not scaled blindly
    weights = load_file(tmp_path / "full" / "adapter_model.safetensors")
    save_file({**weights, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, tmp_path / "full" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="other than LoRA A/B"):
        scaled_adapter(tmp_path / "full", tmp_path / "other", 0.5)


def test_bf16_scoring_is_close_to_fp32_and_cached_apart(tmp_path, cogcore_home, one_thread):
    """gate.precision=bf16 scores losses under autocast: close to fp32, and its cached base numbers
    are kept apart from the fp32 ones (a gate never compares a bf16 candidate with an fp32 base)."""
    from peft import LoraConfig, get_peft_model

    from cogcore.lora.gate import _base_general, weighted_loss
    from cogcore.train.model import ModelSpec, load_model
    spec = ModelSpec(source="tiny-llama")
    tok, model = load_tokenizer(spec), load_model(spec)
    recs = [{"segments": [{"text": f"What is {i} + {i}?", "weight": 0.0}, {"text": f" {2 * i}.", "weight": 1.0}]}
            for i in range(8)]
    fp32, n = weighted_loss(model, tok, recs, 128, 4, "fp32")
    bf16, n16 = weighted_loss(model, tok, recs, 128, 4, "bf16")
    assert n == n16 == 8 and fp32 > 0
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.02 * fp32  # really ran in bf16, and agrees
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    for precision in ("fp32", "bf16"):
        _base_general(peft_model, tok, GateConfig(probes=0, general_documents=4, precision=precision), tmp_path, "b",
                      {})
    assert len(list(tmp_path.glob("gate-base-*.json"))) == 2
    # a shorter reply budget changes the base's answers: its numbers are cached apart too
    _base_general(peft_model, tok, GateConfig(probes=0, general_documents=4, max_new_tokens=8), tmp_path, "b", {})
    assert len(list(tmp_path.glob("gate-base-*.json"))) == 3


def test_a_general_answer_counts_by_its_result_not_its_wording():
    from cogcore.lora.gate import _answer_hit
    assert _answer_hit("85 + 88 = 173.", "85 + 88 = 173.")
    assert _answer_hit("The sum of 85 and 88 is 173", "85 + 88 = 173.")
    assert _answer_hit("ANSWER: 173", "85 + 88 = 173.")
    assert not _answer_hit("85 + 88 = 100.", "85 + 88 = 173.")
    assert not _answer_hit("It is 1730.", "85 + 88 = 173.")     # a longer number is not the result
    assert _answer_hit("4 - 7 = -3", "4 - 7 = -3.") and not _answer_hit("4 - 7 = 3", "4 - 7 = -3.")
    assert _answer_hit("Cold, of course.", "The opposite of hot is cold.")
    assert not _answer_hit("It is colder.", "The opposite of hot is cold.")
    assert not _answer_hit("anything", "")


def _tiny_with_adapter():
    """tiny-llama under a PEFT adapter "u" whose B is not zero (so it changes the logits)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cogcore.train.model import ModelSpec, load_model
    torch.manual_seed(0)
    model = get_peft_model(load_model(ModelSpec(source="tiny-llama")),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name="u")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_a_merged_adapter_generates_alike_and_gives_the_base_back(one_thread):
    """The gate generates the candidate's replies with its adapter merged: the same logits, and the
    base weights come back bit for bit (a bf16 base is never merged: the delta would be rounded)."""
    import torch

    from cogcore.lora.gate import mergeable, using
    model = _tiny_with_adapter()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad(), using(model, "u"):
        plain = model(input_ids=ids).logits
    with torch.no_grad(), using(model, "u", merged=True):
        assert all(m.merged for m in model.modules() if hasattr(m, "lora_A"))  # it really merged
        merged = model(input_ids=ids).logits
    with torch.no_grad(), using(model, None):
        base = model(input_ids=ids).logits
    assert torch.allclose(plain, merged, atol=1e-5) and not torch.allclose(plain, base, atol=1e-3)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    assert not any(m.merged for m in model.modules() if hasattr(m, "lora_A"))
    assert len(mergeable(model)) == 6 and mergeable(model.to(torch.bfloat16)) == []


def test_bf16_generation_runs_a_bf16_copy_and_leaves_the_model_as_it_was(one_thread):
    """gate.precision=bf16 generates from a bf16 copy with the adapter merged in: its logits follow
    the fp32 adapter's (not the base's), and the model itself keeps its fp32 weights, bit for bit."""
    import torch

    from cogcore.eval.core import in_precision
    from cogcore.lora.gate import generating
    model = _tiny_with_adapter()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        with generating(model, "u", "fp32") as g:
            assert g is model
            adapted = g(input_ids=ids).logits
        with generating(model, None, "fp32") as g:
            base = g(input_ids=ids).logits
        with generating(model, "u", "bf16") as g:
            assert g is not model and {p.dtype for p in g.parameters()} == {torch.bfloat16}
            adapted16 = g(input_ids=ids).logits.float()
        with generating(model, None, "bf16") as g:
            base16 = g(input_ids=ids).logits.float()
    assert (adapted16 - adapted).abs().max() < (adapted - base).abs().max() / 2
    assert (base16 - base).abs().max() < (adapted - base).abs().max() / 2
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with in_precision(model.to(torch.bfloat16), "bf16") as g:  # already bf16: nothing to copy
        assert g is model


def test_replies_asked_again_come_from_the_memo(monkeypatch):
    """The gate asks the base the same held-out prompts several times (reference, leakage, the
    next user's gate): with a memo only prompts not asked before are generated."""
    import cogcore.eval.core as core
    from cogcore.lora.gate import replies
    asked = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):  # records what reaches the model
        asked.append([tuple(p) for p in prompts])
        return [f"reply to {p[0]} in {max_new_tokens}" for p in prompts]
    monkeypatch.setattr(core, "generate", fake_generate)
    memo: dict = {}
    assert replies(None, None, [[1], [2], [1]], 8, 4, memo, "base") == ["reply to 1 in 8", "reply to 2 in 8"] + \
        ["reply to 1 in 8"]
    assert replies(None, None, [[2], [3]], 8, 4, memo, "base") == ["reply to 2 in 8", "reply to 3 in 8"]
    assert replies(None, None, [[3]], 4, 4, memo, "base") == ["reply to 3 in 4"]  # another budget: asked anew
    assert replies(None, None, [[3]], 8, 4, memo, "alice") == ["reply to 3 in 8"]  # another model: asked anew
    assert asked == [[(1,), (2,)], [(3,)], [(3,)], [(3,)]]
