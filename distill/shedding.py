"""Knowledge shedding: distil the teacher's reading and reasoning, not its memorised facts.

Three levers, each switchable in :class:`ShedConfig` and applied where records become token
documents (:func:`shed_documents`, used by ``distill.recipe.load_rows``):

* **open-book conversion** (``open_book``): an example whose answer depends on facts gets those
  facts put in front of it as a context, shuffled among same-attribute distractors, so the
  answer becomes a lookup instead of a recall. The facts come from a :class:`KnowledgeBase`
  built from the records' own ``fact`` annotations (the synthetic world's records carry them;
  :meth:`KnowledgeBase.from_world` gives the whole world). Fact statements become an open-book
  question about what they state; closed-book questions get their fact as context.
  Records without ``fact`` annotations (real corpora: prompt/completion or chat messages) get
  their context from a document store instead (``retrieval=PATH``): the prompt / each user turn
  is the query of a BM25 search (:mod:`cogcore.train.retrieval`) and the ``retrieval_k`` best
  passages are put in front of it. Plain ``text`` records have no question and stay as they are.
* **recall-token masking** (``recall_masking``): target tokens that state a fact the preceding
  text does not support get ``recall_weight`` (0 = no distillation signal at all).
  ``annotated`` uses the records' exact ``recall`` flags (as :func:`cogcore.eval.world.mask_recall`,
  but multiplying the segment's weight);
  ``detector`` guesses on arbitrary text (:mod:`cogcore.eval.recall_detector`: names, long
  numbers, rare words absent from what precedes them), so it works on any corpus.
  The first mention of a fact inside a context is masked too: what precedes it does not
  support it, so the teacher's prediction there is memory (FINDINGS).
* **data selection** (``reasoning_weight`` / ``knowledge_weight``): every token weight of a
  reasoning-dense record (open-book, two-hop, contradiction, procedures) is multiplied by
  ``reasoning_weight``, of a knowledge-dense one (fact statements, closed-book questions) by
  ``knowledge_weight`` (0 drops it). Records without ``meta.kind`` are classed by the
  detector: knowledge-dense when more than ``knowledge_density`` of their trained tokens are
  recall tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from ..train.config import CogcoreError, field
from ..train.data import DataConfig, Document, read_records, record_segments, split_documents, tokenize_record

REASONING_KINDS = ("open_book", "two_hop", "contradiction", "procedures")
KNOWLEDGE_KINDS = ("facts", "closed_book")


@dataclass
class ShedConfig:
    open_book: bool = field(False, help="put the facts an answer depends on into its context (fact-annotated records)")
    context_size: int = field(5, help="open_book: statements per converted context (the facts + same-attribute "
                                      "distractors + fillers)")
    recall_masking: Literal["off", "annotated", "detector"] = field(
        "off", help="weight of tokens stating unsupported facts: annotated = the records' recall flags (synthetic "
                    "world), detector = the recall detector on arbitrary text")
    recall_weight: float = field(0.0, help="weight multiplier of recall tokens (0 = no distillation signal on them)")
    reasoning_weight: float = field(1.0, help="weight multiplier of reasoning-dense records (open-book, two-hop, "
                                              "procedures)")
    knowledge_weight: float = field(1.0, help="weight multiplier of knowledge-dense records (fact statements, "
                                              "closed-book questions); 0 drops them")
    knowledge_density: float = field(0.3, help="records without meta.kind: knowledge-dense when more than this share "
                                               "of their trained tokens are recall tokens (detector)")
    retrieval: str = field("", help="open_book for records without fact annotations: a document store (.jsonl/.json/"
                                    ".parquet records with 'text', .txt, or a folder) searched with BM25 per question")
    retrieval_k: int = field(3, help="retrieval: passages put in front of each question")
    seed: int = field(0, help="seed of the open-book conversion (distractors, order, question wording)")

    def __post_init__(self):
        if not 0 <= self.recall_weight <= 1:
            raise ValueError(f"shedding.recall_weight must be in [0, 1] (0 = masked, 1 = kept), got {self.recall_weight}")
        if self.reasoning_weight < 0 or self.knowledge_weight < 0:
            raise ValueError("shedding.reasoning_weight and shedding.knowledge_weight must be >= 0")
        if self.reasoning_weight == 0 and self.knowledge_weight == 0:
            raise ValueError("shedding.reasoning_weight=0 and knowledge_weight=0 drop every record; keep one above 0")
        if not 0 <= self.knowledge_density <= 1:
            raise ValueError(f"shedding.knowledge_density must be in [0, 1], got {self.knowledge_density}")
        if self.retrieval_k < 1:
            raise ValueError(f"shedding.retrieval_k={self.retrieval_k}: put at least 1 passage in front of a question")
        if self.retrieval and not self.open_book:
            raise ValueError("shedding.retrieval is set but shedding.open_book=false: retrieval is the open-book "
                             "conversion of records without fact annotations; set shedding.open_book=true")
        if self.context_size < 2:
            raise ValueError(f"shedding.context_size={self.context_size}: a context needs the fact and a distractor (>= 2)")

    @property
    def active(self) -> bool:
        return (self.open_book or self.recall_masking != "off" or self.reasoning_weight != 1.0
                or self.knowledge_weight != 1.0)


# ----------------------------------------------------------------------------- open book

@dataclass
class KnowledgeBase:
    """Facts as ``(subject, attribute) -> value`` and each attribute's value set."""

    facts: dict[tuple[str, str], str]
    values: dict[str, tuple[str, ...]]

    @classmethod
    def from_records(cls, records: list[dict]) -> KnowledgeBase:
        """Every fact the records' segments state (``fact`` annotations), the first value wins."""
        from ..eval.world import TWO_HOP
        facts: dict[tuple[str, str], str] = {}
        for rec in records:
            for s in rec.get("segments", []) if isinstance(rec, dict) else []:
                f = s.get("fact") if isinstance(s, dict) else None
                if f and len(f) == 3 and f[1] != TWO_HOP:
                    facts.setdefault((f[0], f[1]), f[2])
        values: dict[str, set[str]] = {}
        for (_, a), v in facts.items():
            values.setdefault(a, set()).add(v)
        return cls(facts, {a: tuple(sorted(v)) for a, v in values.items()})

    @classmethod
    def from_world(cls, world) -> KnowledgeBase:
        return cls({(f.subject, f.attribute): f.value for f in world.seen_facts()}, dict(world.values))

    def subjects(self, attribute: str) -> list[str]:
        return sorted(s for (s, a) in self.facts if a == attribute)


