"""Sleep: turn one user's experience into a versioned training set (a `ConsolidatedSet`).

    cs = consolidate(ExperienceLog.open(), "alice", ConsolidateConfig(model="tiny-llama"))
    cs.path            # <workspace>/consolidated/alice/v3/  (train.parquet, heldout.parquet, report.*)

Read top to bottom, one run does:
  1. read the user's episodes (optionally only those with events after ``since``);
  2. drop incomplete episodes (no request or no action), junk (named rules in memory/junk.py, plus
     optional model scores under the core: perplexity, relevance, the junk classifier) and exact / near duplicates;
  3. find each episode's outcome: which action worked (a positive reward, the environment's
     ``ok`` flag, or the request's ``check`` regex) and which failed;
  4. draw lessons from failures followed by a success ("Before issuing a refund for the order, ask
     for the last four digits of their card.") and add them to the user's notes;
  5. hold out some successful episodes per user for the refresh's gate;
  6. build examples with two targets in cogcore's ``segments`` format (memory/formats.py):
     policy (the request -> the action that worked) and world model (the request + an action ->
     what the environment answered), each with its own loss weight, plus a share of general
     replay examples against forgetting;
  7. write the set aside and rename it into place: a run killed midway leaves nothing visible,
     and the next run removes the leftovers and completes.

Everything is deterministic given ``seed``: episodes are read in time order, the split hashes
episode ids with the seed, MinHash uses a fixed seed, replay is sampled with ``Random(seed)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..train.config import CogcoreError, field
from ..train.workspace import Workspace, get_workspace
from . import formats
from .events import Episode, Step
from .junk import (
    RULE_NAMES,
    RULES,
    Deduplicator,
    PerplexityScorer,
    episode_perplexity,
    episode_relevance,
    judge_episode,
    junk_rule,
)
from .log import ExperienceLog, _user

EXAMPLES_PER_RULE = 3


@dataclass
class ConsolidateConfig:
    model: str = field("smollm2-135m", help="the core model: its tokenizer renders the examples' chat template; it "
                                            "also scores perplexity and writes lessons when those are on")
    seed: int = field(0, help="seed for the held-out split, replay sampling and shuffling")
    policy_weight: float = field(1.0, help="loss weight of policy targets (the action that worked)")
    world_weight: float = field(0.5, help="loss weight of world-model targets (the environment's answer)")
    replay_share: float = field(0.2, help="share of the training rows that are general replay examples (0 = none)")
    replay_source: str = field("builtin:chat-arithmetic", help="where replay examples come from: a builtin: "
                                                               "dataset or a .jsonl/.json/.parquet file of records")
    replay_weight: float = field(1.0, help="loss weight multiplier of replay targets")
    heldout_fraction: float = field(0.2, help="share of a user's successful episodes held out for the gate")
    heldout_max: int = field(20, help="at most this many held-out episodes per user")
    junk_rules: list[str] = field(default_factory=lambda: list(RULE_NAMES),
                                  help=f"junk rules to apply, of: {', '.join(RULE_NAMES)}")
    max_perplexity: float = field(0.0, help="drop an episode whose request (on its own) or an action (as the reply "
                                            "to the request) has a perplexity above this under `model` (0 = off: it "
                                            "loads and runs the model, slow on CPU)")
    relevance: bool = field(False, help="drop an episode whose action the request does not make likelier under "
                                        "`model` (relevance below min_relevance; loads and runs the model, slow on CPU)")
    min_relevance: float = field(-0.44, help="nats per token the request must add to the action's likelihood; the "
                                            "default keeps 99% of the good episodes of bench/bench_memory.py under the "
                                            "embedded model (recalibrate for another model with --model-score)")
    junk_classifier: bool = field(False, help="drop an episode whose request or an action the junk classifier (a "
                                              "logistic regression over `model`'s hidden states) scores above "
                                              "junk_threshold; trained on first use (~2 min on CPU for the "
                                              "embedded model) and kept in <workspace>/experience/junk-classifier")
    junk_threshold: float = field(0.5, help="P(junk) above which the junk classifier drops an episode")
    junk_rule_confirm: float = field(0.25, help="with the junk classifier on, a named rule drops an episode only "
                                                "when the classifier gives it at least this P(junk): the rule names "
                                                "the kind of junk, the core's reading confirms it (so a terse good "
                                                "answer such as '144' is not taken for chatter); 0 = rules drop on "
                                                "their own")
    near_duplicate_threshold: float = field(0.85, help="Jaccard similarity of character shingles above which two "
                                                       "episodes are near-duplicates (the later one is dropped)")
    shingle_chars: int = field(5, help="characters per shingle for near-duplicate detection")
    num_perm: int = field(128, help="MinHash permutations")
    lessons: Literal["template", "model"] = field("template", help="write lessons with a deterministic template, or "
                                                                   "ask the model (a junk answer falls back to the template)")
    policy_without_outcome: bool = field(False, help="also make a policy example of an episode with no sign of "
                                                     "success (no reward, ok flag or check): its last action")
    out: str = field("", help="folder holding every user's sets (default: <workspace>/consolidated)")
    progress: bool = field(True, help="show a progress bar")

    def __post_init__(self):
        unknown = [r for r in self.junk_rules if r not in RULE_NAMES]
        if unknown:
            raise ValueError(f"junk_rules: unknown rule {unknown[0]!r}; rules are {', '.join(RULE_NAMES)}")
        if not 0 <= self.replay_share < 1:
            raise ValueError(f"replay_share={self.replay_share} must be in [0, 1)")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if not 0 < self.junk_threshold < 1:
            raise ValueError(f"junk_threshold={self.junk_threshold} must be in (0, 1)")
        if not 0 <= self.junk_rule_confirm < 1:
            raise ValueError(f"junk_rule_confirm={self.junk_rule_confirm} must be in [0, 1)")
        if not 0 < self.near_duplicate_threshold <= 1:
            raise ValueError(f"near_duplicate_threshold={self.near_duplicate_threshold} must be in (0, 1]")
        for name in ("policy_weight", "world_weight", "replay_weight", "max_perplexity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.shingle_chars < 1 or self.num_perm < 16 or self.heldout_max < 0:
            raise ValueError("shingle_chars >= 1, num_perm >= 16 and heldout_max >= 0, please")


@dataclass
class ConsolidatedSet:
    user: str
    version: int
    path: Path
    n_train: int
    n_heldout: int
    report: dict

    @property
    def train_path(self) -> Path:
        return self.path / "train.parquet"

    @property
    def heldout_path(self) -> Path:
        return self.path / "heldout.parquet"

    def train_records(self) -> list[dict]:
        import pyarrow.parquet as pq
        return pq.read_table(self.train_path).to_pylist()

    def heldout(self) -> list[dict]:
        import pyarrow.parquet as pq
        return pq.read_table(self.heldout_path).to_pylist()


# ----------------------------------------------------------------------------- finding sets

def sets_root(ws: Workspace | None = None, out: str = "") -> Path:
    return Path(out).expanduser() if out else (ws or get_workspace()).consolidated


def _versions(user_dir: Path, complete_only: bool = True) -> list[int]:
    found = []
    if user_dir.is_dir():
        for p in user_dir.iterdir():
            if re.fullmatch(r"v\d+", p.name) and (not complete_only or (p / ".complete").is_file()):
                found.append(int(p.name[1:]))
    return sorted(found)


def load_set(user: str, version: int, ws: Workspace | None = None, root: Path | None = None) -> ConsolidatedSet:
    path = (root or sets_root(ws)) / _user(user) / f"v{int(version)}"
    if not (path / ".complete").is_file():
        have = ", ".join(f"v{v}" for v in _versions(path.parent)) or "none"
        raise CogcoreError(f"no complete consolidated set {user}@v{version} in {path.parent} (have: {have}); run "
                           f"`cogcore memory consolidate --user {user}`")
    report = json.loads((path / "report.json").read_text())
    return ConsolidatedSet(user, int(version), path, report["train_rows"], report["heldout"], report)


def latest_set(user: str, ws: Workspace | None = None, root: Path | None = None) -> ConsolidatedSet | None:
    versions = _versions((root or sets_root(ws)) / _user(user))
    return load_set(user, versions[-1], ws, root) if versions else None


# ----------------------------------------------------------------------------- outcomes

@dataclass
class Outcome:
    right: int | None          # index of the step that worked (None: no step is known to have worked)
    failed: list[int]          # steps known to have failed, before ``right``
    known: bool                # False: nothing said whether any step worked


def outcome(ep: Episode, policy_without_outcome: bool = False) -> Outcome:
    """Which action worked. Per step, in order of trust: the observation's ``ok`` flag; the request's
    ``check`` regex; "the agent had to try again" (a step followed by another failed); for the last
    step, the episode's reward (> 0 worked)."""
    check = None
    if ep.check:
        try:
            check = re.compile(ep.check)
        except re.error:
            check = None
    oks: list[bool | None] = []
    for i, step in enumerate(ep.steps):
        ok = step.ok
        if ok is None and check is not None:
            ok = check.search(step.action) is not None
        if ok is None and i < len(ep.steps) - 1:
            ok = False
        if ok is None and ep.reward is not None:
            ok = ep.reward > 0
        oks.append(ok)
    right = next((i for i, ok in enumerate(oks) if ok), None)
    known = any(ok is not None for ok in oks[-1:]) or right is not None
    if right is None and not known and policy_without_outcome and ep.steps:
        right = len(ep.steps) - 1
    limit = right if right is not None else len(oks)
    return Outcome(right, [i for i in range(limit) if oks[i] is False], known)


