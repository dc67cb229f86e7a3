"""Real-world fact probes: does a model recall a fact, read it, and prefer its context?

``data/real_world_probes.json`` holds well-known facts (capitals, element symbols, authors,
planets, currencies, languages, science, history, geography), one object each::

    {"id": "capital-what-is-the-capital-of-australia", "category": "capital",
     "question": "What is the capital of Australia?", "answer": "Canberra", "aliases": [],
     "context": "Canberra is the capital of Australia.",     # states the answer exactly once
     "counterfact": "Sydney", "counterfact_aliases": [],       # false but plausible
     "case_sensitive": false}

The contradicting context is ``context`` with the answer replaced by the counterfact
(:attr:`Probe.counter_context`). Scoring (:func:`mentions`) is a whole-word match of the
answer or an alias — case-sensitive where ``case_sensitive`` (element symbols: "Au" is not
"AU", and "Au" inside "Australia" does not count), otherwise case- and accent-insensitive.
A reply that drifted into another language (:func:`language_drift`) counts as wrong even
when it contains the name ("La capitale de l'Australie est Canberra").
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cogcore.train.config import CogcoreError

PROBE_FIELDS = ("id", "category", "question", "answer", "aliases", "context", "counterfact",
                "counterfact_aliases", "case_sensitive")


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    context: str
    counterfact: str
    counterfact_aliases: tuple[str, ...]
    case_sensitive: bool

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)

    @property
    def counterfacts(self) -> tuple[str, ...]:
        return (self.counterfact, *self.counterfact_aliases)

    @property
    def counter_context(self) -> str:
        """The context with the answer replaced by the counterfact (a false fact to follow or not)."""
        return _word_pattern(self.answer, case_sensitive=True).sub(lambda _: self.counterfact, self.context)


def load_probes(path: str | Path | None = None) -> list[Probe]:
    """The built-in probes, or those of a JSON file with the same fields."""
    if path is None:
        text = resources.files("cogcore.eval").joinpath("data/real_world_probes.json").read_text(encoding="utf-8")
        where = "the built-in real_world_probes.json"
    else:
        path = Path(path)
        if not path.is_file():
            raise CogcoreError(f"probe file {path} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CogcoreError(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
    probes = []
    for i, p in enumerate(raw):
        missing = [f for f in PROBE_FIELDS if f not in p]
        if missing:
            raise CogcoreError(f"{where}: probe {i} ({p.get('id', '?')}) lacks {', '.join(missing)}")
        probes.append(Probe(p["id"], p["category"], p["question"], p["answer"], tuple(p["aliases"]), p["context"],
                            p["counterfact"], tuple(p["counterfact_aliases"]), bool(p["case_sensitive"])))
    return probes


def _fold(text: str) -> str:
    """Lowercase without accents ("García" → "garcia"); ł, đ… kept (aliases spell them out)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def _word_pattern(phrase: str, case_sensitive: bool) -> re.Pattern:
    # spaces inside a name match any run of whitespace; "J. K." also matches "J.K."
    parts = [re.escape(p) for p in phrase.split()]
    body = r""
    for i, p in enumerate(parts):
        if i:
            body += r"\s*" if parts[i - 1].endswith(r"\.") else r"\s+"
        body += p
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", 0 if case_sensitive else re.IGNORECASE)


def mentions(text: str, phrases: tuple[str, ...] | list[str], case_sensitive: bool = False) -> bool:
    """Whether ``text`` contains one of ``phrases`` as whole words."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'")
    for phrase in phrases:
        phrase = unicodedata.normalize("NFKC", phrase)
        if case_sensitive:
            if _word_pattern(phrase, True).search(text):
                return True
        elif _word_pattern(_fold(phrase), False).search(_fold(text)):
            return True
    return False


# Words that are common in French / German / Spanish / Italian / Portuguese replies and
# (nearly) never in English ones.
_FOREIGN_WORDS = frozenset("""
le la les est une des du et capitale ist der die das und eine hauptstadt von
el los las es una capital del y por
il è di che della sono
é da em uma
""".split()) - {"capital", "is"}
_ENGLISH_WORDS = frozenset("the is of and a an in it was are to for by on with".split())


def language_drift(text: str) -> bool:
    """Whether a reply is (mostly) not English: another script, or more foreign function words
    than English ones (at least two)."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return False
    non_latin = sum(1 for ch in letters if not unicodedata.name(ch, "").startswith("LATIN"))
    if non_latin / len(letters) > 0.3:
        return True
    words = re.findall(r"[^\W\d_]+", text.lower())
    foreign = sum(w in _FOREIGN_WORDS for w in words)
    english = sum(w in _ENGLISH_WORDS for w in words)
    return foreign >= 2 and foreign > english


def score_reply(probe: Probe, reply: str) -> dict[str, bool]:
    """``correct``: names the answer in English; ``follows_context`` / ``follows_memory``: for a
    reply to the counter context, names only the counterfact / only the true answer."""
    drift = language_drift(reply)
    says_answer = not drift and mentions(reply, probe.answers, probe.case_sensitive)
    says_counter = not drift and mentions(reply, probe.counterfacts, probe.case_sensitive)
    return {"correct": says_answer, "follows_context": says_counter and not says_answer,
            "follows_memory": says_answer and not says_counter, "drift": drift}