def _record_facts(rec: dict):
    """(facts stated, (question text, answer segment) pairs) of an annotated world record."""
    from ..eval.world import Fact
    stated, qas = [], []
    segs = rec.get("segments", [])
    for i, s in enumerate(segs):
        if s.get("kind") == "fact" and s.get("fact"):
            stated.append(Fact(*s["fact"]))
        if s.get("kind") == "answer" and i and segs[i - 1].get("kind") == "question":
            qas.append((segs[i - 1]["text"], s))
    return stated, qas


def open_book_record(rec: dict, kb: KnowledgeBase, rng: random.Random, context_size: int = 5) -> dict:
    """The open-book version of a knowledge-dense world record (others come back unchanged).

    ``closed_book``: its supporting facts become the context, with a same-attribute distractor
    each and fillers up to ``context_size`` statements; the question and answer stay.
    ``facts``: the statements become the context (plus distractors) of one question per fact.
    The result is a world record with exact ``recall`` annotations (:class:`~cogcore.eval.world.Example`).
    """
    from ..eval.world import ANSWER, QA, QUESTION, QUESTIONS, STATEMENTS, Example, Fact
    kind = rec.get("meta", {}).get("kind")
    if kind not in KNOWLEDGE_KINDS:
        return rec
    stated, qa_segs = _record_facts(rec)
    answer_w = next((s["weight"] for _, s in qa_segs), 3.0)
    weight = next((s["weight"] for s in rec["segments"] if s.get("kind") in ("fact", "question", "header")), 1.0)
    qas: list[QA] = []
    needed: list[Fact] = []
    if kind == "closed_book":
        for qtext, s in qa_segs:
            support = tuple(Fact(*f) for f in s.get("support", []))
            if not support or not s.get("fact"):
                return rec  # nothing to look up
            subject, relation, answer = s["fact"]
            question = qtext.strip().removeprefix(QUESTION).removesuffix(ANSWER).strip()
            qas.append(QA(question, answer, kb.values.get(support[-1].attribute, (answer,)), subject, relation,
                          support))
            needed.extend(support)
    else:
        for f in stated:
            if f.attribute not in QUESTIONS:
                continue
            question = rng.choice(QUESTIONS[f.attribute]).format(s=f.subject)
            qas.append(QA(question, f.value, kb.values.get(f.attribute, (f.value,)), f.subject, f.attribute, (f,)))
            needed.append(f)
        if not qas:
            return rec
    context = list(dict.fromkeys(needed))
    keys = {(f.subject, f.attribute) for f in context}
    answers = {qa.answer for qa in qas}
    # one same-attribute distractor per fact (another subject, another value), then fillers
    for f in list(context):
        others = [s for s in kb.subjects(f.attribute) if (s, f.attribute) not in keys
                  and kb.facts[(s, f.attribute)] not in answers]
        if others:
            s = rng.choice(others)
            context.append(Fact(s, f.attribute, kb.facts[(s, f.attribute)]))
            keys.add((s, f.attribute))
    pool = list(kb.facts.items())
    for _ in range(50):
        if len(context) >= context_size or not pool:
            break
        (s, a), v = rng.choice(pool)
        if (s, a) not in keys and v not in answers:
            context.append(Fact(s, a, v))
            keys.add((s, a))
    rng.shuffle(context)
    statements = tuple(rng.choice(STATEMENTS[f.attribute]).format(s=f.subject, v=f.value) for f in context)
    ex = Example("open_book", rec.get("meta", {}).get("pool", "seen"), tuple(context), statements, tuple(qas))
    out = ex.to_record(answer_weight=answer_w, weight=weight)
    out["meta"] = {**rec.get("meta", {}), "kind": "open_book", "converted_from": kind}
    return out


