"""Which target tokens state a fact that the preceding context does not support?

Knowledge shedding trains a student with little or no weight on tokens it could only predict
from memory. In the synthetic world the data says exactly which those are (the ``recall``
annotation of :mod:`cogcore.eval.world`); for arbitrary text this module guesses, with a
deterministic heuristic and no model:

A word of the target is a **recall word** when it is one of

* ``entity`` — a capitalised word that is not a function word ("The", "In", "I") and is either
  inside a sentence or, at a sentence start, not a common English word ("Canberra is…") or the
  first word of a multi-word name ("New York"); all-caps and mixed-case words ("NASA", "Au")
  count too, and so do function words joining two name words ("Bank *of* England");
* ``number`` — a number of three or more digits, or with a separator ("1969", "3.14", "1,000",
  "4/7", "20th" counts if it has three digits); one- and two-digit integers are treated as
  computation, not recall (so "2 + 3 = 5" is never masked), which misses facts like "8 planets";
* ``rare`` — a lowercase word of four or more letters in neither hand-written list of
  :mod:`cogcore.eval.english` ("photosynthesis");

**and** it does not occur earlier — in the context or earlier in the target — compared after a
crude stem ("Australia's" = "Australia", "lives" = "live"), numbers verbatim. The first mention
of a fact is therefore always a recall word, a repeated one never is.

Every token that overlaps a recall word gets ``recall_weight`` (0 by default), every other
token weight 1. Special tokens (chat markers) are never recall, and the chat role names after
them are ignored. Known limits: lowercase facts made of common words ("water", "gold", "dog")
are missed; capitalised words that are not facts ("Monday", "English") are masked; small
numbers are never masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

from .english import FUNCTION_WORDS, is_known, stem

_TOKEN = re.compile(r"\w+(?:['’\-.]\w+)*", re.UNICODE)
_SENTENCE_END = set(".!?:;\n\"“”")
_NAME_JOINERS = {"of", "de", "da", "del", "della", "der", "van", "von", "la", "le", "du", "and", "y", "bin"}
_ROLE_WORDS = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class RecallSpan:
    """Characters ``[start, end)`` of the text state an unsupported fact."""

    start: int
    end: int
    text: str
    reason: Literal["entity", "number", "rare"]


@dataclass
class _Word:
    start: int
    end: int
    text: str
    sentence_start: bool


def _words(text: str) -> list[_Word]:
    out = []
    for m in _TOKEN.finditer(text):
        w = m.group(0).rstrip(".")
        if not w or w == "_":
            continue
        j = m.start() - 1
        while j >= 0 and text[j] in " \t\r(['‘":
            j -= 1
        out.append(_Word(m.start(), m.start() + len(w), w, j < 0 or text[j] in _SENTENCE_END))
    return out


def _key(word: str) -> str:
    return word if any(ch.isdigit() for ch in word) else stem(word.replace("’", "'"))


def _is_capitalised(word: str) -> bool:
    return word[0].isupper() or (len(word) > 1 and any(ch.isupper() for ch in word[1:]))


def _kind(words: list[_Word], i: int) -> str | None:
    """What makes word ``i`` a candidate fact (None: it isn't one, wherever it appears)."""
    w = words[i].text
    low = w.lower()
    if any(ch.isdigit() for ch in w):
        digits = sum(ch.isdigit() for ch in w)
        has_separator = re.search(r"\d[.,:/\-]\d", w) is not None
        return "number" if digits >= 3 or has_separator else None
    if low in _ROLE_WORDS:
        return None
    if _is_capitalised(w):
        if low in FUNCTION_WORDS and not w.isupper():
            return None
        if low in FUNCTION_WORDS and len(w) == 1:  # "I", "A"
            return None
        if not words[i].sentence_start:
            return "entity"
        nxt = words[i + 1] if i + 1 < len(words) else None
        starts_name = (nxt is not None and not nxt.sentence_start and _is_capitalised(nxt.text)
                       and nxt.text.lower() not in FUNCTION_WORDS)
        return "entity" if (not is_known(w) or starts_name) else None
    if len(w) >= 4 and w.isalpha() and not is_known(w):
        return "rare"
    return None


def find_recall_spans(text: str, start: int = 0) -> list[RecallSpan]:
    """Recall words of ``text[start:]``; ``text[:start]`` is the context they are checked against."""
    words = _words(text)
    seen: set[str] = set()
    flagged: list[tuple[int, str]] = []  # (word index, reason)
    for i, w in enumerate(words):
        key = _key(w.text)
        if w.start >= start and key not in seen:
            kind = _kind(words, i)
            if kind is not None:
                flagged.append((i, kind))
        seen.add(key)
    # a function word joining two flagged name words belongs to the name ("Bank of England")
    by_index = dict(flagged)
    for i in range(1, len(words) - 1):
        if (words[i].text.lower() in _NAME_JOINERS and by_index.get(i - 1) == "entity"
                and by_index.get(i + 1) == "entity" and words[i].start >= start
                and text[words[i - 1].end:words[i].start] == " " and text[words[i].end:words[i + 1].start] == " "):
            by_index[i] = "entity"
    spans = [RecallSpan(words[i].start, words[i].end, words[i].text, kind) for i, kind in sorted(by_index.items())]
    return _merge(spans, text)


def _merge(spans: list[RecallSpan], text: str) -> list[RecallSpan]:
    """Adjacent entity words separated only by spaces form one span ("New York")."""
    out: list[RecallSpan] = []
    for s in spans:
        if (out and s.reason == "entity" and out[-1].reason == "entity"
                and text[out[-1].end:s.start].strip() == ""):
            out[-1] = RecallSpan(out[-1].start, s.end, text[out[-1].start:s.end], "entity")
        else:
            out.append(s)
    return out


def _weights_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[RecallSpan], recall_weight: float,
                          skip: set[int] = frozenset()) -> list[float]:
    weights = []
    for t, (a, b) in enumerate(offsets):
        hit = t not in skip and b > a and any(a < s.end and s.start < b for s in spans)
        weights.append(recall_weight if hit else 1.0)
    return weights


