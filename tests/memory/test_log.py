"""The experience log on SQLite: idempotent append, time windows, quarantine, notes, forget, faults, concurrency."""

import json
import multiprocessing as mp
import sqlite3
import time

import pytest

from cogcore.memory.events import Event
from cogcore.memory.log import SCHEMA_VERSION, ExperienceLog, resolve_url
from cogcore.train.config import CogcoreError

NOW = time.time()


@pytest.fixture
def log(tmp_path):
    with ExperienceLog.open(f"sqlite:///{tmp_path}/log.sqlite", sets_root=tmp_path / "sets") as lg:
        yield lg


def test_append_is_idempotent_and_reads_back_in_time_order(log, make_history):
    events = make_history("alice", 6)
    assert log.append(events) == (len(events), 0)
    assert log.append(events) == (0, len(events))            # a retried request stores nothing twice
    assert log.append(events[:3] + events[:3]) == (0, 6)
    got = log.events("alice")
    assert len(got) == len(events) and [e.ts for e in got] == sorted(e.ts for e in got)
    assert log.users() == ["alice"] and log.count_events("alice") == len(events)
    eps = log.episodes("alice")
    assert [ep[0].episode_id for ep in eps] == [f"alice-ep{i:04d}" for i in range(6)]
    assert all(ep[0].kind == "context" for ep in eps)


def test_same_timestamp_keeps_arrival_order(log):
    same = [{"user_id": "u", "episode_id": "e", "ts": NOW - 5, "kind": k, "text": t}
            for k, t in [("context", "Help me please with this."), ("action", "Sure, on it now."),
                         ("observation", "Done as asked.")]]
    log.append(same)
    assert [e.kind for e in log.events("u")] == ["context", "action", "observation"]


def test_time_window_and_whole_episodes_since(log, make_history):
    events = make_history("alice", 5, t0=NOW - 10_000)       # episode i starts at t0 + 100 i, lasts 10 s
    log.append(events)
    cut = NOW - 10_000 + 205                                  # inside episode 2
    assert all(e.ts > cut for e in log.events("alice", since=cut))
    assert all(e.ts <= cut for e in log.events("alice", until=cut))
    eps = log.episodes("alice", since=cut)
    assert [ep[0].episode_id for ep in eps] == ["alice-ep0002", "alice-ep0003", "alice-ep0004"]
    assert eps[0][0].kind == "context" and eps[0][0].ts < cut    # episode 2 comes back whole
    assert log.count_events("alice", since=cut) == sum(e["ts"] > cut for e in events)


