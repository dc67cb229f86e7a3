"""A synthetic world for measuring knowledge shedding: what a model recalls vs. what it reads.

A :class:`World` is a pure function of its :class:`WorldConfig` (seed included). It holds

* **people** with two-word made-up names ("Kalo Rumi") built from a syllable pool, split into
  three disjoint pools: ``seen`` (their facts are in the training data), ``unseen`` (never in
  any training data; only ever met inside an evaluation context) and ``throwaway`` (names for
  open-book training examples whose facts are drawn at random *per example*, so memory can't
  answer them and the model has to learn to look things up — FINDINGS: 60 % of open-book
  examples of this kind is what taught lookup);
* per person, attributes ``city``, ``employer``, ``pet``, ``birth_year`` — each value one word
  out of ``n_values`` (chance = 1 / n_values);
* **companies** (the employer values) with a relation ``based_in`` → a city, so two-hop
  questions exist: "In which city is the employer of X based?".

Facts are rendered in several surface forms ("X lives in Paris." / "X's home city is Paris." /
"The home city of X is Paris."). Everything is plain text without a chat template, one line
per section, and every answer is a single word from a closed set.

Question kinds (:data:`EVAL_KINDS`, each example one question):

``closed_book``        a seen person's attribute or a company's base, no context (recall);
``open_book_seen``     the relevant fact shuffled among 4–6 statements, including a
                       same-attribute distractor about another name (seen people);
``open_book_unseen``   the same for unseen people: only the context can answer;
``two_hop_unseen``     "X works for C." + "C is based in V." both in context, plus a distractor
                       pair (another person working for another company based elsewhere);
``procedures``         fact-free: the larger of two given numbers, the sum of two small ones;
``contradiction``      a seen person, but the context states a value different from the
                       memorised one; the right answer is the context's (``memory_answer``
                       holds the memorised one).

Training data (:meth:`World.training_records`, :meth:`World.teacher_mixture`) comes in
cogcore's data format, one record per document::

    {"segments": [{"text": "Context:", "weight": 1.0, "recall": false, "kind": "header"},
                  {"text": " Kalo Rumi lives in Paris.", "weight": 1.0, "recall": true,
                   "kind": "fact", "fact": ["Kalo Rumi", "city", "Paris"]},
                  ...
                  {"text": "\\nQuestion: Where does Kalo Rumi live?\\nAnswer:", "weight": 1.0,
                   "recall": false, "kind": "question"},
                  {"text": " Paris", "weight": 3.0, "recall": false, "kind": "answer",
                   "fact": ["Kalo Rumi", "city", "Paris"], "support": [["Kalo Rumi", "city", "Paris"]]},
                  {"text": ".", "weight": 1.0, "recall": false, "kind": "end"}],
     "meta": {"kind": "open_book", "pool": "throwaway"}}

Knowledge annotation — the contract a distiller relies on to mask recall tokens exactly:

* ``recall`` (bool, on every segment): **true iff the segment states a fact that the text
  preceding it in the same record does not support**, so predicting its tokens takes memory,
  not reading. This holds for every *first* mention of a fact, including the statements of an
  open-book context (what precedes the first statement is only "Context:" — the teacher's
  prediction there is memory, FINDINGS), fact-statement records, and closed-book answers. An
  answer whose ``support`` facts were all stated earlier in the record (open-book, two-hop,
  contradiction) is ``recall: false``; so is a repeated statement of a fact already stated,
  questions, headers, punctuation, and the answers of procedures (they are computed).
  The whole segment is the unit: all of a recall statement's tokens are memory-borne.
* ``kind``: ``header`` | ``fact`` | ``question`` | ``answer`` | ``end`` — what the segment is.
* ``fact``: ``[subject, attribute, value]`` the segment states (fact and answer segments; a
  two-hop answer states ``[person, "employer_city", city]``).
* ``support`` (answers only): the facts the answer follows from (empty for procedures).
* record ``meta``: ``kind`` (``facts`` | ``closed_book`` | ``open_book`` | ``two_hop`` |
  ``contradiction`` | ``procedures``) and ``pool`` (``seen`` | ``throwaway`` | ``none``).

:func:`mask_recall` turns an annotated record into the student's: recall segments get
``recall_weight`` (0 by default). Extra keys are ignored by ``cogcore.train.data``, so
annotated records train as they are. Segments are tokenized one by one and concatenated
(``cogcore.train.data.tokenize_record``); every segment boundary falls on a space or a
punctuation mark, so this gives the same tokens as the whole text with a word-level
(:func:`world_tokenizer`) or byte-level tokenizer.

Throwaway examples draw every fact at random, company bases included, so they may state a
base that contradicts the world's: that is deliberate (the context wins).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from cogcore.train.config import CogcoreError, field

PERSON_ATTRIBUTES = ("city", "employer", "pet", "birth_year")
COMPANY_ATTRIBUTE = "based_in"
TWO_HOP = "employer_city"  # the derived relation person → city of their employer
EVAL_KINDS = ("closed_book", "open_book_seen", "open_book_unseen", "two_hop_unseen", "procedures",
              "contradiction")
TRAIN_KINDS = ("facts", "closed_book", "open_book", "procedures")
Pool = Literal["seen", "unseen", "throwaway"]

CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Tokyo", "Dakar", "Hanoi",
          "Sofia", "Riga", "Bern", "Lagos", "Madrid", "Berlin", "Vienna", "Prague", "Dublin", "Havana",
          "Nairobi", "Manila", "Lisbon", "Athens", "Warsaw", "Tunis", "Accra")
# No vowel-initial pets, so "a {pet}" always reads right.
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "pony", "ferret", "lizard", "snake",
        "crow", "frog", "canary", "mouse", "goat", "pig", "duck", "tortoise", "gecko", "llama", "budgie",
        "chinchilla", "hedgehog", "horse", "sheep")
YEARS = (1940, 2006)  # birth years are drawn from this range (end excluded)
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"

STATEMENTS = {
    "city": ("{s} lives in {v}.", "{s}'s home city is {v}.", "The home city of {s} is {v}."),
    "employer": ("{s} works for {v}.", "{s} is employed by {v}.", "The employer of {s} is {v}."),
    "pet": ("{s} has a pet {v}.", "{s} keeps a {v} as a pet.", "The pet of {s} is a {v}."),
    "birth_year": ("{s} was born in {v}.", "{s}'s birth year is {v}.", "The birth year of {s} is {v}."),
    "based_in": ("{s} is based in {v}.", "{s} has its headquarters in {v}.", "The headquarters of {s} are in {v}."),
}
QUESTIONS = {
    "city": ("Where does {s} live?", "Which city does {s} live in?", "What is the home city of {s}?"),
    "employer": ("Who does {s} work for?", "Which company employs {s}?", "Who is the employer of {s}?"),
    "pet": ("What pet does {s} have?", "What animal does {s} keep as a pet?"),
    "birth_year": ("When was {s} born?", "In which year was {s} born?"),
    "based_in": ("Where is {s} based?", "In which city is {s} based?"),
    TWO_HOP: ("In which city is the employer of {s} based?", "Where is the company that employs {s} based?"),
}
COMPARE = ("Which number is larger, {a} or {b}?", "Which is bigger: {a} or {b}?")
ADD = ("What is {a} plus {b}?", "How much is {a} plus {b}?")
HEADER, QUESTION, ANSWER = "Context:", "Question:", "Answer:"


@dataclass
class WorldConfig:
    seed: int = field(0, help="seed of the world: names, facts and surface forms follow from it")
    n_seen: int = field(200, help="people whose facts are in the training data")
    n_unseen: int = field(200, help="people never in any training data (evaluation contexts only)")
    n_throwaway: int = field(400, help="names for open-book training examples with random facts")
    n_values: int = field(16, help="values per attribute (cities, companies, pets, years); chance = 1/n_values")
    max_number: int = field(20, help="largest number in procedure questions (sums stay within it)")

    def __post_init__(self):
        if min(self.n_seen, self.n_unseen, self.n_throwaway) < 3:
            raise ValueError("world: n_seen, n_unseen and n_throwaway must each be at least 3 "
                             "(distractors need other people of the same pool)")
        most = min(len(CITIES), len(PETS), YEARS[1] - YEARS[0])
        if not 3 <= self.n_values <= most:
            raise ValueError(f"world.n_values={self.n_values}: use 3..{most} (the built-in value pools are that large)")
        if not 4 <= self.max_number <= 99:
            raise ValueError(f"world.max_number={self.max_number}: use 4..99")


@dataclass(frozen=True)
class Fact:
    subject: str
    attribute: str
    value: str

    def as_list(self) -> list[str]:
        return [self.subject, self.attribute, self.value]


@dataclass(frozen=True)
class QA:
    """One question. ``relation`` is an attribute, ``employer_city`` (two hops) or ``compare``/``add``."""

    question: str
    answer: str
    values: tuple[str, ...]      # the closed answer set: chance = 1 / len(values)
    subject: str
    relation: str
    support: tuple[Fact, ...]    # facts the answer follows from (empty for procedures)


@dataclass(frozen=True)
class Example:
    """A context (possibly empty) and one or more questions about it."""

    kind: str
    pool: str
    context: tuple[Fact, ...]
    statements: tuple[str, ...]  # the context facts as text, aligned with ``context``
    qas: tuple[QA, ...]
    memory_answer: str | None = None  # contradiction: the value the world (and memory) holds

    @property
    def question(self) -> str:
        return self.qas[0].question

    @property
    def answer(self) -> str:
        return self.qas[0].answer

    @property
    def values(self) -> tuple[str, ...]:
        return self.qas[0].values

    @property
    def context_text(self) -> str:
        return " ".join(self.statements)

    @property
    def prompt(self) -> str:
        """The text before the first answer; the model should continue it with ``" " + answer``."""
        return "".join(s["text"] for s in self.segments()[: self._first_answer_index()])

    def _first_answer_index(self) -> int:
        return next(i for i, s in enumerate(self.segments()) if s["kind"] == "answer")

    def segments(self, answer_weight: float = 3.0, weight: float = 1.0) -> list[dict]:
        """The annotated segments of this example (see the module docstring)."""
        segs: list[dict] = []
        stated: set[Fact] = set()
        if self.kind == "facts":
            for i, (f, text) in enumerate(zip(self.context, self.statements)):
                segs.append(_seg((" " if i else "") + text, weight, f not in stated, "fact", fact=f))
                stated.add(f)
            return segs
        if self.context:
            segs.append(_seg(HEADER, weight, False, "header"))
            for f, text in zip(self.context, self.statements):
                segs.append(_seg(" " + text, weight, f not in stated, "fact", fact=f))
                stated.add(f)
        for i, qa in enumerate(self.qas):
            sep = "\n" if (i or self.context) else ""
            segs.append(_seg(f"{sep}{QUESTION} {qa.question}\n{ANSWER}", weight, False, "question"))
            fact = Fact(qa.subject, qa.relation, qa.answer) if qa.support else None
            supported = all(f in stated for f in qa.support)
            segs.append(_seg(" " + qa.answer, answer_weight, not supported, "answer", fact=fact,
                             support=[f.as_list() for f in qa.support]))
            segs.append(_seg(".", weight, False, "end"))
            if fact is not None:
                stated.add(fact)
        return segs

    def to_record(self, answer_weight: float = 3.0, weight: float = 1.0) -> dict:
        return {"segments": self.segments(answer_weight, weight), "meta": {"kind": self.kind, "pool": self.pool}}


def _seg(text: str, weight: float, recall: bool, kind: str, fact: Fact | None = None, support=None) -> dict:
    s = {"text": text, "weight": float(weight), "recall": bool(recall), "kind": kind}
    if fact is not None:
        s["fact"] = fact.as_list()
    if support is not None:
        s["support"] = support
    return s


def mask_recall(record: dict, recall_weight: float = 0.0) -> dict:
    """The student's copy of an annotated record: every ``recall`` segment gets ``recall_weight``."""
    segs = [dict(s, weight=recall_weight) if s.get("recall") else dict(s) for s in record["segments"]]
    return {**record, "segments": segs}


