"""Event validation: every bad input is refused with a one-line reason; good input round-trips."""

import time

import pytest

from cogcore.memory.events import (
    KINDS,
    MAX_TEXT_BYTES,
    Episode,
    Event,
    EventError,
    default_event_id,
    validate_user_id,
)

NOW = time.time()


def ev(**kw):
    d = {"user_id": "alice", "episode_id": "e1", "ts": NOW - 60, "kind": "action", "text": "Issue a refund."}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.parametrize("user", ["alice", "a", "A1_b.c-d", "x" * 64, "42"])
def test_safe_user_ids_pass(user):
    assert validate_user_id(user) == user


@pytest.mark.parametrize("user", ["", "../etc", "a/b", "a\\b", "..", "a..b", ".hidden", "-rf", "x" * 65, "al ice",
                                  "ali\x00ce", "élan", 42, None])
def test_path_like_or_odd_user_ids_are_refused(user):
    with pytest.raises(EventError, match="user id"):
        validate_user_id(user)


def test_valid_event_fills_defaults_and_the_id_is_a_content_hash():
    e = Event.from_dict(ev())
    assert e.kind == "action" and e.meta == {} and e.reward is None and len(e.event_id) == 32
    assert e.event_id == default_event_id("alice", "e1", e.ts, "action", "Issue a refund.")
    assert Event.from_dict(ev()).event_id == e.event_id               # same content, same id
    assert Event.from_dict(ev(text="Other.")).event_id != e.event_id
    assert Event.from_dict(e.to_dict()) == e                           # round trip


def test_default_id_is_pinned():
    """Stored ids must not change between versions, or re-ingesting an old file would add it again:
    a change here needs a schema migration in memory/log.py (as version 1 -> 2 has)."""
    pinned = "0dada4d7854f2090b421c41210ffabbf"
    assert default_event_id("alice", "e1", 1700000000.25, "action", "Issue a refund.") == pinned
    assert default_event_id("alice", "e1", 1700000000.25, "action", "Issue a refund!") != pinned
    assert default_event_id("bob", "e1", 1700000000.25, "action", "Issue a refund.") != pinned


def test_user_comes_from_the_caller_and_must_match():
    assert Event.from_dict(ev(user_id=...), user="bob").user_id == "bob"
    with pytest.raises(EventError, match="for user 'alice', not for 'bob'"):
        Event.from_dict(ev(), user="bob")
    with pytest.raises(EventError, match="missing user_id"):
        Event.from_dict(ev(user_id=...))


def test_iso_timestamps_are_utc():
    e = Event.from_dict(ev(ts="2024-03-01T12:00:00Z"))
    assert e.ts == 1709294400.0
    assert Event.from_dict(ev(ts="2024-03-01T12:00:00")).ts == 1709294400.0   # no zone: UTC, not local time


@pytest.mark.parametrize("bad, reason", [
    (ev(kind="thought"), "unknown kind"),
    (ev(kind=None), "unknown kind"),
    (ev(text="x" * (MAX_TEXT_BYTES + 1)), "over the 16384 byte limit"),
    (ev(text="é" * (MAX_TEXT_BYTES // 2 + 1)), "byte limit"),          # bytes, not characters
    (ev(text="  "), "non-empty text"),
    (ev(text=5), "text must be a string"),
    (ev(text="\ud800 lone"), "lone surrogate"),
    (ev(ts=NOW * 1000), "more than a day in the future"),               # milliseconds
    (ev(ts=12), "before 2000"),
    (ev(ts=float("nan")), "not a finite number"),
    (ev(ts=10**400), "too large"),
    (ev(ts="yesterday"), "neither unix seconds nor an ISO 8601"),
    (ev(ts=True), "unix seconds"),
    (ev(ts=...), "missing ts"),
    (ev(episode_id="../x"), "episode_id"),
    (ev(episode_id=...), "episode_id"),
    (ev(event_id="a b"), "event_id"),
    (ev(event_id=7), "event_id"),
    (ev(reward=float("inf")), "finite"),
    (ev(reward="1"), "finite number"),
    (ev(reward=True), "finite number"),
    (ev(kind="reward", text="", reward=None), "needs a numeric reward"),
    (ev(meta=[1]), "meta must be a JSON object"),
    (ev(meta=[]), "meta must be a JSON object"),             # empty but not an object
    (ev(meta=0), "meta must be a JSON object"),
    (ev(meta=""), "meta must be a JSON object"),
    (ev(meta={"k": "v" * 5000}), "meta is"),
    (ev(colour="red"), "unknown field 'colour'"),
    ([1, 2], "must be a JSON object"),
    ("text", "must be a JSON object"),
])
def test_bad_events_are_refused_with_the_reason(bad, reason):
    with pytest.raises(EventError, match=reason) as err:
        Event.from_dict(bad)
    assert "\n" not in str(err.value)


def test_every_kind_is_accepted():
    for kind in KINDS:
        extra = {"reward": 1.0} if kind == "reward" else {}
        assert Event.from_dict(ev(kind=kind, **extra)).kind == kind


def test_episode_reads_the_story_in_order():
    raw = [ev(kind="context", text="Refund order 4411 please.", meta={"check": "card"}),
           ev(kind="action", text="Refunding now."),
           ev(kind="observation", text="I need the card digits.", meta={"ok": False}),
           ev(kind="action", text="What are the last four card digits?"),
           ev(kind="observation", text="Refund issued."),
           ev(kind="feedback", text="Next time ask for the card first."),
           ev(kind="reward", text="", reward=1.0)]
    ep = Episode.from_events([Event.from_dict(d) for d in raw])
    assert ep.context == "Refund order 4411 please." and ep.check == "card" and ep.reward == 1.0
    assert [(s.action, s.observation, s.ok) for s in ep.steps] == [
        ("Refunding now.", "I need the card digits.", False),
        ("What are the last four card digits?", "Refund issued.", None)]
    assert ep.feedback == ["Next time ask for the card first."]
    assert ep.texts() == ["Refund order 4411 please.", "Refunding now.", "What are the last four card digits?"]
