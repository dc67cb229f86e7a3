"""Scripted users for `cogcore demo`: who they are, what their environment answers, how success is checked.

A users file is JSON (``demo/users.json`` is the built-in one)::

    {"format": "cogcore-demo-users/1",
     "junk": ["lol ok", "Like and subscribe!!!", ...],          # optional: planted junk replies
     "users": [
       {"id": "alice",                                          # a safe user id (letters, digits, _ . -)
        "about": "a refund desk that needs the last four card digits",   # for people; never shown to the model
        "check": "(?i)last (four|4) digits",                    # a right FIRST action matches this
        "observation_check": "(?i)last four digits",            # optional: a right world-model prediction matches this
        "episodes": [
          {"request": "Please refund my kettle, it arrived broken.",
           "wrong_observation": "REFUND DESK: ... I need the last four digits of the card ...",
           "right_action": "I can help. First, please tell me the last four digits of the card you paid with.",
           "right_observation": "REFUND DESK: Card verified. Refund started."}]}]}

The environment never states its rule up front: it only answers. A first action that matches
``check`` succeeds (``right_observation``); any other gets ``wrong_observation``, which is how
the rule is revealed. The last ``heldout`` episodes of each user are never logged: they are the
wake-up test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cogcore.train.config import CogcoreError

FORMAT = "cogcore-demo-users/1"
EPISODE_FIELDS = ("request", "wrong_observation", "right_action", "right_observation")


@dataclass(frozen=True)
class Episode:
    request: str
    wrong_observation: str
    right_action: str
    right_observation: str


@dataclass(frozen=True)
class DemoUser:
    id: str
    about: str
    check: re.Pattern
    observation_check: re.Pattern | None
    episodes: tuple[Episode, ...]

    def succeeds(self, action: str) -> bool:
        return bool(self.check.search(action))

    def answer(self, episode: Episode, action: str) -> tuple[str, bool]:
        """The environment's reply to a first action, and whether it succeeded."""
        ok = self.succeeds(action)
        return (episode.right_observation if ok else episode.wrong_observation), ok

    def predicts(self, episode: Episode, action: str, prediction: str) -> bool:
        """Does a world-model prediction say what the environment answers to ``action``?"""
        says_refusal = self.predicts_wrong_observation(episode, prediction)
        if not self.succeeds(action):
            return says_refusal
        return not says_refusal and _overlap(episode.right_observation, prediction)

    def predicts_wrong_observation(self, episode: Episode, prediction: str) -> bool:
        """Does a world-model prediction say what the environment answers to a wrong action?"""
        if self.observation_check is not None:
            return bool(self.observation_check.search(prediction))
        return _overlap(episode.wrong_observation, prediction) and _jaccard(episode.wrong_observation, prediction) > \
            _jaccard(episode.right_observation, prediction)


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _overlap(want: str, got: str) -> bool:
    """At least 60% of the expected answer's words are in the prediction."""
    w, g = _words(want), _words(got)
    return bool(w) and len(w & g) >= 0.6 * len(w)


def _jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(1, len(wa | wb))


@dataclass(frozen=True)
class UsersFile:
    path: str
    users: tuple[DemoUser, ...]
    junk: tuple[str, ...]


def builtin_users_path() -> Path:
    return Path(str(resources.files("cogcore.demo") / "users.json"))


def _pattern(text, where: str) -> re.Pattern:
    if not isinstance(text, str) or not text:
        raise CogcoreError(f"{where} must be a non-empty regular expression string")
    try:
        return re.compile(text)
    except re.error as e:
        raise CogcoreError(f"{where} is not a valid regular expression ({e}): {text!r}") from None


def load_users(path: str | Path | None = None) -> UsersFile:
    """Read and check a users file; every problem names the user, the episode and the field."""
    from cogcore.memory.events import EventError, validate_user_id
    path = Path(path) if path else builtin_users_path()
    if not path.is_file():
        raise CogcoreError(f"users file {path} does not exist; pass --users FILE (format: see demo/users.py) "
                           "or leave it out for the built-in users")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CogcoreError(f"users file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("users"), list) or not doc["users"]:
        raise CogcoreError(f"users file {path} must be an object with a non-empty 'users' list")
    if doc.get("format", FORMAT) != FORMAT:
        raise CogcoreError(f"users file {path} has format {doc.get('format')!r}; this cogcore reads {FORMAT!r}")
    users, seen = [], set()
    for i, u in enumerate(doc["users"]):
        where = f"{path}: users[{i}]"
        if not isinstance(u, dict):
            raise CogcoreError(f"{where} must be an object")
        try:
            uid = validate_user_id(str(u.get("id", "")))
        except EventError as e:
            raise CogcoreError(f"{where}.id: {e}") from None
        if uid in seen:
            raise CogcoreError(f"{where}.id: user {uid!r} appears twice")
        seen.add(uid)
        eps = []
        for j, e in enumerate(u.get("episodes") or []):
            missing = [f for f in EPISODE_FIELDS if not isinstance(e, dict) or not str(e.get(f, "")).strip()]
            if missing:
                raise CogcoreError(f"{where} ({uid}) episodes[{j}] lacks {', '.join(missing)}")
            eps.append(Episode(*(str(e[f]) for f in EPISODE_FIELDS)))
        if len(eps) < 4:
            raise CogcoreError(f"{where} ({uid}) needs at least 4 episodes (some to learn from, some held out), "
                               f"has {len(eps)}")
        check = _pattern(u.get("check"), f"{where} ({uid}).check")
        obs = _pattern(u["observation_check"], f"{where} ({uid}).observation_check") if u.get("observation_check") else None
        bad = [j for j, e in enumerate(eps) if not check.search(e.right_action)]
        if bad:
            raise CogcoreError(f"{where} ({uid}): the right_action of episodes {bad[:5]} does not match its own "
                               f"check {check.pattern!r}; fix the regex or the actions")
        users.append(DemoUser(uid, str(u.get("about", "")), check, obs, tuple(eps)))
    junk = tuple(str(j) for j in doc.get("junk", []) if str(j).strip())
    return UsersFile(str(path), tuple(users), junk)