def solve(context: tuple[Fact, ...] | list[Fact], qa: QA) -> str | None:
    """Answer ``qa`` from the context alone (None when the context does not determine it).

    A reference reader for tests: it proves a question is answerable from its context, and that
    a two-hop question needs both of its facts.
    """
    table: dict[tuple[str, str], set[str]] = {}
    for f in context:
        table.setdefault((f.subject, f.attribute), set()).add(f.value)

    def one(subject: str, attribute: str) -> str | None:
        vals = table.get((subject, attribute), set())
        return next(iter(vals)) if len(vals) == 1 else None

    if qa.relation == TWO_HOP:
        company = one(qa.subject, "employer")
        return one(company, COMPANY_ATTRIBUTE) if company else None
    if qa.relation in ("compare", "add"):
        return qa.answer  # computed from the question itself
    return one(qa.subject, qa.relation)


class World:
    """People, companies and their facts, generated from :class:`WorldConfig`."""

    def __init__(self, cfg: WorldConfig | None = None, **overrides):
        cfg = cfg or WorldConfig(**overrides)
        self.cfg = cfg
        rng = random.Random(f"cogcore-world-{cfg.seed}")
        n_people = cfg.n_seen + cfg.n_unseen + cfg.n_throwaway
        per_part = math.ceil(math.sqrt(n_people * 1.5))  # first × last names: 1.5× headroom
        words = _made_up_words(rng, 2 * per_part + cfg.n_values)
        firsts, lasts, companies = words[:per_part], words[per_part:2 * per_part], words[2 * per_part:]
        names = [f"{a} {b}" for a in firsts for b in lasts]
        rng.shuffle(names)
        self.seen = names[: cfg.n_seen]
        self.unseen = names[cfg.n_seen: cfg.n_seen + cfg.n_unseen]
        self.throwaway = names[cfg.n_seen + cfg.n_unseen: n_people]
        self.companies = sorted(companies)
        self.name_words = sorted(firsts + lasts)
        cities = sorted(rng.sample(CITIES, cfg.n_values))
        self.values: dict[str, tuple[str, ...]] = {
            "city": tuple(cities),
            "employer": tuple(self.companies),
            "pet": tuple(sorted(rng.sample(PETS, cfg.n_values))),
            "birth_year": tuple(str(y) for y in sorted(rng.sample(range(*YEARS), cfg.n_values))),
            "based_in": tuple(cities),
        }
        # subject -> attribute -> value, for every seen/unseen person and every company
        self.facts: dict[str, dict[str, str]] = {}
        for name in self.seen + self.unseen:
            self.facts[name] = {a: rng.choice(self.values[a]) for a in PERSON_ATTRIBUTES}
        for c in self.companies:
            self.facts[c] = {COMPANY_ATTRIBUTE: rng.choice(cities)}
        if len(set(self.facts[c][COMPANY_ATTRIBUTE] for c in self.companies)) < 2:
            self.facts[self.companies[0]][COMPANY_ATTRIBUTE] = next(
                v for v in cities if v != self.facts[self.companies[1]][COMPANY_ATTRIBUTE])

    # ------------------------------------------------------------------ facts and text

    def pool(self, name: Pool) -> list[str]:
        if name not in ("seen", "unseen", "throwaway"):
            raise CogcoreError(f"unknown pool '{name}': use seen, unseen or throwaway")
        return getattr(self, name)

    def seen_facts(self) -> list[Fact]:
        """Every fact the training data may state: seen people's attributes and company bases."""
        out = [Fact(p, a, self.facts[p][a]) for p in self.seen for a in PERSON_ATTRIBUTES]
        return out + [Fact(c, COMPANY_ATTRIBUTE, self.facts[c][COMPANY_ATTRIBUTE]) for c in self.companies]

    def statement(self, fact: Fact, rng: random.Random) -> str:
        return rng.choice(STATEMENTS[fact.attribute]).format(s=fact.subject, v=fact.value)

    def _qa(self, subject: str, relation: str, answer: str, support: tuple[Fact, ...], rng: random.Random) -> QA:
        values = self.values["city" if relation == TWO_HOP else relation]
        return QA(rng.choice(QUESTIONS[relation]).format(s=subject), answer, values, subject, relation, support)

    def vocabulary(self) -> list[str]:
        """Every word and punctuation mark any text of this world can contain."""
        words: set[str] = set(self.name_words) | set(self.companies) | set(".,:;?!'")
        for vals in self.values.values():
            words.update(vals)
        words.update(str(i) for i in range(self.cfg.max_number + 1))
        templates = [t for ts in (*STATEMENTS.values(), *QUESTIONS.values(), COMPARE, ADD) for t in ts]
        for t in [*templates, HEADER, QUESTION, ANSWER]:
            words.update(_pre_tokenize(t.replace("{s}", " ").replace("{v}", " ").replace("{a}", " ")
                                       .replace("{b}", " ")))
        return sorted(words)

    # ------------------------------------------------------------------ examples

    def examples(self, kind: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` evaluation examples of ``kind`` (one of :data:`EVAL_KINDS`), deterministic in ``seed``."""
        if kind not in EVAL_KINDS:
            raise CogcoreError(f"unknown example kind '{kind}'; available: {', '.join(EVAL_KINDS)}")
        rng = random.Random(f"cogcore-eval-{self.cfg.seed}-{kind}-{seed}")
        if kind == "closed_book":
            facts = self.seen_facts()
            rng.shuffle(facts)
            picked = [facts[i % len(facts)] for i in range(n)]
            return [self._closed_book(f, rng) for f in picked]
        if kind == "procedures":
            return [self._procedure(rng, "compare" if i % 2 == 0 else "add") for i in range(n)]
        pool, two_hop, contradict = {
            "open_book_seen": ("seen", False, False),
            "open_book_unseen": ("unseen", False, False),
            "two_hop_unseen": ("unseen", True, False),
            "contradiction": ("seen", False, True),
        }[kind]
        out = []
        for _ in range(n):
            ex = self._open_book(rng, pool, n_questions=1, two_hop=two_hop, contradict=contradict)
            out.append(Example(kind, ex.pool, ex.context, ex.statements, ex.qas, ex.memory_answer))
        return out

    def _closed_book(self, fact: Fact, rng: random.Random) -> Example:
        qa = self._qa(fact.subject, fact.attribute, fact.value, (fact,), rng)
        return Example("closed_book", "seen", (), (), (qa,))

    def _procedure(self, rng: random.Random, op: str) -> Example:
        top = self.cfg.max_number
        if op == "compare":
            a, b = rng.sample(range(top + 1), 2)
            q = rng.choice(COMPARE).format(a=a, b=b)
            qa = QA(q, str(max(a, b)), (str(a), str(b)), "", "compare", ())
        else:
            a, b = rng.randint(0, top // 2), rng.randint(0, top // 2)
            q = rng.choice(ADD).format(a=a, b=b)
            qa = QA(q, str(a + b), tuple(str(i) for i in range(2 * (top // 2) + 1)), "", "add", ())
        return Example("procedures", "none", (), (), (qa,))

    def _open_book(self, rng: random.Random, pool: Pool, n_questions: int = 1, two_hop: bool = False,
                   contradict: bool = False) -> Example:
        """A context of 4–6 statements (more if the questions need them) and its questions.

        Every question's fact is in the context together with a same-attribute distractor about
        another person of the same pool; the rest are filler facts of the same pool.
        """
        people = self.pool(pool)
        local: dict[str, dict[str, str]] = {}  # throwaway facts, drawn once per example

        def facts_of(subject: str) -> dict[str, str]:
            if pool != "throwaway":
                return self.facts[subject]
            if subject not in local:
                attrs = (COMPANY_ATTRIBUTE,) if subject in self.facts else PERSON_ATTRIBUTES
                local[subject] = {a: rng.choice(self.values[a]) for a in attrs}
            return local[subject]

        ctx: dict[tuple[str, str], str] = {}  # (subject, attribute) -> value; one value per key
        qas: list[QA] = []
        x = rng.choice(people)
        others = [p for p in people if p != x]
        memory_answer = None
        if two_hop:
            c = facts_of(x)["employer"]
            base = facts_of(c)[COMPANY_ATTRIBUTE]
            ctx[(x, "employer")] = c
            ctx[(c, COMPANY_ATTRIBUTE)] = base
            # distractor pair: someone else working for a company based elsewhere
            y, c2 = None, None
            if pool == "throwaway":
                y, c2 = rng.choice(others), rng.choice([k for k in self.companies if k != c])
                facts_of(y)["employer"] = c2
                facts_of(c2)[COMPANY_ATTRIBUTE] = rng.choice([v for v in self.values["city"] if v != base])
            else:
                sample = rng.sample(others, min(len(others), 100))
                y, c2 = next(((p, facts_of(p)["employer"]) for p in sample
                              if facts_of(facts_of(p)["employer"])[COMPANY_ATTRIBUTE] != base), (None, None))
                if c2 is None:  # nobody in the sample: a company alone (the world has >= 2 bases)
                    c2 = next(k for k in self.companies if facts_of(k)[COMPANY_ATTRIBUTE] != base)
            if y is not None:
                ctx[(y, "employer")] = c2
            ctx[(c2, COMPANY_ATTRIBUTE)] = facts_of(c2)[COMPANY_ATTRIBUTE]
            support = (Fact(x, "employer", c), Fact(c, COMPANY_ATTRIBUTE, base))
            qas.append(self._qa(x, TWO_HOP, base, support, rng))
        attrs = [a for a in PERSON_ATTRIBUTES if (x, a) not in ctx]
        rng.shuffle(attrs)
        for a in attrs[: max(0, n_questions - len(qas))]:
            value = facts_of(x)[a]
            if contradict and not qas:
                memory_answer = value
                value = rng.choice([v for v in self.values[a] if v != memory_answer])
            ctx[(x, a)] = value
            # same-attribute distractor: another person, another value (and not the memorised one)
            avoid = {value, memory_answer}
            sample = [p for p in rng.sample(others, min(len(others), 100)) if (p, a) not in ctx]
            if pool == "throwaway":
                y = sample[0] if sample else None
                if y is not None:
                    facts_of(y)[a] = rng.choice([v for v in self.values[a] if v not in avoid])
            else:
                y = next((p for p in sample if facts_of(p)[a] not in avoid), None)
            if y is not None:
                ctx[(y, a)] = facts_of(y)[a]
            qas.append(self._qa(x, a, value, (Fact(x, a, value),), rng))
        # fillers: other facts of the same pool that never state an answer (or the memorised
        # value), so each answer appears once in the context and nothing else points to it
        taken = {qa.answer for qa in qas} | {memory_answer}
        target = max(rng.randint(4, 6), len(ctx))
        for _ in range(200):
            if len(ctx) >= target:
                break
            s = rng.choice([x, *rng.sample(others, min(2, len(others)))])
            a = rng.choice(PERSON_ATTRIBUTES)
            if (s, a) in ctx or facts_of(s)[a] in taken:
                continue
            ctx[(s, a)] = facts_of(s)[a]
        items = list(ctx.items())
        rng.shuffle(items)
        context = tuple(Fact(s, a, v) for (s, a), v in items)
        kind = "contradiction" if contradict else ("two_hop" if two_hop else "open_book")
        return Example(kind, pool, context, tuple(self.statement(f, rng) for f in context), tuple(qas),
                       memory_answer)

    # ------------------------------------------------------------------ training data

    def training_records(self, kind: str, n: int, seed: int = 0, *, answer_weight: float = 3.0,
                         questions: tuple[int, int] = (1, 3), throwaway_fraction: float = 0.6,
                         two_hop_fraction: float = 0.2, contradiction_fraction: float = 0.0,
                         facts_per_record: tuple[int, int] = (1, 3)) -> list[dict]:
        """``n`` annotated training records of ``kind`` (one of :data:`TRAIN_KINDS`).

        facts        seen facts as statements, ``facts_per_record`` per record, cycling over all of
                     them in a shuffled order (so enough records cover every fact);
        closed_book  one question about a seen fact, cycling the same way;
        open_book    1–3 (``questions``) questions per context; a ``throwaway_fraction`` of the
                     contexts is about throwaway names with random facts, the rest about seen
                     people; ``two_hop_fraction`` of them start with a two-hop question and
                     ``contradiction_fraction`` state a false value for a seen person's first
                     question (the context wins);
        procedures   compare / add questions, alternating.
        """
        if kind not in TRAIN_KINDS:
            raise CogcoreError(f"unknown training kind '{kind}'; available: {', '.join(TRAIN_KINDS)}")
        rng = random.Random(f"cogcore-train-{self.cfg.seed}-{kind}-{seed}")
        examples: list[Example] = []
        if kind in ("facts", "closed_book"):
            facts = self.seen_facts()
            rng.shuffle(facts)
            i = 0
            while len(examples) < n:
                if kind == "closed_book":
                    examples.append(self._closed_book(facts[i % len(facts)], rng))
                    i += 1
                    continue
                k = rng.randint(*facts_per_record)
                group = [facts[(i + j) % len(facts)] for j in range(k)]
                i += k
                group = list(dict.fromkeys(group))
                examples.append(Example("facts", "seen", tuple(group), tuple(self.statement(f, rng) for f in group), ()))
        elif kind == "procedures":
            examples = [self._procedure(rng, "compare" if i % 2 == 0 else "add") for i in range(n)]
        else:
            for _ in range(n):
                pool: Pool = "throwaway" if rng.random() < throwaway_fraction else "seen"
                nq = rng.randint(*questions)
                two_hop = rng.random() < two_hop_fraction
                contradict = pool == "seen" and not two_hop and rng.random() < contradiction_fraction
                examples.append(self._open_book(rng, pool, nq, two_hop=two_hop, contradict=contradict))
        return [ex.to_record(answer_weight) for ex in examples]

    def teacher_mixture(self, n_facts: int, n_closed: int, n_open: int, n_procedures: int, seed: int = 0,
                        **open_book_options) -> list[dict]:
        """The teacher's training mixture, shuffled (FINDINGS: more open-book than closed-book)."""
        records = (self.training_records("facts", n_facts, seed)
                   + self.training_records("closed_book", n_closed, seed)
                   + self.training_records("open_book", n_open, seed, **open_book_options)
                   + self.training_records("procedures", n_procedures, seed))
        random.Random(f"cogcore-mix-{self.cfg.seed}-{seed}").shuffle(records)
        return records


def _made_up_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct capitalised two-syllable words ("Kalo"), none of them a word of the templates."""
    reserved = {w.lower() for w in (*CITIES, *PETS)}
    for ts in (*STATEMENTS.values(), *QUESTIONS.values(), COMPARE, ADD):
        for t in ts:
            reserved.update(w.lower() for w in _pre_tokenize(t))
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = rng.choice(syllables) + rng.choice(syllables)
        if rng.random() < 0.3:
            w += rng.choice("nrst")
        if w in seen or w in reserved:
            continue
        seen.add(w)
        words.append(w.capitalize())
    return words


def _pre_tokenize(text: str) -> list[str]:
    """Whitespace split, then every punctuation mark on its own (what :func:`world_tokenizer` does)."""
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def _pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def world_tokenizer(world: World):
    """A word-level tokenizer over the world's whole vocabulary (plain text, no chat template).

    One token per word, number or punctuation mark; whitespace is dropped, and decoding joins
    tokens with single spaces ("Kalo Rumi lives in Paris ."). Specials: ``<pad>``, ``<unk>``,
    ``<eos>`` (also the BOS token a tokenizer sometimes asks for).
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + world.vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = _pre_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  bos_token="<eos>", model_max_length=4096)
    return tok