def retrieved_record(rec: dict, index, k: int) -> dict:
    """``rec`` (prompt/completion or messages) with the ``k`` best passages for its question in front.

    prompt/completion: the prompt is the query; messages: every user turn followed by an
    assistant turn is its own query. Records of other shapes, or whose query matches nothing,
    come back unchanged. ``meta.retrieved`` lists the passages' sources.
    """
    if not isinstance(rec, dict) or "segments" in rec:
        return rec

    def with_context(query: str) -> tuple[str, list[str]]:
        hits = index.search(query, k)
        if not hits:
            return query, []
        sources = [index.store[h.passage].source for h in hits]
        return index.store.format_context(hits) + "\n\n" + query, sources

    used: list[str] = []
    if "prompt" in rec and "completion" in rec:
        prompt, used = with_context(str(rec["prompt"]))
        out = {**rec, "prompt": prompt}
    elif isinstance(rec.get("messages"), list):
        msgs = [dict(m) if isinstance(m, dict) else m for m in rec["messages"]]
        for i, m in enumerate(msgs[:-1]):
            nxt = msgs[i + 1]
            if (isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
                    and isinstance(nxt, dict) and nxt.get("role") == "assistant"):
                m["content"], sources = with_context(m["content"])
                used += sources
        out = {**rec, "messages": msgs}
    else:
        return rec
    if used:
        meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
        out["meta"] = {**meta, "retrieved": used}
    return out


# ----------------------------------------------------------------------------- documents

def record_kind(rec: dict) -> str | None:
    """``meta.kind`` of a record, when it has one."""
    meta = rec.get("meta") if isinstance(rec, dict) else None
    return meta.get("kind") if isinstance(meta, dict) else None


