"""One experience record (`Event`) and one interaction (`Episode`), validated on the way in.

An episode is what happened in one exchange with a user's environment, in order:

    context       the user's request ("I want a refund for order 4411, it arrived broken")
    action        what the agent did or said
    observation   the environment's answer to that action ("I need the last four digits of your card")
    ...           more actions, each followed by its observation
    feedback      optional words about how it went ("next time ask for the card first")
    reward        optional number (> 0: it worked)

Everything that comes from outside (a JSONL file, a server request) goes through
`Event.from_dict`, which raises `EventError` whose message is the reason, so the caller can put
that reason next to the bad line. The limits below keep one bad client from filling the disk or
smuggling a path into a user id (user ids become directory names under the workspace).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import re
import struct
import time
from dataclasses import dataclass

import xxhash

KINDS = ("context", "action", "observation", "feedback", "reward")

MAX_TEXT_BYTES = 16 * 1024      # one event's text, UTF-8
MAX_META_BYTES = 4 * 1024       # one event's metadata, as JSON
MIN_TS = 946_684_800.0          # 2000-01-01T00:00:00Z: earlier is a unit mistake (ms, or 0)
MAX_FUTURE_S = 24 * 3600        # clocks drift, but not by more than a day

_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_FIELDS = ("event_id", "user_id", "episode_id", "ts", "kind", "text", "reward", "meta")
_FIELD_SET = frozenset(_FIELDS)
_KIND_SET = frozenset(KINDS)


class EventError(ValueError):
    """An event that cannot be stored; the message is the reason (one line)."""


@functools.lru_cache(maxsize=4096)
def _safe_user(user: str) -> bool:
    return bool(_USER_RE.fullmatch(user)) and ".." not in user


@functools.lru_cache(maxsize=4096)   # an episode's events arrive together: most checks are cache hits
def _safe_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def validate_user_id(user) -> str:
    """A user id is also a directory name: letters, digits, ``_ . -``, at most 64, no ``..``."""
    if not isinstance(user, str):
        raise EventError(f"user id must be a string, got {type(user).__name__}")
    if not _safe_user(user):
        raise EventError(f"user id {user[:80]!r} is not allowed: use 1-64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit, without '..'")
    return user


def default_event_id(user_id: str, episode_id: str, ts: float, kind: str, text: str) -> str:
    """The same event logged twice gets the same id, so re-ingesting a file adds nothing.

    Ids and kinds cannot hold "|", ts is 8 fixed bytes and the text comes last, so the key is
    unambiguous. xxh3-128 rather than a cryptographic hash (it is ~10x cheaper, and the id is on
    the ingest path of every event): ids are unique per user in the log, so a crafted collision
    could only ever shadow the crafter's own events. Changing this function changes stored ids:
    the log's schema migration (memory/log.py) must then rewrite them."""
    key = f"{user_id}|{episode_id}|{kind}|".encode() + _TS.pack(ts) + text.encode("utf-8", "surrogatepass")
    return xxhash.xxh3_128_hexdigest(key)


_TS = struct.Struct("<d")


def v1_event_id(user_id: str, episode_id: str, ts: float, kind: str, text: str) -> str:
    """The default id of schema version 1 (sha256), kept so that migration can recognise it."""
    key = f"{user_id}|{episode_id}|{ts!r}|{kind}|{text}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def parse_ts(value) -> float:
    """Unix seconds from a number or an ISO 8601 string ("2025-03-01T12:00:00Z")."""
    if isinstance(value, bool) or value is None:
        raise EventError(f"ts must be unix seconds or an ISO 8601 time, got {value!r}")
    if isinstance(value, (int, float)):
        ts = _as_float(value, "ts")
    elif isinstance(value, str):
        try:
            ts = float(value)
        except (ValueError, OverflowError):
            try:
                parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                raise EventError(f"ts {value[:40]!r} is neither unix seconds nor an ISO 8601 time") from None
            if parsed.tzinfo is None:  # a time without a zone is read as UTC, never as local time
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            ts = parsed.timestamp()
    else:
        raise EventError(f"ts must be unix seconds or an ISO 8601 time, got {type(value).__name__}")
    if not math.isfinite(ts):
        raise EventError(f"ts {value!r} is not a finite number")
    if ts < MIN_TS:
        raise EventError(f"ts {ts:.0f} is before 2000-01-01; give unix seconds (not milliseconds)")
    if ts > time.time() + MAX_FUTURE_S:
        raise EventError(f"ts {ts:.0f} is more than a day in the future; give unix seconds (not milliseconds)")
    return ts


def _as_float(value, what: str) -> float:
    try:
        return float(value)
    except OverflowError:  # JSON integers have no size limit
        raise EventError(f"{what} {str(value)[:20]}... is too large") from None


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from "\ud800" in JSON
        raise EventError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