# ----------------------------------------------------------------------------- lessons

_PRONOUNS = [(r"\byour\b", "their"), (r"\byours\b", "theirs"), (r"\byou're\b", "they're"), (r"\byou\b", "them")]
_NOT_VERBS = frozenset("i you your we the a an this that it my our please here there sure ok okay yes no hello hi "
                       "thanks thank sorry can could would will to as in on at for of if when what how why who "
                       "which while since because so then there's it's that's".split())
# a second word that makes the first one a subject, not an imperative verb
_STATEMENT_WORDS = frozenset("is are was were has have had does do did will would can could should may might "
                             "must seems means".split())

# (pattern on one sentence of the observation, instruction template) — first match wins.
_INSTRUCTIONS = [
    (r"\b(?:i|we)(?:'d| would)? need you to (.+)", "{0}"),
    (r"\b((?:replies|answers|responses|messages|requests) (?:must|have to|need to|should) .+)", "remember that {0}"),
    (r"\b(?:you )?(?:must|have to|need to|should) (?:first )?(.+)", "{0}"),
    (r"\b(?:can ?not|can't|unable to|won't|will not) .+? (?:without|until|unless) (.+)", "get {0}"),
    (r"\b(?:i|we) (?:always |first |also )?(?:need|require) (.+?)(?: (?:before|in order to|to proceed)\b.*)?$", "ask for {0}"),
    (r"\bplease (?:provide|give|send|include|share|confirm|tell me) (.+)", "ask for {0}"),
    (r"^(.+?) (?:is|are) (?:required|missing|needed)\b", "ask for {0}"),
    (r"\bmissing (.+)", "include {0}"),
]