def _detector_weights(rec: dict, doc: Document, tokenizer, train_on: str, recall_weight: float, where: str) -> list[float]:
    """Per-token multipliers of ``doc`` (tokenized from ``rec``): the detector, segment by segment,
    each segment checked against all the text before it."""
    from ..eval.recall_detector import text_recall_weights
    mult = [1.0] * len(doc.input_ids)
    bos = tokenizer.bos_token_id
    pos = 1 if (bos is not None and getattr(tokenizer, "add_bos_token", False)) else 0
    context = ""
    for text, _ in record_segments(rec, tokenizer, train_on, where):
        ids, w = text_recall_weights(text, tokenizer, context=context, recall_weight=recall_weight)
        if doc.input_ids[pos:pos + len(ids)] != ids:
            raise CogcoreError(f"{where}: the recall detector tokenized a segment differently from the data loader")
        mult[pos:pos + len(ids)] = w
        pos += len(ids)
        context += text
    return mult


def shed_documents(records: list[dict], tokenizer, cfg: ShedConfig, train_on: str = "completion",
                   kb: KnowledgeBase | None = None, where: str = "records") -> list[Document]:
    """Records → token documents with the shedding levers of ``cfg`` applied to their weights.

    Order: open-book conversion (fact-annotated records from ``kb``, which defaults to the facts
    the records themselves state; other records from ``cfg.retrieval``) → tokenization → recall
    masking → record weighting. Records whose weights all end up 0 are dropped.
    """
    if cfg.open_book:
        kb = kb or KnowledgeBase.from_records(records)
        rng = random.Random(f"cogcore-open-book-{cfg.seed}")
        records = [open_book_record(r, kb, rng, cfg.context_size) if isinstance(r, dict) else r for r in records]
        if cfg.retrieval:
            from ..train.retrieval import BM25Index, DocumentStore
            index = BM25Index(DocumentStore.load(cfg.retrieval))
            records = [retrieved_record(r, index, cfg.retrieval_k) for r in records]
    docs = []
    for i, rec in enumerate(records):
        here = f"{where} record {i}"
        kind = record_kind(rec)
        if cfg.recall_masking == "annotated":
            if not (isinstance(rec, dict) and "segments" in rec and all("recall" in s for s in rec["segments"])):
                raise CogcoreError(f"{here}: shedding.recall_masking=annotated needs segments with 'recall' flags "
                                   "(the synthetic world's records); use recall_masking=detector for other data")
            rec = {**rec, "segments": [dict(s, weight=float(s.get("weight", 1.0)) * cfg.recall_weight)
                                       if s.get("recall") else s for s in rec["segments"]]}
        doc = tokenize_record(rec, tokenizer, train_on, where=here)
        mult = None
        if cfg.recall_masking == "detector" or (kind is None and (cfg.reasoning_weight != 1 or cfg.knowledge_weight != 1)):
            mult = _detector_weights(rec, doc, tokenizer, train_on, 0.0, here)
        if kind is None and mult is not None and (cfg.reasoning_weight != 1 or cfg.knowledge_weight != 1):
            trained = [m for m, w in zip(mult, doc.weights) if w > 0]
            density = sum(m == 0.0 for m in trained) / max(1, len(trained))
            kind = "closed_book" if density > cfg.knowledge_density else "open_book"
        if cfg.recall_masking == "detector":
            r = cfg.recall_weight
            doc.weights = [w * (1.0 if m == 1.0 else r) for w, m in zip(doc.weights, mult)]
        scale = (cfg.knowledge_weight if kind in KNOWLEDGE_KINDS else
                 cfg.reasoning_weight if kind in REASONING_KINDS else 1.0)
        if scale != 1.0:
            doc.weights = [w * scale for w in doc.weights]
        if len(doc.input_ids) >= 2 and sum(doc.weights) > 0:
            docs.append(doc)
    return docs


def load_shed_documents(data: DataConfig, cfg: ShedConfig, tokenizer) -> tuple[list[Document], list[Document]]:
    """``train.data.load_documents`` with the shedding levers: read, shed, split (train, held-out)."""
    records = read_records(data.source, data.builtin_size, data.seed)
    docs = shed_documents(records, tokenizer, cfg, data.train_on, where=data.source)
    return split_documents(docs, data, after=" after knowledge shedding",
                           fix="raise shedding.knowledge_weight or add data")