def text_recall_weights(target: str, tokenizer, *, context: str = "", recall_weight: float = 0.0
                        ) -> tuple[list[int], list[float]]:
    """Tokenize ``target`` on its own (as ``cogcore.train.data`` tokenizes a segment) and weigh
    each of its tokens: ``recall_weight`` where it states a fact ``context`` + earlier target
    does not support, 1 elsewhere. Returns ``(target_ids, weights)``."""
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    spans = find_recall_spans(context + target, start=len(context))
    offsets = [(a + len(context), b + len(context)) for a, b in enc["offset_mapping"]]
    special_ids = set(tokenizer.all_special_ids)
    special = {i for i, t in enumerate(enc["input_ids"]) if t in special_ids}
    return list(enc["input_ids"]), _weights_from_offsets(offsets, spans, recall_weight, special)


def recall_weights(input_ids: Sequence[int], tokenizer, *, start: int = 0, recall_weight: float = 0.0) -> list[float]:
    """Per-position weights for a token sequence: tokens from ``start`` on are targets, those
    before are context (weight 1). ``weights[i]`` is the weight of predicting ``input_ids[i]``,
    aligned like ``cogcore.train.data.Document.weights``."""
    ids = [int(i) for i in input_ids]
    text, offsets = token_char_spans(ids, tokenizer)
    special_ids = set(tokenizer.all_special_ids)
    special = {i for i, t in enumerate(ids) if t in special_ids}
    # blank the chat markers so "<|im_start|>" reads as a line break, not as words
    chars = list(text)
    for i in special:
        a, b = offsets[i]
        for k in range(a, b):
            chars[k] = "\n" if k == a else " "
    text = "".join(chars)
    char_start = offsets[start][0] if start < len(offsets) else len(text)
    spans = find_recall_spans(text, start=char_start)
    weights = _weights_from_offsets(offsets, spans, recall_weight, special)
    return [1.0] * start + weights[start:]


def token_char_spans(ids: list[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's ``(start, end)`` characters in it.

    Re-tokenizing the decoded text with offsets works for most tokenizers; when it does not
    give the same ids back, each token is located by decoding growing prefixes (slower).
    """
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass  # slow tokenizers have no offsets
    offsets, prev_end = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        end = len(prefix.rstrip("\ufffd"))  # an incomplete UTF-8 character belongs to the next token
        end = max(prev_end, min(end, len(text)))
        offsets.append((prev_end, end))
        prev_end = end
    return text, offsets