def _clip(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _gerund(verb: str) -> str:
    v = verb.lower()
    if v.endswith("ie"):
        return v[:-2] + "ying"
    if v.endswith("e") and not v.endswith(("ee", "ye", "oe")) and len(v) > 2:
        return v[:-1] + "ing"
    # one vowel group ending consonant-vowel-consonant: stop -> stopping (but open -> opening)
    if len(re.findall(r"[aeiou]+", v)) == 1 and re.search(r"[^aeiou][aeiou][^aeiouwxy]$", v):
        return v + v[-1] + "ing"
    return v + "ing"


def _generalize(text: str) -> str:
    """The specific order / ticket number is not part of a lesson: "order 4411" -> "the order"."""
    text = re.sub(r"\b(?:the |an? |your |my )?(order|ticket|account|invoice|case|card|booking)\s*(?:number\s*|no\.?\s*)?"
                  r"#?\d{3,}\b", r"the \1", text, flags=re.IGNORECASE)
    return re.sub(r"\s*#?\b\d{3,}\b", "", text).strip()


def intent(action: str) -> str:
    """What an action tried to do, as a phrase after "Before ...": "Issue a refund for order 4411."
    -> "issuing a refund for the order"; "refund(order=4411)" -> "calling refund"."""
    a = " ".join(action.split()).rstrip(".!?;:")
    call = re.match(r"^([A-Za-z_][\w.]*)\s*\(", a)
    if call:
        return f"calling {call.group(1)}"
    a = re.sub(r"^(?:(?:ok(?:ay)?|sure|alright)[,!.]?\s+)?(?:i'll|i will|i am going to|i'm going to|let me)\s+", "", a,
               flags=re.IGNORECASE)
    words = _generalize(a).split()
    if not words:
        return "acting"
    # only a short command reads as "Before <doing it>"; a statement ("January is ...", "To add 5
    # and 3, ...") or a chatty reply is quoted as what was said
    statement = len(words) > 1 and words[1].lower().strip(",") in _STATEMENT_WORDS
    if (words[0].lower() in _NOT_VERBS or not words[0].isalpha() or statement or len(words) > 16
            or words[0].endswith(",")):
        return f'saying "{_clip(a, 80)}"'
    return " ".join([_gerund(words[0])] + words[1:])


def instruction(observation: str) -> str | None:
    """The environment's answer turned into what to do: "I need the last four digits of your card"
    -> "ask for the last four digits of their card". None if no pattern fits."""
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(observation.split())):
        s = sentence.rstrip(".!?").strip()
        for pattern, template in _INSTRUCTIONS:
            m = re.search(pattern, s, flags=re.IGNORECASE)
            if m:
                what = m.group(1).strip(" ,;:")
                # "... before changing order 1663" repeats the lesson's "Before <intent>"
                what = re.sub(r"\s+(?:before|in order to|so that|so we can|to proceed)\b.*$", "", what, flags=re.IGNORECASE)
                what = _generalize(what)
                for p, r in _PRONOUNS:
                    what = re.sub(p, r, what, flags=re.IGNORECASE)
                if what[:1].isupper() and not what[1:2].isupper():   # "The account number" starts no sentence here
                    what = what[0].lower() + what[1:]
                if what:
                    return template.format(what)
    return None


