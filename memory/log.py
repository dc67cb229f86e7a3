"""The experience log: every user's events in one SQLite file, safe for several processes at once.

    log = ExperienceLog.open()                  # sqlite:///<workspace>/experience/log.sqlite
    log.ingest_jsonl("alice.jsonl", "alice")    # bad lines go to the quarantine table, with the reason
    for episode in log.episodes("alice"): ...

How it stays correct with many writers (servers logging, a consolidation reading):
  * WAL journal: readers see a consistent snapshot and never block the writer;
  * ``busy_timeout``: a writer waits for the lock instead of failing at once;
  * ``INSERT ... ON CONFLICT (user_id, event_id) DO NOTHING``: appending the same event twice (a
    retried request, a re-ingested file) stores it once, and two processes racing cannot duplicate
    it; ids are unique per user, so one user's client cannot shadow another user's events;
  * ``BEGIN IMMEDIATE`` around every write: the write lock is taken up front, so a
    read-modify-write (schema setup, forget) cannot interleave with another writer;
  * ``PRAGMA user_version`` holds the schema version; a newer file is refused, not misread, and an
    older one is migrated in one transaction (version 1 -> 2: ids unique per user instead of
    globally, and the default ids, which version 2 hashes differently, rewritten);
  * ``PRAGMA secure_delete``: ``forget`` overwrites the deleted rows, it does not just unlink them.

PostgreSQL: the tables and statements are plain SQL that PostgreSQL also runs (``ON CONFLICT``,
``DOUBLE PRECISION``, no SQLite-only functions). What a PostgreSQL backend still needs:
``psycopg`` (3), ``%s`` placeholders instead of ``?``, ``events.seq`` as
``BIGINT GENERATED ALWAYS AS IDENTITY``, a ``schema_version`` table instead of
``PRAGMA user_version``, plain ``BEGIN`` (row locks) instead of ``BEGIN IMMEDIATE`` and no PRAGMAs.
A ``postgresql://`` URL is recognised and refused with that explanation until it is wired.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..train.config import CogcoreError
from .events import Event, EventError, default_event_id, validate_user_id, validated_fields

SCHEMA_VERSION = 2
MAX_LINE_BYTES = 256 * 1024     # above any valid event, even one whose text is all \uXXXX escapes
MAX_RAW_KEPT = 16 * 1024        # how much of a bad line the quarantine keeps
MAX_NOTE_BYTES = 2 * 1024
BATCH = 5000                    # events per write transaction while ingesting

# seq = arrival order, the tie-breaker between events with the same timestamp.
EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        episode_id TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        reward DOUBLE PRECISION,
        meta TEXT NOT NULL,
        ingested_at DOUBLE PRECISION NOT NULL,
        UNIQUE (user_id, event_id))"""
EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts)"
SCHEMA = [
    EVENTS_TABLE,
    EVENTS_INDEX,
    """CREATE TABLE IF NOT EXISTS quarantine (
        quarantine_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        source TEXT NOT NULL,
        line INTEGER NOT NULL,
        raw TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS quarantine_user ON quarantine (user_id)",
    """CREATE TABLE IF NOT EXISTS notes (
        user_id TEXT NOT NULL,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (user_id, text))""",
    """CREATE TABLE IF NOT EXISTS consolidations (
        user_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_event_ts DOUBLE PRECISION,
        n_events INTEGER NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (user_id, version))""",
]

INSERT_EVENT = ("INSERT INTO events (event_id, user_id, episode_id, ts, kind, text, reward, meta, ingested_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, event_id) DO NOTHING")
INSERT_QUARANTINE = ("INSERT INTO quarantine (quarantine_id, user_id, source, line, raw, reason, at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (quarantine_id) DO NOTHING")
EVENT_COLUMNS = "event_id, user_id, episode_id, ts, kind, text, reward, meta"


@dataclass
class IngestReport:
    path: str
    user: str
    lines: int = 0                      # non-blank lines read
    added: int = 0                      # new events stored
    duplicates: int = 0                 # valid events already in the log
    quarantined: list[tuple[int, str]] = field(default_factory=list)   # (line number, reason)

    def summary(self) -> str:
        return (f"{self.path}: {self.lines} lines -> {self.added} events added, {self.duplicates} already "
                f"stored, {len(self.quarantined)} quarantined (user {self.user})")


def _user(user: str) -> str:
    """A user id from a caller (CLI flag, API argument): a bad one is the caller's error to fix."""
    try:
        return validate_user_id(user)
    except EventError as e:
        raise CogcoreError(str(e)) from None


def _v2_ids(rows):
    """Version 1 rows with their version-1 default ids replaced by version 2's."""
    from .events import v1_event_id
    for seq, event_id, user, episode, ts, kind, text, *rest in rows:
        if event_id == v1_event_id(user, episode, ts, kind, text):
            event_id = default_event_id(user, episode, ts, kind, text)
        yield (seq, event_id, user, episode, ts, kind, text, *rest)


def _row_to_event(row) -> Event:
    event_id, user_id, episode_id, ts, kind, text, reward, meta = row
    return Event(event_id, user_id, episode_id, ts, kind, text, reward, json.loads(meta))


def resolve_url(url: str | None) -> Path:
    """The SQLite file for a database URL (``sqlite:///relative`` or ``sqlite:////absolute``, or a path)."""
    if url is None:
        from ..train.workspace import get_workspace
        return get_workspace().experience / "log.sqlite"
    if url.startswith(("postgresql://", "postgres://", "postgresql+")):
        raise CogcoreError(f"the experience log at {url.split('@')[-1]} is PostgreSQL, which needs psycopg "
                           "(pip install 'psycopg[binary]') and a backend that is not wired yet (see "
                           "cogcore/memory/log.py); use sqlite:///PATH for now")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif "://" in url:
        raise CogcoreError(f"unsupported experience log URL {url!r}; use sqlite:///PATH (or a file path)")
    else:
        path = url
    if not path or path == ":memory:":
        raise CogcoreError(f"experience log URL {url!r} names no file; use sqlite:///PATH")
    return Path(path).expanduser()


class ExperienceLog:
    """Per-user events, quarantine, notes and consolidation bookkeeping in one SQLite file.

    One connection per process (open one ExperienceLog per process or thread)."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0, sets_root: Path | None = None):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._sets_root = sets_root
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CogcoreError(f"cannot create the folder for the experience log {self.path}: {e.strerror}") from None
        with self._errors("opening it"):
            # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE itself.
            self.conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        with self._errors("opening it"):
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")   # WAL + NORMAL: a crash of the process loses nothing committed
            self.conn.execute("PRAGMA secure_delete = ON")
            self._migrate()

    @classmethod
    def open(cls, url: str | None = None, busy_timeout_s: float = 30.0, sets_root: Path | None = None) -> ExperienceLog:
        """Open (creating if needed) the log at ``url``; default: the workspace's experience/log.sqlite."""
        return cls(resolve_url(url), busy_timeout_s, sets_root)

    @property
    def sets_root(self) -> Path:
        """Where consolidated sets live (``forget`` removes ``<sets_root>/<user>``)."""
        if self._sets_root is None:
            from ..train.workspace import get_workspace
            return get_workspace().consolidated
        return Path(self._sets_root)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ExperienceLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _errors(self, doing: str):
        """SQLite errors a user can hit, as one line naming the file and what to do."""
        try:
            yield
        except sqlite3.OperationalError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg:
                raise CogcoreError(f"experience log {self.path} stayed locked for {self.busy_timeout_s:g}s while "
                                   f"{doing}: another process is writing to it; wait for it to finish or stop it, "
                                   "then retry") from None
            if "readonly" in msg or "unable to open" in msg:
                raise CogcoreError(f"cannot write the experience log {self.path} ({msg}) while {doing}; check that "
                                   "the path is a file you may write, in a folder you may write") from None
            raise CogcoreError(f"experience log {self.path}: {msg} while {doing}") from None
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            raise CogcoreError(f"experience log {self.path} is not a readable SQLite database ({e}); move it aside "
                               "and ingest again, or restore a backup (`cogcore memory export` writes JSONL)") from None

    @contextmanager
    def _write(self, doing: str):
        """One write transaction, the lock taken up front (BEGIN IMMEDIATE)."""
        with self._errors(doing):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextmanager
    def _read(self, doing: str):
        """Several SELECTs that must see the same snapshot (WAL: writers carry on meanwhile)."""
        with self._errors(doing):
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                if self.conn.in_transaction:
                    self.conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write("setting up its tables"):
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CogcoreError(f"experience log {self.path} has schema version {version}, newer than this "
                                   f"cogcore understands ({SCHEMA_VERSION}); upgrade cogcore")
            if version == 1:
                self._migrate_v1_events()
            if version < SCHEMA_VERSION:
                for statement in SCHEMA:
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_v1_events(self) -> None:
        """Version 1 -> 2, inside the caller's write transaction (a kill midway leaves version 1 as it
        was): the events table is rebuilt with ids unique per user, and every id that is version 1's
        default for its event becomes version 2's default, so re-ingesting an old file still adds
        nothing. Ids a client gave are kept as they are."""
        conn = self.conn
        conn.execute("ALTER TABLE events RENAME TO events_v1")
        conn.execute(EVENTS_TABLE)
        rows = conn.execute("SELECT seq, event_id, user_id, episode_id, ts, kind, text, reward, meta, ingested_at "
                            "FROM events_v1 ORDER BY seq")
        conn.executemany("INSERT INTO events (seq, event_id, user_id, episode_id, ts, kind, text, reward, meta, "
                         "ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _v2_ids(rows))
        conn.execute("DROP TABLE events_v1")   # drops its index too; the caller creates the new one

    # ------------------------------------------------------------------ writing

    def append(self, events: Iterable[Event | dict]) -> tuple[int, int]:
        """Store events (dicts are validated first; one bad dict raises EventError and stores nothing
        of its batch). Returns (added, duplicates): an event_id already stored is skipped."""
        batch, added, dups = [], 0, 0
        for e in events:
            batch.append(e.fields() if isinstance(e, Event) else validated_fields(e))
            if len(batch) >= BATCH:
                a, d = self._insert(batch, [])
                added, dups, batch = added + a, dups + d, []
        if batch:
            a, d = self._insert(batch, [])
            added, dups = added + a, dups + d
        return added, dups

    def _insert(self, events: list[tuple], quarantine: list[tuple]) -> tuple[int, int]:
        """``events``: validated fields (events.validated_fields), stored with meta as JSON."""
        now = time.time()
        rows = [(*f[:7], json.dumps(f[7], ensure_ascii=False, sort_keys=True) if f[7] else "{}", now) for f in events]
        with self._write(f"appending {len(rows)} events") as conn:
            before = conn.total_changes
            conn.executemany(INSERT_EVENT, rows)
            added = conn.total_changes - before   # ON CONFLICT DO NOTHING rows are not changes
            if quarantine:
                conn.executemany(INSERT_QUARANTINE, quarantine)
        return added, len(rows) - added

    def ingest_jsonl(self, path: str | Path, user: str, progress: bool = False) -> IngestReport:
        """Read a JSONL file of events for ``user``: valid lines are stored, every other line is kept in
        the quarantine table with its line number and the reason (also listed in the report)."""
        user = _user(user)
        path = Path(path)
        if not path.is_file():
            raise CogcoreError(f"{path} does not exist or is not a file; pass a JSONL file with one event per line")
        source = str(path.resolve())
        report = IngestReport(str(path), user)
        events: list[tuple] = []
        quarantine: list[tuple] = []

        def flush():
            a, d = self._insert(events, quarantine)
            report.added += a
            report.duplicates += d
            events.clear()
            quarantine.clear()

        bar = _progress(path.stat().st_size, f"ingest {path.name}", progress)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(_bounded_lines(f), 1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                report.lines += 1
                reason = None
                try:
                    event = validated_fields(_parse_line(raw), user)
                except EventError as e:
                    reason = str(e)
                if reason is None:
                    events.append(event)
                else:
                    report.quarantined.append((lineno, reason))
                    text = raw.rstrip(b"\r\n")[:MAX_RAW_KEPT].decode("utf-8", errors="replace")
                    qid = hashlib.sha256(f"{user}\0{source}\0{lineno}\0".encode() + raw).hexdigest()[:32]
                    quarantine.append((qid, user, source, lineno, text, reason, time.time()))
                if len(events) + len(quarantine) >= BATCH:
                    flush()
        flush()
        bar.close()
        return report

    def add_note(self, user: str, text: str, source: str = "lesson") -> bool:
        """Add a note for ``user`` (a lesson, a preference); the same text twice is stored once."""
        user = _user(user)
        text = text.strip()
        if not text or len(text.encode("utf-8", errors="replace")) > MAX_NOTE_BYTES:
            raise CogcoreError(f"a note must be 1 to {MAX_NOTE_BYTES} bytes of text, got {len(text)} characters")
        with self._write("adding a note") as conn:
            before = conn.total_changes
            conn.execute("INSERT INTO notes (user_id, text, source, created) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (user_id, text) DO NOTHING", (user, text, source, time.time()))
            return conn.total_changes > before

    def record_consolidation(self, user: str, version: int, last_event_ts: float | None, n_events: int,
                             path: str | Path) -> None:
        """Remember that ``user``'s events up to ``last_event_ts`` went into set ``version``."""
        with self._write("recording a consolidation") as conn:
            conn.execute("INSERT INTO consolidations (user_id, version, created, last_event_ts, n_events, path) "
                         "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, version) DO NOTHING",
                         (_user(user), int(version), time.time(), last_event_ts, int(n_events), str(path)))

    def forget(self, user: str) -> dict:
        """Remove every trace of ``user``: events, quarantined lines, notes, consolidation records and
        the consolidated sets folder. Returns what was removed."""
        user = _user(user)
        removed = {}
        with self._write(f"forgetting {user}") as conn:
            for table in ("events", "quarantine", "notes", "consolidations"):
                removed[table] = conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user,)).rowcount
        with self._errors("checkpointing after forget"):
            # Copy the overwritten pages into the main file and empty the WAL, so the old rows'
            # bytes survive nowhere (a reader still open elsewhere can delay this: it is best effort).
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sets = self.sets_root / user
        removed["sets_dir"] = str(sets) if sets.is_dir() else None
        if sets.is_dir():
            shutil.rmtree(sets)
        return removed

    # ------------------------------------------------------------------ reading

    def users(self) -> list[str]:
        with self._errors("listing users"):
            return [r[0] for r in self.conn.execute("SELECT DISTINCT user_id FROM events ORDER BY user_id")]

    def events(self, user: str, since: float | None = None, until: float | None = None) -> list[Event]:
        """``user``'s events with ``since < ts <= until``, in time order (arrival order breaks ties)."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE user_id = ?"
        args: list = [_user(user)]
        if since is not None:
            sql += " AND ts > ?"
            args.append(float(since))
        if until is not None:
            sql += " AND ts <= ?"
            args.append(float(until))
        with self._errors(f"reading {user}'s events"):
            return [_row_to_event(r) for r in self.conn.execute(sql + " ORDER BY ts, seq", args)]

    def episodes(self, user: str, since: float | None = None) -> list[list[Event]]:
        """``user``'s episodes, each a time-ordered list of events, ordered by their first event.

        With ``since``, every episode that has an event after ``since`` comes back whole."""
        sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE user_id = ?"
        args: list = [_user(user)]
        if since is not None:
            sql += " AND episode_id IN (SELECT episode_id FROM events WHERE user_id = ? AND ts > ?)"
            args += [user, float(since)]
        grouped: dict[str, list[Event]] = {}
        with self._errors(f"reading {user}'s episodes"):
            for row in self.conn.execute(sql + " ORDER BY ts, seq", args):
                e = _row_to_event(row)
                grouped.setdefault(e.episode_id, []).append(e)
        return list(grouped.values())

    def count_events(self, user: str, since: float | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM events WHERE user_id = ?", [_user(user)]
        if since is not None:
            sql += " AND ts > ?"
            args.append(float(since))
        with self._errors("counting events"):
            return self.conn.execute(sql, args).fetchone()[0]

    def last_consolidation(self, user: str) -> dict | None:
        """The newest consolidation of ``user``: {version, created, last_event_ts, n_events, path}, or None."""
        with self._errors("reading consolidations"):
            row = self.conn.execute("SELECT version, created, last_event_ts, n_events, path FROM consolidations "
                                    "WHERE user_id = ? ORDER BY version DESC LIMIT 1", (_user(user),)).fetchone()
        if row is None:
            return None
        return dict(zip(("version", "created", "last_event_ts", "n_events", "path"), row))

    def count_new_events(self, user: str) -> int:
        """Events newer than what the last consolidation of ``user`` read (all of them if none yet)."""
        last = self.last_consolidation(user)
        return self.count_events(user, since=last["last_event_ts"] if last else None)

    def notes(self, user: str) -> list[str]:
        with self._errors("reading notes"):
            return [r[0] for r in self.conn.execute("SELECT text FROM notes WHERE user_id = ? ORDER BY created, rowid",
                                                    (_user(user),))]

    def quarantined(self, user: str) -> list[dict]:
        """``user``'s quarantined lines: {source, line, raw, reason, at}."""
        with self._errors("reading the quarantine"):
            rows = self.conn.execute("SELECT source, line, raw, reason, at FROM quarantine WHERE user_id = ? "
                                     "ORDER BY source, line", (_user(user),)).fetchall()
        return [dict(zip(("source", "line", "raw", "reason", "at"), r)) for r in rows]

    def export(self, user: str) -> list[dict]:
        """``user``'s events as dicts that `ingest_jsonl` reads back (same event ids)."""
        return [e.to_dict() for e in self.events(user)]

    def stats(self) -> dict:
        """Totals and one row per user (events, episodes, time span, quarantine, notes, last set)."""
        with self._read("reading statistics") as conn:
            per_user = {}
            for user, n, eps, first, last in conn.execute(
                    "SELECT user_id, COUNT(*), COUNT(DISTINCT episode_id), MIN(ts), MAX(ts) FROM events "
                    "GROUP BY user_id ORDER BY user_id"):
                per_user[user] = {"user": user, "events": n, "episodes": eps, "first_ts": first, "last_ts": last,
                                  "quarantined": 0, "notes": 0, "consolidated_version": None}
            for table, key in (("quarantine", "quarantined"), ("notes", "notes")):
                for user, n in conn.execute(f"SELECT user_id, COUNT(*) FROM {table} GROUP BY user_id"):
                    per_user.setdefault(user, {"user": user, "events": 0, "episodes": 0, "first_ts": None,
                                               "last_ts": None, "quarantined": 0, "notes": 0,
                                               "consolidated_version": None})[key] = n
            for user, version in conn.execute("SELECT user_id, MAX(version) FROM consolidations GROUP BY user_id"):
                if user in per_user:
                    per_user[user]["consolidated_version"] = version
            totals = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                      for t in ("events", "quarantine", "notes", "consolidations")}
        return {"path": str(self.path), "schema_version": SCHEMA_VERSION, "users": len(per_user), **totals,
                "per_user": sorted(per_user.values(), key=lambda r: r["user"])}


# ----------------------------------------------------------------------------- line reading

def _bounded_lines(f):
    """Lines of a binary file, none longer than MAX_LINE_BYTES (+1): a file with no newlines
    cannot make us read gigabytes into one string. An over-long line comes back truncated to
    MAX_LINE_BYTES + 1 bytes (the parser then refuses it) and the rest of it is skipped."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:   # skip to the end of this line
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
        yield line


def _parse_line(raw: bytes):
    if len(raw) > MAX_LINE_BYTES:
        raise EventError(f"line is over {MAX_LINE_BYTES} bytes; an event is at most "
                         f"{MAX_LINE_BYTES // 1024} KiB of JSON")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventError(f"line is not UTF-8 (bad byte at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EventError(f"not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise EventError("JSON nested too deeply") from None


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
