"""`cogcore demo --quick`: the whole loop on a tiny random model, through the real CLI and a real server.

A shortened demo (tiny-llama, 4 held-out episodes per user, no probes) must finish, publish every
user's adapter, and the refreshed adapters must beat the unrefreshed core on their own users'
held-out episodes. A second run reuses what the first one left (no new experience: nothing is
trained again).
"""

import json
import time

import pytest


@pytest.mark.slow
def test_quick_demo_learns_each_users_rule(cli, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    proc = cli("--home", str(home), "demo", "--quick", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    users = results["users"]
    assert set(users) == {"alice", "bob", "carol"}
    for r in users.values():
        assert r["gate_passed"] and r["adapter"].endswith("@v1")
        assert r["success_before"] <= 0.2
    # the refreshed adapters beat the unrefreshed core on their users' held-out episodes
    gain = sum(r["success_after"] - r["success_before"] for r in users.values())
    assert gain > 0 and max(r["success_after"] for r in users.values()) >= 0.5, users
    assert all(r["leakage"] <= 0.05 for r in users.values()), users
    assert results["junk"]["planted"] > 0 and results["junk"]["dropped"] >= results["junk"]["planted"]
    for f in ("report.html", "success.png", "world_model.png", "phases.png", "gate.png"):
        assert (out / f).is_file(), f
    assert "before sleep -> after sleep" in proc.stdout
    assert [t["status"] for t in results["targets"]][1] == "not measured"      # --quick asks no probes
    assert "held-out success: <= 20% before" in proc.stdout

    # a second run: every event is already logged, so nobody is due and the adapters are reused
    again = cli("--home", str(home), "demo", "--quick", "--out", str(out), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["phases_s"]["sleep"] < results["phases_s"]["sleep"]
    assert all(r["adapter"].endswith("@v1") for r in second["users"].values())


def test_bad_users_file_is_one_line(cli, tmp_path):
    bad = tmp_path / "users.json"
    bad.write_text(json.dumps({"users": [{"id": "../etc", "check": "x", "episodes": []}]}))
    proc = cli("demo", "--users", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "users[0].id" in proc.stderr
    bad.write_text(json.dumps({"users": [{"id": "ann", "check": "(", "episodes": [
        {"request": "r", "wrong_observation": "w", "right_action": "a", "right_observation": "o"}] * 4}]}))
    proc = cli("demo", "--users", str(bad))
    assert proc.returncode == 2 and "not a valid regular expression" in proc.stderr


@pytest.mark.slow
def test_the_gpu_sleep_config_runs_on_cpu_with_a_tiny_core(cli, tmp_path):
    """configs/sleep/gpu-core.yaml, pointed at a tiny preset: new experience ingested through the CLI,
    one sleep cycle consolidates, refreshes, gates and publishes."""
    home = tmp_path / "home"
    lines, t0 = [], time.time() - 86400
    for i, item in enumerate(["kettle", "lamp", "backpack", "blender", "umbrella", "keyboard", "toaster", "fan"]):
        ep = f"e{i}"
        lines += [{"episode_id": ep, "ts": t0 + i, "kind": "context", "text": f"Please refund my {item}, it broke.",
                   "meta": {"check": "(?i)last four digits"}},
                  {"episode_id": ep, "ts": t0 + i + 0.1, "kind": "action", "text": "Refund done!"},
                  {"episode_id": ep, "ts": t0 + i + 0.2, "kind": "observation",
                   "text": "Refund not started: I need the last four digits of the card first."},
                  {"episode_id": ep, "ts": t0 + i + 0.3, "kind": "action",
                   "text": f"Sure, a refund for the {item}: what are the last four digits of your card?"},
                  {"episode_id": ep, "ts": t0 + i + 0.4, "kind": "observation", "text": "Card verified, refunded."}]
    f = tmp_path / "alice.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cli("--home", str(home), "memory", "ingest", "--user", "alice", str(f), check=True)
    proc = cli("--home", str(home), "sleep", "--config", "configs/sleep/gpu-core.yaml", "min_new_events=1",
               "consolidate.max_perplexity=0", "refresh.model.source=tiny-llama", "refresh.model.dtype=float32",
               "refresh.train.precision=fp32", "refresh.train.max_steps=4", "refresh.train.micro_batch=2",
               "refresh.data.seq_len=256", "refresh.gate.probes=0", "refresh.gate.enabled=false", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    adapters = cli("--home", str(home), "adapters", "list", check=True).stdout
    assert "alice@v1" in adapters


def test_world_model_is_scored_against_what_the_environment_answers_to_that_action():
    from cogcore.demo.users import load_users
    alice = {u.id: u for u in load_users().users}["alice"]
    ep = alice.episodes[0]
    wrong, right = "Sure, I will start the refund now.", ep.right_action
    assert alice.answer(ep, wrong)[1] is False and alice.answer(ep, right)[1] is True
    assert alice.predicts(ep, wrong, ep.wrong_observation)
    assert not alice.predicts(ep, wrong, ep.right_observation)      # the refund is not started without digits
    assert alice.predicts(ep, right, ep.right_observation)
    assert not alice.predicts(ep, right, ep.wrong_observation)
    assert not alice.predicts(ep, right, "")


def test_the_demos_probes_are_not_the_ones_the_gate_asks(tmp_path):
    from importlib import resources

    from cogcore.demo.run import _probe_questions
    from cogcore.eval.probes import load_probes
    from cogcore.lora.gate import GateConfig, gate_probes
    demo = _probe_questions(150, GateConfig())
    assert [p.question for p in demo] == [p.question for p in load_probes()]  # the gate asks its own set
    # a gate pointed at 40 of the eval's own probes: the demo asks the other 110
    eval_file = tmp_path / "probes.json"
    eval_file.write_text(resources.files("cogcore.eval").joinpath("data/real_world_probes.json").read_text())
    gate = GateConfig(probe_file=str(eval_file), probes=40)
    demo = _probe_questions(150, gate)
    assert len(demo) == 110 and not {p.question for p in gate_probes(gate)} & {p.question for p in demo}
    assert _probe_questions(0, gate) == []


def test_targets_are_judged_on_the_run():
    from cogcore.demo.run import check_targets

    def user(before, after, probe_before, probe_after, leakage=0.0):
        return {"success_before": before, "success_after": after, "probe_before": probe_before,
                "probe_after": probe_after, "leakage": leakage, "probe_change": {"lost": 3, "gained": 1}}
    results = {"users": {"a": user(0.0, 1.0, 0.80, 0.75), "b": user(0.1, 0.9, 0.80, 0.73)}, "n_probes": 110,
               "probe_tolerance": 0.075, "phases_s": {"wake": 100.0, "sleep": 400.0}}
    got = {t["target"].split(":")[0]: t for t in check_targets(results)}
    assert [t["status"] for t in got.values()] == ["PASS", "PASS", "PASS", "PASS"]
    assert "a -5.0 (lost 3, gained 1)" in got["general probe"]["detail"]
    results["users"]["b"] = user(0.3, 0.9, 0.80, 0.70, leakage=0.1)   # 30% before, -10 points, leaks
    results["phases_s"]["sleep"] = 560.0
    got = {t["target"].split(":")[0]: t["status"] for t in check_targets(results)}
    assert got == {"held-out success": "FAIL", "general probe": "FAIL", "cross-user leakage <= 5%, every user": "FAIL",
                   "time <= 10 minutes (2 CPU cores)": "FAIL"}
    results["n_probes"] = 0
    assert check_targets(results)[1]["status"] == "not measured"
    results["cpu_during_run"] = {"idle": 0.1, "steal": 0.25}   # a busy neighbour shows next to the time
    assert check_targets(results)[3]["detail"] == ("660 s (of the host's CPU time meanwhile, 25% was taken by "
                                                   "other guests and 10% idle)")


def test_the_share_of_cpu_time_stolen_and_idle_comes_from_the_counters():
    from cogcore.demo.run import _cpu_share, _cpu_times
    # user nice system idle iowait irq softirq steal, in ticks
    assert _cpu_share([0] * 8, [50, 0, 10, 15, 5, 0, 0, 20]) == {"idle": 0.2, "steal": 0.2}
    assert _cpu_share(None, [1] * 8) is None and _cpu_share([5] * 8, [5] * 8) is None
    now = _cpu_times()
    assert now is None or (len(now) == 8 and all(x >= 0 for x in now))


def test_probe_replies_are_asked_in_fixed_batches_with_each_users_live_adapter(tmp_path, one_thread):
    """The demo's general probes: the core's replies do not depend on what else is asked, a user
    without a published adapter is the core, and a user's adapter is the one answering for them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cogcore.demo.run import DemoConfig, _probe_hits, _probe_replies
    from cogcore.eval.core import generate, probe_prompt
    from cogcore.eval.probes import load_probes
    from cogcore.train.model import load_model, load_tokenizer

    tokenizer, core = load_tokenizer("tiny-llama"), load_model("tiny-llama")
    adapter = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # random non-zero weights: this adapter answers differently from the core
        g = torch.Generator().manual_seed(0)
        for name, p in adapter.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    adapter.save_pretrained(tmp_path / "alice")

    cfg = DemoConfig(precision="fp32", probe_max_new_tokens=6)
    probes = load_probes()[:12]
    on_its_own = [generate(core.eval(), tokenizer, [probe_prompt(tokenizer, p.question)], max_new_tokens=6,
                           batch_size=1)[0] for p in probes]
    alone = _probe_replies("tiny-llama", probes, cfg, {"core": None})
    along = _probe_replies("tiny-llama", probes, cfg, {"core": None, "alice": tmp_path / "alice", "bob": None})
    assert alone["core"] == along["core"] == along["bob"] == on_its_own
    differ = sum(a != c for a, c in zip(along["alice"], along["core"]))
    assert differ >= 6, along  # alice's adapter answers for alice
    hits = _probe_hits("tiny-llama", probes, cfg, {"core": None})
    assert len(hits["core"]) == 12 and all(isinstance(h, bool) for h in hits["core"])
    assert _probe_hits("tiny-llama", [], cfg, {"core": None}) == {"core": []}
