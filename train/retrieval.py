"""A document store and a BM25 retriever: facts go into the context instead of the weights.

Used by knowledge shedding (``distill.shedding``, ``shedding.retrieval=PATH``) to turn a real
corpus's questions into open-book examples, and meant for anything else that puts notes or
documents in front of the core (per-user notes, serving).

    store = DocumentStore.load("notes.jsonl")        # .jsonl/.json/.parquet ("text"), .txt, or a folder
    hits = BM25Index(store).search("capital of Norway", k=3)
    context = store.format_context(hits)              # "Context:\\n[1] ...\\n[2] ..."

Documents longer than ``passage_words`` words are split into passages (with a little overlap) so
that a hit is a paragraph, not a whole book. Scoring is Okapi BM25 over lower-cased word
tokens with a small stop-word list; everything lives in memory (fine up to a few hundred
thousand passages).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import CogcoreError

_WORD = re.compile(r"\w+", re.UNICODE)
# Words that match everything and rank nothing (a short list: BM25's idf does the rest).
STOP_WORDS = frozenset(
    "a an and are as at be by did do does for from had has have he her his how i in is it its of on or "
    "she that the their them they this to was were what when where which who whom whose why will with you".split()
)
STORE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def terms(text: str) -> list[str]:
    """Lower-cased word tokens without stop words (what is indexed and what is searched)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # file (and record) it came from, for reports
    doc: int  # index of the document it was cut from


@dataclass(frozen=True)
class Hit:
    passage: int
    score: float


class DocumentStore:
    """Passages cut from documents; :meth:`load` reads files, :meth:`from_texts` takes strings."""

    def __init__(self, passages: list[Passage]):
        if not passages:
            raise CogcoreError("the document store is empty: give it at least one non-empty document")
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i: int) -> Passage:
        return self.passages[i]

    @classmethod
    def from_texts(cls, texts: list[str], passage_words: int = 120, source: str = "texts") -> DocumentStore:
        passages = []
        for d, text in enumerate(texts):
            for piece in split_passages(text, passage_words):
                passages.append(Passage(piece, f"{source}[{d}]", d))
        return cls(passages)

    @classmethod
    def load(cls, path: str | Path, passage_words: int = 120) -> DocumentStore:
        """Documents from a file or a folder of files: .jsonl / .json / .parquet records with a
        ``text`` field (``title`` is prepended when present), or .txt (blank-line paragraphs)."""
        from .data import read_records

        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in STORE_SUFFIXES and p.is_file())
            if not files:
                raise CogcoreError(f"document store {path} is a folder without any {'/'.join(STORE_SUFFIXES)} file")
        elif path.is_file():
            files = [path]
        else:
            raise CogcoreError(f"document store {path} does not exist; give a {'/'.join(STORE_SUFFIXES)} file "
                               "or a folder of them (records with a 'text' field)")
        passages: list[Passage] = []
        n_docs = 0
        for f in files:
            for i, rec in enumerate(read_records(str(f))):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise CogcoreError(f"document store {f} record {i + 1}: needs a 'text' string "
                                       f"(it has: {', '.join(rec) if isinstance(rec, dict) else type(rec).__name__})")
                text = rec["text"]
                if isinstance(rec.get("title"), str) and rec["title"].strip():
                    text = f"{rec['title'].strip()}: {text}"
                for piece in split_passages(text, passage_words):
                    passages.append(Passage(piece, f"{f.name}:{i + 1}", n_docs))
                n_docs += 1
        return cls(passages)

    def format_context(self, hits: list[Hit], header: str = "Context:") -> str:
        """The passages of ``hits`` as one context block, best first."""
        lines = [f"[{n}] {self.passages[h.passage].text}" for n, h in enumerate(hits, 1)]
        return header + "\n" + "\n".join(lines)


def split_passages(text: str, passage_words: int = 120, overlap: int = 20) -> list[str]:
    """``text`` as passages of at most ``passage_words`` words, consecutive ones sharing ``overlap``."""
    if passage_words < 8:
        raise CogcoreError(f"passage_words={passage_words}: use at least 8 words per passage")
    words = text.split()
    if len(words) <= passage_words:
        return [" ".join(words)] if words else []
    step = max(1, passage_words - overlap)
    return [" ".join(words[i:i + passage_words]) for i in range(0, len(words) - overlap, step)]


class BM25Index:
    """Okapi BM25 over a :class:`DocumentStore` (k1 = term saturation, b = length normalisation)."""

    def __init__(self, store: DocumentStore, k1: float = 1.5, b: float = 0.75):
        self.store, self.k1, self.b = store, k1, b
        self.postings: dict[str, list[tuple[int, int]]] = {}
        self.lengths: list[int] = []
        for i, p in enumerate(store.passages):
            counts = Counter(terms(p.text))
            self.lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                self.postings.setdefault(term, []).append((i, tf))
        n = len(self.lengths)
        self.avg_length = max(1e-9, sum(self.lengths) / n)
        self.idf = {t: math.log(1.0 + (n - len(ps) + 0.5) / (len(ps) + 0.5)) for t, ps in self.postings.items()}

    def search(self, query: str, k: int = 3, exclude: set[int] | None = None) -> list[Hit]:
        """The ``k`` best passages for ``query`` (score > 0 only), best first; ties by position."""
        scores: dict[int, float] = {}
        for term in set(terms(query)):
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i, tf in self.postings[term]:
                norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_length)
                scores[i] = scores.get(i, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        ranked = sorted(((s, i) for i, s in scores.items() if not exclude or i not in exclude), key=lambda t: (-t[0], t[1]))
        return [Hit(i, s) for s, i in ranked[:k]]