@dataclass(slots=True)
class Event:
    event_id: str
    user_id: str
    episode_id: str
    ts: float              # unix seconds
    kind: str              # one of KINDS
    text: str
    reward: float | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, user: str | None = None) -> Event:
        """Validate an incoming record. ``user`` (the caller's --user) fills a missing user_id and
        must equal a given one: a file ingested for alice cannot write into bob's log."""
        return cls(*validated_fields(d, user))

    def fields(self) -> tuple:
        """(event_id, user_id, episode_id, ts, kind, text, reward, meta): what validated_fields returns."""
        return (self.event_id, self.user_id, self.episode_id, self.ts, self.kind, self.text, self.reward, self.meta)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validated_fields(d, user: str | None = None) -> tuple:
    """`Event.from_dict` without building the Event: the log stores these fields as they are, and
    skipping the object is a tenth of the ingest path's cost per event."""
    if not isinstance(d, dict):
        raise EventError(f"an event must be a JSON object, got {type(d).__name__}")
    if not _FIELD_SET.issuperset(d):
        unknown = [k for k in d if k not in _FIELD_SET]
        raise EventError(f"unknown field {str(unknown[0])[:40]!r}; an event has {', '.join(_FIELDS)}")

    user_id = d.get("user_id", user)
    if user_id is None:
        raise EventError("missing user_id")
    validate_user_id(user_id)
    if user is not None and user_id != user:
        raise EventError(f"event is for user {user_id!r}, not for {user!r}")

    episode_id = d.get("episode_id")
    if not isinstance(episode_id, str) or not _safe_id(episode_id):
        raise EventError(f"episode_id {str(episode_id)[:80]!r} must be 1-128 letters, digits or _ . : @ -")

    ts = d.get("ts")
    if not (type(ts) is float and MIN_TS <= ts <= time.time() + MAX_FUTURE_S):   # the common case, checked fast
        if "ts" not in d:
            raise EventError("missing ts")
        ts = parse_ts(ts)

    kind = d.get("kind")
    if kind not in _KIND_SET:
        raise EventError(f"unknown kind {str(kind)[:40]!r}; use one of {', '.join(KINDS)}")

    text = d.get("text", "" if kind == "reward" else None)
    if not isinstance(text, str):
        raise EventError(f"text must be a string, got {type(text).__name__}")
    n = len(text) if text.isascii() else _utf8_len(text, "text")
    if n > MAX_TEXT_BYTES:
        raise EventError(f"text is {n} bytes, over the {MAX_TEXT_BYTES} byte limit")
    if kind != "reward" and not text.strip():
        raise EventError(f"a {kind} event needs a non-empty text")

    reward = d.get("reward")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise EventError(f"reward must be a finite number, got {str(reward)[:40]}")
        reward = _as_float(reward, "reward")
        if not math.isfinite(reward):
            raise EventError(f"reward must be a finite number, got {reward}")
    elif kind == "reward":
        raise EventError("a reward event needs a numeric reward")

    meta = d.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise EventError(f"meta must be a JSON object, got {type(meta).__name__}")
    elif meta:
        n = _utf8_len(json.dumps(meta, ensure_ascii=False), "meta")
        if n > MAX_META_BYTES:
            raise EventError(f"meta is {n} bytes as JSON, over the {MAX_META_BYTES} byte limit")

    event_id = d.get("event_id")
    if event_id is None:
        event_id = default_event_id(user_id, episode_id, ts, kind, text)
    elif not isinstance(event_id, str) or not _safe_id(event_id):
        raise EventError(f"event_id {str(event_id)[:80]!r} must be 1-128 letters, digits or _ . : @ -")
    return event_id, user_id, episode_id, ts, kind, text, reward, meta


# ----------------------------------------------------------------------------- episodes

@dataclass
class Step:
    """One action and what the environment answered (``observation`` is "" when nothing came back)."""

    action: str
    observation: str = ""
    ok: bool | None = None     # from the observation's meta {"ok": true|false}, when the environment says so


@dataclass
class Episode:
    """An episode's events read as a story: the request, the steps, how it ended."""

    episode_id: str
    user_id: str
    context: str
    steps: list[Step]
    feedback: list[str]
    reward: float | None       # the last reward event's value
    check: str                 # the context's meta "check": a regex that a right action matches ("" if none)
    first_ts: float
    last_ts: float

    @classmethod
    def from_events(cls, events: list[Event]) -> Episode:
        """``events`` in time order. An observation belongs to the action before it; a second
        context event or an observation with no action before it is kept as feedback text."""
        ev0 = events[0]
        context, check, steps, feedback, reward = "", "", [], [], None
        for e in events:
            if e.kind == "context" and not context:
                context, check = e.text, str(e.meta.get("check", "") or "")
            elif e.kind == "action":
                steps.append(Step(e.text))
            elif e.kind == "observation" and steps and not steps[-1].observation:
                steps[-1].observation = e.text
                ok = e.meta.get("ok")
                steps[-1].ok = ok if isinstance(ok, bool) else None
            elif e.kind == "reward":
                reward = e.reward
                if e.text.strip():
                    feedback.append(e.text)
            else:
                feedback.append(e.text)
        return cls(ev0.episode_id, ev0.user_id, context, steps, feedback, reward, check,
                   events[0].ts, events[-1].ts)

    def texts(self) -> list[str]:
        """What the agent and the user said: the request and the actions (what a policy learns from)."""
        return [t for t in [self.context, *(s.action for s in self.steps)] if t]