def test_ingest_quarantines_bad_lines_and_keeps_the_good(log, tmp_path, make_history, jsonl):
    good = make_history("alice", 2)
    lines = [json.dumps(good[0]), "{not json", json.dumps({**good[1], "kind": "thought"}), "", "[1, 2]",
             json.dumps({**good[2], "user_id": "bob"}), json.dumps({**good[3], "ts": NOW * 1000})]
    lines += [json.dumps(e) for e in good[1:]]
    path = jsonl(tmp_path / "in.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b'{"text": "\xff\xfe"}\n')
    r = log.ingest_jsonl(path, "alice")
    assert r.added == len(good) and r.duplicates == 0 and r.lines == len(lines) - 1 + 1
    assert [n for n, _ in r.quarantined] == [2, 3, 5, 6, 7, len(lines) + 1]
    reasons = dict(r.quarantined)
    assert "not valid JSON" in reasons[2] and "unknown kind 'thought'" in reasons[3]
    assert "must be a JSON object" in reasons[5] and "for user 'bob', not for 'alice'" in reasons[6]
    assert "future" in reasons[7] and "not UTF-8" in reasons[len(lines) + 1]
    q = log.quarantined("alice")
    assert [row["line"] for row in q] == [n for n, _ in r.quarantined]
    assert q[0]["raw"] == "{not json" and q[0]["reason"] == reasons[2] and q[0]["source"] == str(path.resolve())
    again = log.ingest_jsonl(path, "alice")                  # re-ingesting stores nothing twice
    assert again.added == 0 and again.duplicates == len(good) and len(log.quarantined("alice")) == len(q)


def test_an_endless_line_is_quarantined_without_reading_it_whole(log, tmp_path, make_history, jsonl):
    path = tmp_path / "long.jsonl"
    good = make_history("alice", 1)
    with open(path, "w") as f:
        f.write(json.dumps(good[0]) + "\n" + "x" * 3_000_000 + "\n" + json.dumps(good[1]) + "\n")
    r = log.ingest_jsonl(path, "alice")
    assert r.added == 2 and r.quarantined == [(2, r.quarantined[0][1])] and "over 262144 bytes" in r.quarantined[0][1]
    assert len(log.quarantined("alice")[0]["raw"]) == 16 * 1024


def test_ingest_refuses_a_bad_user_or_missing_file(log, tmp_path):
    with pytest.raises(CogcoreError, match="user id '../x' is not allowed"):
        log.ingest_jsonl(tmp_path / "x.jsonl", "../x")
    with pytest.raises(CogcoreError, match="does not exist"):
        log.ingest_jsonl(tmp_path / "none.jsonl", "alice")


def test_notes_are_idempotent_and_ordered(log):
    assert log.add_note("alice", "Ask for the card digits before a refund.")
    assert not log.add_note("alice", "Ask for the card digits before a refund.")
    log.add_note("alice", "Prefers email over phone.", source="manual")
    assert log.notes("alice") == ["Ask for the card digits before a refund.", "Prefers email over phone."]
    assert log.notes("bob") == []
    with pytest.raises(CogcoreError, match="a note must be"):
        log.add_note("alice", "   ")


def test_export_round_trips(log, tmp_path, make_history, jsonl):
    log.append(make_history("alice", 3))
    exported = log.export("alice")
    other = ExperienceLog.open(str(tmp_path / "other.sqlite"))
    r = other.ingest_jsonl(jsonl(tmp_path / "x.jsonl", exported), "alice")
    assert r.added == len(exported) and not r.quarantined
    assert other.export("alice") == exported


def test_forget_leaves_no_trace_in_the_file(tmp_path, make_history, jsonl):
    path = tmp_path / "log.sqlite"
    log = ExperienceLog.open(str(path), sets_root=tmp_path / "sets")
    secret = "my card is 4111-SECRET-MARKER"
    events = make_history("alice", 3) + [{"user_id": "alice", "episode_id": "s", "ts": NOW - 1, "kind": "context",
                                          "text": secret}]
    log.append(events)
    log.append(make_history("bob", 2))
    log.ingest_jsonl(jsonl(tmp_path / "bad.jsonl", ["{" + secret]), "alice")
    log.add_note("alice", "Lesson with " + secret)
    log.record_consolidation("alice", 1, NOW, len(events), tmp_path / "sets" / "alice" / "v1")
    (tmp_path / "sets" / "alice" / "v1").mkdir(parents=True)
    removed = log.forget("alice")
    assert removed == {"events": len(events), "quarantine": 1, "notes": 1, "consolidations": 1,
                       "sets_dir": str(tmp_path / "sets" / "alice")}
    assert not (tmp_path / "sets" / "alice").exists()
    assert log.events("alice") == [] and log.notes("alice") == [] and log.quarantined("alice") == []
    assert log.last_consolidation("alice") is None and log.users() == ["bob"]
    log.close()
    for f in tmp_path.glob("log.sqlite*"):                   # the rows are overwritten, not just unlinked
        assert secret.encode() not in f.read_bytes(), f


def test_consolidation_bookkeeping(log, make_history):
    events = make_history("alice", 4, t0=NOW - 5000)
    log.append(events)
    assert log.last_consolidation("alice") is None and log.count_new_events("alice") == len(events)
    last = max(e["ts"] for e in events)
    log.record_consolidation("alice", 1, last, len(events), "/x/v1")
    assert log.last_consolidation("alice")["version"] == 1 and log.count_new_events("alice") == 0
    log.append(make_history("alice", 1, seed=5, t0=NOW - 100, start=7))
    assert log.count_new_events("alice") == 4               # request, right action, answer, reward
    s = log.stats()
    assert s["events"] == len(events) + 4 and s["users"] == 1
    assert s["per_user"][0]["consolidated_version"] == 1 and s["per_user"][0]["episodes"] == 5


def test_urls():
    assert str(resolve_url("sqlite:////abs/x.db")) == "/abs/x.db"
    assert str(resolve_url("sqlite:///rel/x.db")) == "rel/x.db"
    assert str(resolve_url("/plain/path.sqlite")) == "/plain/path.sqlite"
    with pytest.raises(CogcoreError, match="PostgreSQL, which needs psycopg") as e:
        resolve_url("postgresql://me:pw@db.example/cog")
    assert "pw" not in str(e.value)                          # no password echoed into logs
    with pytest.raises(CogcoreError, match="unsupported experience log URL"):
        resolve_url("mysql://x/y")


def test_corrupt_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "log.sqlite"
    bad.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CogcoreError, match=f"{bad} is not a readable SQLite database.*move it aside"):
        ExperienceLog.open(str(bad))


def test_damaged_pages_are_one_clear_error(tmp_path, make_history):
    path = tmp_path / "log.sqlite"
    with ExperienceLog.open(str(path)) as log:
        log.append(make_history("alice", 40))
        log.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096 * 2: 4096 * 6] = b"\x07" * (4096 * 4)         # scribble over a few pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(CogcoreError, match="not a readable SQLite database|malformed"):
        with ExperienceLog.open(str(path)) as log:
            log.events("alice")


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "log.sqlite"
    ExperienceLog.open(str(path)).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(CogcoreError, match="newer than this cogcore understands"):
        ExperienceLog.open(str(path))


# The events table as schema version 1 wrote it (ids unique across all users, sha256 default ids).
V1_EVENTS = """CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    episode_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL,
    reward DOUBLE PRECISION, meta TEXT NOT NULL, ingested_at DOUBLE PRECISION NOT NULL)"""