def template_lesson(failed_action: str, observation: str, right_action: str) -> str:
    """Before <what the failed action tried>, <what the environment said was missing>."""
    todo = instruction(observation)
    if todo is None:
        said, worked = (_clip(_generalize(t), 100).rstrip(".!?") for t in (observation, right_action))
        todo = f'expect "{said}" and do this instead: "{worked}"'
    return f"Before {intent(failed_action)}, {todo}."


_FEEDBACK_RULE = re.compile(r"\b(next time|always|never|don'?t|do not|please|should|must|instead|prefer|remember)\b",
                            re.IGNORECASE)


class _ModelLessons:
    """Lessons written by the core model; an answer that is junk (or empty) falls back to the template."""

    PROMPT = ("An assistant tried an action and the environment refused; then another action worked.\n"
              "Request: {context}\nFailed action: {failed}\nEnvironment said: {obs}\nAction that worked: {right}\n"
              "Write one short rule for next time, starting with \"Before\".")

    def __init__(self, source: str):
        from ..train.model import load_model, load_tokenizer
        self.model, self.tok = load_model(source).eval(), load_tokenizer(source)

    def __call__(self, context: str, failed: str, obs: str, right: str) -> str | None:
        import torch
        msgs = [{"role": "user", "content": self.PROMPT.format(context=_clip(context, 300), failed=_clip(failed, 300),
                                                               obs=_clip(obs, 300), right=_clip(right, 300))}]
        prompt = formats.render_prompt(self.tok, msgs)
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=self.tok.pad_token_id)
        text = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
        if len(text.split()) < 4 or len(text) > 300 or junk_rule(text):
            return None
        return text


# ----------------------------------------------------------------------------- examples

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(source: str):
    if source not in _TOKENIZERS:   # consolidating 100 users loads the tokenizer once
        from ..train.model import load_tokenizer
        _TOKENIZERS[source] = load_tokenizer(source)
    return _TOKENIZERS[source]


def replay_rows(n: int, cfg: ConsolidateConfig, tok, rng: random.Random) -> list[dict]:
    """``n`` general examples from ``cfg.replay_source`` as segment rows (target "replay")."""
    from ..train.data import read_records, record_segments
    if n <= 0:
        return []
    if cfg.replay_source.startswith("builtin:"):
        records = read_records(cfg.replay_source, builtin_size=n, seed=rng.randrange(2**31))
    else:
        records = read_records(cfg.replay_source)
        records = [records[rng.randrange(len(records))] for _ in range(n)] if len(records) < n else rng.sample(records, n)
    rows = []
    for i, rec in enumerate(records[:n]):
        segs = record_segments(rec, tok, "completion", where=f"{cfg.replay_source} record {i}")
        rows.append({"segments": [{"text": t, "weight": w * cfg.replay_weight} for t, w in segs],
                     "target": "replay", "episode_id": "", "source": cfg.replay_source})
    return rows


def policy_segments(tok, ep: Episode, right: int, weight: float) -> list[dict]:
    return formats.example_segments(tok, formats.policy_messages(ep.context), ep.steps[right].action, weight)


def world_segments(tok, ep: Episode, step: Step, weight: float) -> list[dict]:
    return formats.example_segments(tok, formats.world_messages(ep.context, step.action), step.observation, weight)


def heldout_ids(candidates: list[str], cfg: ConsolidateConfig) -> set[str]:
    """Hash each episode id with the seed and hold out the lowest: an episode held out once stays held
    out when later runs see more episodes (same seed), so the gate never scores training data."""
    k = min(cfg.heldout_max, round(cfg.heldout_fraction * len(candidates)))
    k = min(k, max(0, len(candidates) - 1))   # keep at least one successful episode to train on
    ranked = sorted(candidates, key=lambda e: hashlib.sha256(f"{cfg.seed}:{e}".encode()).hexdigest())
    return set(ranked[:k])


# ----------------------------------------------------------------------------- the run

