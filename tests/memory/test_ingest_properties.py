"""Property tests of the ingest path: whatever the lines are, ingest never crashes, stores every valid
event exactly once (first occurrence of an id wins), stores nothing invalid, and quarantines every
invalid line under its own line number.

The oracle is independent of the validator: each generated line is built valid or built with a
known defect; arbitrary JSON values and arbitrary text cannot form a valid event (they lack the
required keys with the right types)."""

import json
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogcore.memory.events import default_event_id
from cogcore.memory.log import ExperienceLog

NOW = time.time()
USER = "alice"

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,20}", fullmatch=True)
texts = st.text(min_size=1, max_size=40).filter(lambda t: t.strip())
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def valid_events(draw):
    kind = draw(st.sampled_from(["context", "action", "observation", "feedback", "reward"]))
    d = {"episode_id": draw(ids), "ts": draw(st.floats(min_value=1e9, max_value=NOW)), "kind": kind,
         "text": draw(texts)}
    if kind == "reward" or draw(st.booleans()):
        d["reward"] = draw(st.floats(allow_nan=False, allow_infinity=False, width=32))
    if draw(st.booleans()):
        d["user_id"] = USER
    if draw(st.booleans()):
        d["event_id"] = draw(ids)
    if draw(st.booleans()):
        d["meta"] = draw(st.dictionaries(st.text(max_size=8), json_scalars, max_size=3))
    return d


@st.composite
def broken_events(draw):
    """A valid event with one known defect."""
    d = draw(valid_events())
    defect = draw(st.sampled_from(["kind", "user", "path_user", "ts_ms", "ts_old", "text_type", "text_big",
                                   "episode", "reward", "extra", "meta", "no_text"]))
    if defect == "kind":
        d["kind"] = draw(st.text(max_size=10).filter(lambda k: k not in ("context", "action", "observation",
                                                                         "feedback", "reward")))
    elif defect == "user":
        d["user_id"] = "bob"
    elif defect == "path_user":
        d["user_id"] = "../" + USER
    elif defect == "ts_ms":
        d["ts"] = NOW * 1000
    elif defect == "ts_old":
        d["ts"] = draw(st.floats(min_value=-1e12, max_value=9e8))
    elif defect == "text_type":
        d["text"] = draw(st.integers() | st.lists(st.integers(), max_size=2) | st.none())
    elif defect == "text_big":
        d["text"] = "y" * (16 * 1024 + draw(st.integers(1, 100)))
    elif defect == "episode":
        d["episode_id"] = draw(st.sampled_from(["", "../x", "a b", "x" * 200]))
    elif defect == "reward":
        d["reward"] = draw(st.sampled_from(["1", True, [1]]))
    elif defect == "extra":
        d["surprise"] = 1
    elif defect == "meta":
        d["meta"] = draw(st.sampled_from([[], 0, "", False, [1]]) | st.text(min_size=1, max_size=5))
    elif defect == "no_text":
        d["kind"] = draw(st.sampled_from(["context", "action"]))
        d["text"] = draw(st.sampled_from(["", "   ", "\t"]))
    return d


no_newline = st.text(max_size=60).filter(lambda t: "\n" not in t)
lines = st.one_of(
    valid_events().map(lambda d: ("valid", json.dumps(d).encode())),
    broken_events().map(lambda d: ("invalid", json.dumps(d).encode())),
    json_values.map(lambda v: ("invalid", json.dumps(v).encode())),
    no_newline.filter(lambda t: t.strip()).map(lambda t: ("invalid", t.encode("utf-8", "surrogatepass"))),
    st.binary(min_size=1, max_size=20).filter(lambda b: b"\n" not in b and b.strip())
      .map(lambda b: ("invalid", b"\xff" + b)),
    st.just(("blank", b"   ")),
)


def _id(d: dict) -> str:
    return d.get("event_id") or default_event_id(USER, d["episode_id"], float(d["ts"]), d["kind"], d["text"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(lines, max_size=25), st.data())
def test_ingest_never_crashes_never_loses_valid_lines_never_stores_invalid_ones(items, data):
    # some valid lines twice (a retried upload)
    if items and data.draw(st.booleans()):
        items = items + [x for x in items if x[0] == "valid"][:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(b"".join(raw + b"\n" for _, raw in items))
        with ExperienceLog.open(f"sqlite:///{tmp}/log.sqlite") as log:
            report = log.ingest_jsonl(path, USER)
            stored = {e.event_id: e for e in log.events(USER)}

    expected: dict[str, dict] = {}
    for kind, raw in items:
        if kind == "valid":
            d = json.loads(raw)
            expected.setdefault(_id(d), d)                # the first occurrence of an id wins
    invalid_lines = [n for n, (kind, _) in enumerate(items, 1) if kind == "invalid"]

    assert [n for n, _ in report.quarantined] == invalid_lines
    assert all(reason and "\n" not in reason for _, reason in report.quarantined)
    assert set(stored) == set(expected)
    assert report.added == len(expected)
    assert report.added + report.duplicates == sum(kind == "valid" for kind, _ in items)
    for event_id, d in expected.items():
        e = stored[event_id]
        assert (e.episode_id, e.kind, e.text, e.ts) == (d["episode_id"], d["kind"], d["text"], float(d["ts"]))
        assert e.user_id == USER and e.meta == (d.get("meta") or {})
        assert e.reward == (None if d.get("reward") is None else float(d["reward"]))