def test_version_1_file_is_migrated_and_old_events_still_count_as_seen(tmp_path, make_history):
    from cogcore.memory.events import v1_event_id
    path = tmp_path / "log.sqlite"
    events = [Event.from_dict(d) for d in make_history("alice", 3)]
    given = Event.from_dict({"event_id": "client-7", "user_id": "alice", "episode_id": "x", "ts": NOW - 9,
                             "kind": "feedback", "text": "Thanks, that worked."})
    con = sqlite3.connect(path)
    con.execute(V1_EVENTS)
    con.execute("CREATE INDEX events_user_ts ON events (user_id, ts)")
    con.executemany("INSERT INTO events (event_id, user_id, episode_id, ts, kind, text, reward, meta, ingested_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(v1_event_id(e.user_id, e.episode_id, e.ts, e.kind, e.text), e.user_id, e.episode_id, e.ts,
                      e.kind, e.text, e.reward, json.dumps(e.meta), NOW) for e in events]
                    + [(given.event_id, "alice", "x", given.ts, "feedback", given.text, None, "{}", NOW)])
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()

    with ExperienceLog.open(str(path)) as log:
        assert log.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        stored = log.events("alice")
        assert [e.event_id for e in stored if e.episode_id != "x"] == [e.event_id for e in events]   # v2 ids
        assert [e.event_id for e in stored if e.episode_id == "x"] == ["client-7"]                   # kept
        assert sorted((e.ts, e.kind, e.text) for e in stored) == sorted((e.ts, e.kind, e.text) for e in events + [given])
        assert log.append(events + [given]) == (0, len(events) + 1)   # re-ingesting the old data adds nothing
        assert log.events("alice", since=NOW - 10) == [given]         # the time index works after the rebuild


def test_event_ids_are_unique_per_user_not_across_users(log):
    """A client id like "1" is the user's own: another user's event with the same id is stored too."""
    same = {"event_id": "1", "episode_id": "e", "ts": NOW - 5, "kind": "context", "text": "Hello there, help."}
    assert log.append([dict(same, user_id="alice"), dict(same, user_id="bob")]) == (2, 0)
    assert log.append([dict(same, user_id="bob")]) == (0, 1)
    assert [e.text for e in log.events("bob")] == ["Hello there, help."]


def test_locked_database_is_one_clear_error(tmp_path, make_history):
    path = tmp_path / "log.sqlite"
    log = ExperienceLog.open(str(path), busy_timeout_s=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CogcoreError, match=f"experience log {path} stayed locked for 0.2s.*wait for it"):
            log.append(make_history("alice", 1))
        assert log.count_events("alice") == 0                 # WAL: reading still works while a writer holds the lock
    finally:
        holder.execute("ROLLBACK")
    assert log.append(make_history("alice", 1))[0] == 6       # and the log is fine afterwards


# ----------------------------------------------------------------------------- concurrency

PER_PROC, BATCH = 1000, 10


def _events_of(proc: int) -> list[dict]:
    return [{"user_id": "crowd", "episode_id": f"p{proc}-e{i // 4}", "ts": NOW - 10_000 + i, "kind": "action",
             "text": f"process {proc} event {i}", "event_id": f"p{proc}-{i}"} for i in range(PER_PROC)]


def _appender(url: str, proc: int, out) -> None:
    log = ExperienceLog.open(url)
    mine, neighbours = _events_of(proc), _events_of((proc + 1) % 4)
    added = dups = 0
    for b in range(0, PER_PROC, BATCH):
        a, d = log.append(mine[b: b + BATCH])
        added, dups = added + a, dups + d
        if b % 100 == 0:                                     # and some of a neighbour's, racing it
            a, d = log.append(neighbours[b: b + BATCH])
            added, dups = added + a, dups + d
    out.put((added, dups))


def test_four_processes_append_1000_events_each_without_loss_or_duplicates(tmp_path):
    url = f"sqlite:///{tmp_path}/log.sqlite"
    ExperienceLog.open(url).close()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_appender, args=(url, p, out)) for p in range(4)]
    for p in procs:
        p.start()
    reader = ExperienceLog.open(url)
    seen = []
    while any(p.is_alive() for p in procs):                  # a consolidation-like reader meanwhile
        seen.append(reader.count_events("crowd"))
        time.sleep(0.01)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in procs]
    ids = [e.event_id for e in reader.events("crowd")]
    assert len(ids) == 4 * PER_PROC == len(set(ids))
    assert set(ids) == {e["event_id"] for p in range(4) for e in _events_of(p)}
    assert sum(a for a, _ in results) == 4 * PER_PROC        # every event added exactly once, by someone
    assert sum(d for _, d in results) == 4 * (PER_PROC // 100) * BATCH
    assert seen == sorted(seen) and all(n % BATCH == 0 for n in seen)   # readers see whole batches only
    assert isinstance(reader.events("crowd")[0], Event)