def consolidate(log: ExperienceLog, user: str, cfg: ConsolidateConfig | None = None,
                since: float | None = None) -> ConsolidatedSet:
    """Consolidate ``user``'s episodes (those with events after ``since``, default all) into a new version."""
    cfg = cfg or ConsolidateConfig()
    user = _user(user)
    t0 = time.perf_counter()
    root = sets_root(out=cfg.out)
    user_dir = root / user
    user_dir.mkdir(parents=True, exist_ok=True)

    with _user_lock(user_dir):
        for stale in user_dir.glob(".v*.tmp-*"):   # left by a run killed midway (we hold the lock: it is dead)
            shutil.rmtree(stale, ignore_errors=True)

        # 1. read
        raw = log.episodes(user, since=since)
        if not raw:
            when = f" after {since}" if since is not None else ""
            raise CogcoreError(f"no events for user {user}{when}; ingest some first (cogcore memory ingest --user "
                               f"{user} FILE.jsonl)")
        episodes = [Episode.from_events(evs) for evs in raw]
        n_events = sum(len(evs) for evs in raw)
        last_event_ts = max(e.ts for evs in raw for e in evs)
        report = _new_report(user, cfg, since, n_events, len(episodes), last_event_ts)

        # 2. drop incomplete, junk and duplicate episodes
        kept, junk_steps = [], set()
        judged: dict[str, list[str]] = {}   # per kept episode: the request and the actions judged above
        use_classifier = cfg.junk_classifier and "classifier" in cfg.junk_rules
        flagged: dict[str, tuple[str, str]] = {}   # rule verdicts waiting for the classifier to confirm them
        for ep in _bar(episodes, f"{user}: junk gate", cfg.progress):
            if not ep.context or not ep.steps:
                _count(report["incomplete"], ep.episode_id)
                continue
            # Judge the request and the actions a policy would learn from. A first action the environment
            # rejected may be junk itself (an empty or "ok" reply from a weak core): the episode still
            # teaches, through the environment's answer and the correction; only that step is not
            # used as a world-model example.
            rules = [r for r in cfg.junk_rules if r in RULES]
            o = outcome(ep, cfg.policy_without_outcome)
            failed = set(o.failed) if o.right is not None else set()  # no correction: judge every action
            kept_texts = [ep.context] + [s.action for i, s in enumerate(ep.steps) if i not in failed]
            verdict = judge_episode([t for t in kept_texts if t], rules)
            if verdict and use_classifier and cfg.junk_rule_confirm > 0:
                flagged[ep.episode_id] = verdict
            elif verdict:
                _count(report["junk"]["rules"][verdict[0]], _clip(verdict[1], 160))
                continue
            for i in failed:
                if junk_rule(ep.steps[i].action, rules) or not ep.steps[i].action.strip():
                    junk_steps.add((ep.episode_id, i))
            judged[ep.episode_id] = kept_texts
            kept.append(ep)
        report["junk"]["failed_actions_not_used"] = len(junk_steps)
        if cfg.max_perplexity > 0 and "perplexity" in cfg.junk_rules and kept:
            kept = _perplexity_gate(kept, cfg, report)
        if cfg.relevance and "relevance" in cfg.junk_rules and kept:
            kept = _relevance_gate(kept, judged, cfg, report)
        if use_classifier and kept:
            kept = _classifier_gate(kept, judged, flagged, cfg, report)
        report["junk"]["dropped"] = sum(r["count"] for r in report["junk"]["rules"].values())

        dedup = Deduplicator(cfg.near_duplicate_threshold, cfg.shingle_chars, cfg.num_perm)
        unique = []
        for ep in kept:
            dup = dedup.seen(ep.episode_id, _episode_text(ep))
            if dup:
                report["duplicates"][dup[1]] += 1
                if len(report["duplicates"]["examples"]) < EXAMPLES_PER_RULE:
                    report["duplicates"]["examples"].append({"episode_id": ep.episode_id, "duplicate_of": dup[0],
                                                             "how": dup[1]})
                continue
            unique.append(ep)

        # 3. outcomes
        outcomes = {ep.episode_id: outcome(ep, cfg.policy_without_outcome) for ep in unique}
        for ep in unique:
            o = outcomes[ep.episode_id]
            report["outcomes"]["succeeded" if o.right is not None else "failed" if o.known else "unknown"] += 1

        # 5 (before 4: lessons come from training episodes only, so the gate cannot read its answers in notes)
        heldout = heldout_ids([ep.episode_id for ep in unique if outcomes[ep.episode_id].right is not None], cfg)
        train_eps = [ep for ep in unique if ep.episode_id not in heldout]

        # 4. lessons
        lessons = _lessons(train_eps, outcomes, cfg, report)

        # 6. examples
        tok = _tokenizer(cfg.model)
        rows = []
        for ep in _bar(train_eps, f"{user}: examples", cfg.progress):
            o = outcomes[ep.episode_id]
            if o.right is not None:
                rows.append({"segments": policy_segments(tok, ep, o.right, cfg.policy_weight), "target": "policy",
                             "episode_id": ep.episode_id, "source": "experience"})
            for i, step in enumerate(ep.steps):
                if step.observation and (ep.episode_id, i) not in junk_steps:
                    rows.append({"segments": world_segments(tok, ep, step, cfg.world_weight), "target": "world",
                                 "episode_id": ep.episode_id, "source": "experience"})
        rng = random.Random(f"{cfg.seed}:{user}")
        n_replay = round(cfg.replay_share / (1 - cfg.replay_share) * len(rows)) if rows else 0
        rows += replay_rows(n_replay, cfg, tok, rng)
        rng.shuffle(rows)
        held_rows = [_heldout_row(tok, ep, outcomes[ep.episode_id], cfg) for ep in unique if ep.episode_id in heldout]

        for target in ("policy", "world", "replay"):
            report["examples"][target] = sum(r["target"] == target for r in rows)
        report["train_rows"], report["heldout"] = len(rows), len(held_rows)
        report["lessons"] = lessons
        report["seconds"] = round(time.perf_counter() - t0, 3)

        # 7. write aside, rename into place, then notes and bookkeeping
        version = max(_versions(user_dir, complete_only=False) + [(log.last_consolidation(user) or {}).get("version", 0)]) + 1
        report["version"] = version
        path = _publish(user_dir, version, rows, held_rows, report)
        for lesson in lessons:
            log.add_note(user, lesson["text"], source=lesson["source"])
        log.record_consolidation(user, version, last_event_ts, n_events, path)
    return ConsolidatedSet(user, version, path, len(rows), len(held_rows), report)


def consolidate_all(log: ExperienceLog, cfg: ConsolidateConfig | None = None, since: float | str | None = None,
                    only_new: bool = False) -> list[ConsolidatedSet]:
    """Every user with events after ``since`` (unix seconds, or "last": each user's last consolidation);
    with ``only_new``, only users with events newer than their last set. Users with nothing to read are skipped."""
    cfg = cfg or ConsolidateConfig()
    out = []
    quiet = dataclasses.replace(cfg, progress=False)
    for user in _bar(log.users(), "users", cfg.progress):
        last = log.last_consolidation(user)
        user_since = (last["last_event_ts"] if last else None) if since == "last" else since
        if only_new and log.count_new_events(user) == 0:
            continue
        if user_since is not None and log.count_events(user, since=user_since) == 0:
            continue
        out.append(consolidate(log, user, quiet, since=user_since))
    return out


# ----------------------------------------------------------------------------- pieces of the run

def _new_report(user, cfg, since, n_events, n_episodes, last_event_ts) -> dict:
    return {
        "user": user, "version": None, "seed": cfg.seed, "model": cfg.model, "since": since,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "events": n_events, "episodes": n_episodes, "last_event_ts": last_event_ts,
        "incomplete": {"count": 0, "examples": []},
        "junk": {"dropped": 0, "rules": {r: {"count": 0, "examples": []} for r in cfg.junk_rules}},
        "duplicates": {"exact": 0, "near": 0, "examples": []},
        "outcomes": {"succeeded": 0, "failed": 0, "unknown": 0},
        "lessons": [], "examples": {"policy": 0, "world": 0, "replay": 0}, "train_rows": 0, "heldout": 0,
        "config": dataclasses.asdict(cfg),
    }


def _count(slot: dict, example: str) -> None:
    slot["count"] += 1
    if len(slot["examples"]) < EXAMPLES_PER_RULE:
        slot["examples"].append(example)


def _episode_text(ep: Episode) -> str:
    """What near-duplicate detection compares: the request and the actions. The environment's answers
    are left out: a rule-following environment repeats itself by design, and with them every episode
    of one rule looked like a near copy of the others."""
    return "\n".join(ep.texts())


def _perplexity_gate(kept: list[Episode], cfg: ConsolidateConfig, report: dict) -> list[Episode]:
    worst = episode_perplexity(_scorer(cfg.model), [ep.texts() for ep in kept], progress=cfg.progress)
    return _drop_scored(kept, worst, lambda ppl: ppl > cfg.max_perplexity, "perplexity",
                        lambda ppl: f"perplexity {ppl:.1f}", report)


def _relevance_gate(kept: list[Episode], judged: dict[str, list[str]], cfg: ConsolidateConfig,
                    report: dict) -> list[Episode]:
    """Judged on what the rules judged: the request and the actions a policy would learn from (a
    rejected first action of a weak core may well be off the point: the episode still teaches
    through the correction)."""
    texts = [[judged[ep.episode_id][0]] + [t for t in judged[ep.episode_id][1:] if t.strip()] for ep in kept]
    lowest = episode_relevance(_scorer(cfg.model), texts, progress=cfg.progress)
    return _drop_scored(kept, lowest, lambda score: score < cfg.min_relevance, "relevance",
                        lambda score: f"relevance {score:+.2f}", report)


def _classifier_gate(kept: list[Episode], judged: dict[str, list[str]], flagged: dict[str, tuple[str, str]],
                     cfg: ConsolidateConfig, report: dict) -> list[Episode]:
    """Judged on what the rules judged: the request on its own, and each action a policy would learn
    from as the reply to the request. An episode goes when its worst P(junk) is above junk_threshold,
    or when a rule ``flagged`` it and the classifier agrees at least at junk_rule_confirm (counted
    under the rule); a flagged episode the classifier reads as fine is kept and counted as overruled."""
    from .junk_classifier import load_or_train
    scorer = _scorer(cfg.model)
    clf = load_or_train(scorer.model, scorer.tok, progress=cfg.progress)
    texts, requests, owner = [], [], []
    for k, ep in enumerate(kept):
        request, *actions = judged[ep.episode_id]
        for text, after in [(request, None)] + [(a, request) for a in actions if a.strip()]:
            texts.append(text)
            requests.append(after)
            owner.append(k)
    probs = clf.probabilities(scorer.model, scorer.tok, texts, requests,
                              progress="junk classifier" if cfg.progress else "")
    worst: list[tuple[float, str]] = [(0.0, "")] * len(kept)
    for k, p, text in zip(owner, probs, texts):
        worst[k] = max(worst[k], (p, text))
    overruled = report["junk"].setdefault("overruled_by_classifier", {"count": 0, "examples": []})
    out = []
    for ep, (p, text) in zip(kept, worst):
        rule = flagged.get(ep.episode_id)
        if p > cfg.junk_threshold:
            _count(report["junk"]["rules"]["classifier"], f"{_clip(text, 140)} (P(junk) {p:.2f})")
        elif rule and p >= cfg.junk_rule_confirm:
            _count(report["junk"]["rules"][rule[0]], f"{_clip(rule[1], 140)} (P(junk) {p:.2f})")
        else:
            if rule:
                _count(overruled, f"{rule[0]}: {_clip(rule[1], 120)} (P(junk) {p:.2f})")
            out.append(ep)
    return out


def _drop_scored(kept: list[Episode], scored: list[tuple[float, str]], is_junk, rule: str, describe,
                 report: dict) -> list[Episode]:
    """The episodes whose (score, deciding text) is not junk; the others counted under ``rule``, the
    text and ``describe(score)`` as the example."""
    out = []
    for ep, (score, text) in zip(kept, scored):
        if is_junk(score):
            _count(report["junk"]["rules"][rule], f"{_clip(text, 140)} ({describe(score)})")
        else:
            out.append(ep)
    return out


_SCORERS: dict[str, PerplexityScorer] = {}


def _scorer(source: str) -> PerplexityScorer:
    if source not in _SCORERS:
        _SCORERS[source] = PerplexityScorer.load(source)
    return _SCORERS[source]


def _lessons(episodes: list[Episode], outcomes: dict[str, Outcome], cfg: ConsolidateConfig, report: dict) -> list[dict]:
    """One lesson per distinct text, with how many episodes support it (first episodes listed)."""
    writer = _ModelLessons(cfg.model) if cfg.lessons == "model" else None
    found: dict[str, dict] = {}
    report["lessons_written_by"] = {"template": 0, "model": 0, "feedback": 0}

    def add(text: str, source: str, written_by: str, episode_id: str):
        entry = found.setdefault(text, {"text": text, "source": source, "written_by": written_by, "support": 0,
                                        "episode_ids": []})
        entry["support"] += 1
        if len(entry["episode_ids"]) < 5:
            entry["episode_ids"].append(episode_id)
        report["lessons_written_by"][written_by] += 1

    for ep in episodes:
        o = outcomes[ep.episode_id]
        for i in o.failed if o.right is not None else []:
            failed = ep.steps[i]
            if not failed.observation:
                continue
            right = ep.steps[o.right].action
            text = writer(ep.context, failed.action, failed.observation, right) if writer else None
            if text is None:
                add(template_lesson(failed.action, failed.observation, right), "lesson", "template", ep.episode_id)
            else:
                add(text, "lesson", "model", ep.episode_id)
        for fb in ep.feedback:   # the user's own instructions ("next time, ask for the order number first")
            if _FEEDBACK_RULE.search(fb) and not junk_rule(fb):
                add(_clip(fb, 300), "feedback", "feedback", ep.episode_id)
    return sorted(found.values(), key=lambda x: (-x["support"], x["text"]))


def _heldout_row(tok, ep: Episode, o: Outcome, cfg: ConsolidateConfig) -> dict:
    first, right = ep.steps[0], ep.steps[o.right]
    return {
        "episode_id": ep.episode_id, "context": ep.context,
        "wrong_action": first.action if o.right != 0 else "",
        "observation": first.observation,
        "right_action": right.action, "right_observation": right.observation, "check": ep.check,
        "policy_segments": policy_segments(tok, ep, o.right, cfg.policy_weight),
        "world_segments": world_segments(tok, ep, first, cfg.world_weight) if first.observation else [],
    }


def _segments_type():
    import pyarrow as pa
    return pa.list_(pa.struct([("text", pa.string()), ("weight", pa.float64())]))


def _write_parquet(path: Path, rows: list[dict], columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema(list(columns.items()))
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    pq.write_table(table, path)


def _publish(user_dir: Path, version: int, rows: list[dict], held: list[dict], report: dict) -> Path:
    """Write the set in a hidden folder, fsync it, mark it complete, rename it to v<N>."""
    import pyarrow as pa
    seg = _segments_type()
    tmp = user_dir / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_parquet(tmp / "train.parquet", rows, {"segments": seg, "target": pa.string(), "episode_id": pa.string(),
                                                 "source": pa.string()})
    _write_parquet(tmp / "heldout.parquet", held, {
        "episode_id": pa.string(), "context": pa.string(), "wrong_action": pa.string(), "observation": pa.string(),
        "right_action": pa.string(), "right_observation": pa.string(), "check": pa.string(),
        "policy_segments": seg, "world_segments": seg})
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (tmp / "report.txt").write_text(summary(report))
    (tmp / ".complete").write_text(f"v{version}\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = user_dir / f"v{version}"
    os.rename(tmp, final)
    _fsync(user_dir)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _user_lock:
    """One consolidation per user at a time (an advisory lock file in the user's sets folder)."""

    def __init__(self, user_dir: Path):
        self.path = user_dir / ".lock"

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            import fcntl
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:   # no fcntl (Windows): one consolidating process per user is then up to the caller
            pass
        return self

    def __exit__(self, *exc):
        self.f.close()   # closing releases the lock


def _bar(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)


def summary(report: dict) -> str:
    """The report as a few readable lines (report.txt and the CLI's output)."""
    r = report
    lines = [f"consolidated {r['user']}@v{r['version']}  (seed {r['seed']}, model {r['model']}, "
             f"since {r['since'] if r['since'] is not None else 'the beginning'})",
             f"  read        {r['events']} events in {r['episodes']} episodes",
             f"  incomplete  {r['incomplete']['count']} (no request or no action)",
             f"  junk        {r['junk']['dropped']} episodes dropped"]
    for rule, slot in r["junk"]["rules"].items():
        if slot["count"]:
            ex = "; ".join(repr(e) for e in slot["examples"])
            lines.append(f"    {rule:<16} {slot['count']:>5}  e.g. {ex}")
    if r["junk"].get("overruled_by_classifier", {}).get("count"):
        slot = r["junk"]["overruled_by_classifier"]
        lines.append(f"    kept: {slot['count']} flagged by a rule, read as fine by the classifier, e.g. "
                     + "; ".join(repr(e) for e in slot["examples"]))
    lines.append(f"  duplicates  {r['duplicates']['exact']} exact, {r['duplicates']['near']} near")
    o = r["outcomes"]
    lines.append(f"  outcomes    {o['succeeded']} succeeded, {o['failed']} failed, {o['unknown']} without an outcome")
    lines.append(f"  lessons     {len(r['lessons'])}")
    for lesson in r["lessons"][:10]:
        lines.append(f"    [{lesson['support']}x, {lesson['written_by']}] {lesson['text']}")
    e = r["examples"]
    lines.append(f"  examples    {e['policy']} policy (weight {r['config']['policy_weight']}), {e['world']} world "
                 f"(weight {r['config']['world_weight']}), {e['replay']} replay  = {r['train_rows']} rows")
    lines.append(f"  held out    {r['heldout']} episodes for the gate")
    lines.append(f"  took        {r['seconds']:.2f}s")
    return "\n".join(lines) + "\n"
