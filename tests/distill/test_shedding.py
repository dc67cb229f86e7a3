"""Knowledge shedding levers: open-book conversion, recall masking (annotated and detector), data selection."""

import json
import random

import pytest
import torch

from cogcore.distill.recipe import DistillConfig, load_rows
from cogcore.distill.shedding import KnowledgeBase, ShedConfig, open_book_record, shed_documents
from cogcore.eval.world import Fact, World, solve, world_tokenizer
from cogcore.train.config import CogcoreError, ConfigError, load_config
from cogcore.train.data import DataConfig, load_documents, pack, tokenize_record
from cogcore.train.model import tiny_tokenizer


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_seen=12, n_unseen=12, n_throwaway=24, n_values=6)


@pytest.fixture(scope="module")
def tok(world):
    return world_tokenizer(world)


def _text(rec):
    return "".join(s["text"] for s in rec["segments"])


def _weighted_words(doc, tok):
    """(token, weight) pairs of a document, for readable asserts."""
    return list(zip(tok.convert_ids_to_tokens(doc.input_ids), doc.weights))


def test_closed_book_becomes_open_book_with_the_fact_and_a_distractor(world):
    kb = KnowledgeBase.from_world(world)
    rng = random.Random(0)
    for rec in world.training_records("closed_book", 20):
        out = open_book_record(rec, kb, rng, context_size=5)
        assert out["meta"] == {"kind": "open_book", "pool": "seen", "converted_from": "closed_book"}
        answer = next(s for s in out["segments"] if s["kind"] == "answer")
        fact = Fact(*answer["fact"])
        context = [Fact(*s["fact"]) for s in out["segments"] if s["kind"] == "fact"]
        assert fact in context and len(context) == 5
        # a same-attribute distractor with another value, so the answer needs the name
        assert any(f.attribute == fact.attribute and f.subject != fact.subject and f.value != fact.value for f in context)
        # the question is the record's own, its answer now follows from the context
        question = next(s for s in rec["segments"] if s["kind"] == "question")["text"]
        assert question.strip() in _text(out)
        assert not answer["recall"] and answer["weight"] == 3.0
        assert all(s["recall"] for s in out["segments"] if s["kind"] == "fact")  # first mentions: memory
        from cogcore.eval.world import QA
        qa = QA("", fact.value, (), fact.subject, fact.attribute, (fact,))
        assert solve(context, qa) == fact.value


def test_fact_statements_become_questions_about_them(world):
    kb = KnowledgeBase.from_world(world)
    rec = world.training_records("facts", 5, facts_per_record=(3, 3))[0]
    out = open_book_record(rec, kb, random.Random(1))
    stated = [Fact(*s["fact"]) for s in rec["segments"]]
    answers = [Fact(*s["fact"]) for s in out["segments"] if s["kind"] == "answer"]
    assert answers == stated and out["meta"]["converted_from"] == "facts"
    assert all(not s["recall"] for s in out["segments"] if s["kind"] == "answer")


def test_reasoning_records_pass_through_unchanged(world):
    kb = KnowledgeBase.from_world(world)
    for kind in ("open_book", "procedures"):
        rec = world.training_records(kind, 1)[0]
        assert open_book_record(rec, kb, random.Random(0)) is rec


def test_knowledge_base_from_the_records_own_annotations(world):
    records = world.teacher_mixture(40, 40, 10, 5)
    kb = KnowledgeBase.from_records(records)
    truth = {(f.subject, f.attribute): f.value for f in world.seen_facts()}
    assert kb.facts and all(truth[k] == v for k, v in kb.facts.items() if k in truth)
    assert set(kb.values["city"]) <= set(world.values["city"])


def test_annotated_masking_zeroes_exactly_the_recall_segments(world, tok):
    mixture = world.teacher_mixture(10, 10, 10, 5)
    cfg = ShedConfig(recall_masking="annotated", recall_weight=0.0)
    docs = shed_documents(mixture, tok, cfg)
    plain = [tokenize_record(r, tok) for r in mixture]
    assert len(docs) < len(plain)  # fact-statement records are all recall: dropped
    kept = [r for r in mixture if r["meta"]["kind"] != "facts"]  # closed-book: the question stays, the answer goes
    assert len(docs) == len(kept)
    for rec, doc in zip(kept, docs):
        words = _weighted_words(doc, tok)
        assert len(doc.input_ids) == len(tokenize_record(rec, tok).input_ids)
        if rec["meta"]["kind"] == "closed_book":
            assert words[-3][1] == 0.0 and words[-2] == (".", 1.0)  # the answer, then "."
        if rec["meta"]["kind"] == "open_book":
            # every context statement is masked, the answers (weight 3) are kept
            ctx = _text(rec).split("Question:")[0]
            n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
            assert words[0][0] == "Context" and words[1] == (":", 1.0)
            assert all(w == 0 for _, w in words[2:n_ctx]) and any(w == 3.0 for _, w in words)
    half = shed_documents(mixture, tok, ShedConfig(recall_masking="annotated", recall_weight=0.5))
    weights = {w for d in half for w in d.weights}
    assert {0.5, 1.5, 3.0, 1.0} <= weights  # statements 1 -> 0.5, closed-book answers 3 -> 1.5


def test_annotated_masking_refuses_records_without_annotations(tok):
    with pytest.raises(CogcoreError, match="recall_masking=detector"):
        shed_documents([{"text": "Kalo Rumi lives in Paris."}], tok, ShedConfig(recall_masking="annotated"))


def test_detector_masks_unsupported_facts_in_plain_english_records():
    tok = tiny_tokenizer()
    records = [
        {"text": "Canberra is the capital of Australia. It was founded in 1913."},
        {"prompt": "Context: The Eiffel Tower is in Paris.\nQuestion: Where is the Eiffel Tower? ",
         "completion": "It is in Paris."},
        {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                      {"role": "assistant", "content": "2 plus 3 is 5, so the answer is 5."}]},
    ]
    cfg = ShedConfig(recall_masking="detector", recall_weight=0.0)
    docs = shed_documents(records, tok, cfg)
    plain = [tokenize_record(r, tok) for r in records]
    assert [d.input_ids for d in docs] == [p.input_ids for p in plain]  # only the weights change

    def masked_text(doc):
        return tok.decode([i for i, w in zip(doc.input_ids, doc.weights) if w == 0])

    text0 = records[0]["text"]
    masked = masked_text(docs[0])
    for fact in ("Canberra", "Australia", "1913"):
        assert fact in masked
    assert "capital" not in masked and "founded" not in masked
    assert sum(w == 0 for w in docs[0].weights) < len(docs[0].weights) / 2 and text0
    # the context supports "Paris": the completion keeps all its weight
    completion_w = docs[1].weights[-len(tok("It is in Paris.", add_special_tokens=False).input_ids) - 1:]
    assert all(w == 1.0 for w in completion_w)
    # small numbers are computation, not recall
    assert docs[2].weights == plain[2].weights


def test_detector_recall_weight_scales_instead_of_dropping():
    tok = tiny_tokenizer()
    rec = {"text": "Canberra is the capital of Australia."}
    doc = shed_documents([rec], tok, ShedConfig(recall_masking="detector", recall_weight=0.25))[0]
    assert 0.25 in doc.weights and 1.0 in doc.weights and 0.0 not in doc.weights[1:]


def test_data_selection_weighs_reasoning_over_knowledge(world, tok):
    mixture = world.teacher_mixture(10, 10, 10, 10)
    dropped = shed_documents(mixture, tok, ShedConfig(knowledge_weight=0.0))
    assert len(dropped) == sum(r["meta"]["kind"] not in ("facts", "closed_book") for r in mixture)
    scaled = shed_documents(mixture, tok, ShedConfig(reasoning_weight=2.0, knowledge_weight=0.5))
    plain = [tokenize_record(r, tok) for r in mixture]
    for rec, doc, ref in zip(mixture, scaled, plain):
        k = 0.5 if rec["meta"]["kind"] in ("facts", "closed_book") else 2.0
        assert doc.weights == [w * k for w in ref.weights]
    # records without meta.kind are classed by their share of recall tokens
    tk = tiny_tokenizer()
    records = [{"text": "Kalo Rumi Zeta Omsk Tarbo Quill."}, {"text": "Add the two numbers and then compare the sums."}]
    docs = shed_documents(records, tk, ShedConfig(knowledge_weight=0.0))
    assert len(docs) == 1 and tk.decode(docs[0].input_ids).startswith("Add")


def test_open_book_then_masking_keeps_answers_and_sheds_statements(world, tok):
    mixture = world.teacher_mixture(10, 10, 10, 5)
    cfg = ShedConfig(open_book=True, recall_masking="annotated")
    docs = shed_documents(mixture, tok, cfg, kb=KnowledgeBase.from_world(world))
    assert len(docs) == len(mixture)  # converted, not dropped
    for doc in docs:
        assert any(w > 0 for w in doc.weights)


def test_shed_config_validation():
    with pytest.raises(ValueError, match="recall_weight"):
        ShedConfig(recall_weight=2.0)
    with pytest.raises(ValueError, match="drop every record"):
        ShedConfig(reasoning_weight=0.0, knowledge_weight=0.0)
    with pytest.raises(ConfigError, match="shedding.recall_masking: got 'ner'"):
        load_config(DistillConfig, None, ["shedding.recall_masking=ner"])
    assert not ShedConfig().active and ShedConfig(open_book=True).active


def test_distill_load_rows_applies_shedding(world, tok, tmp_path):
    path = tmp_path / "mixture.jsonl"
    mixture = world.teacher_mixture(20, 20, 20, 10)
    path.write_text("".join(json.dumps(r) + "\n" for r in mixture))
    base = ["data.source=" + str(path), "data.seq_len=128", "data.train_on=all"]
    off = load_config(DistillConfig, None, base)
    rows_off, _ = load_rows(off, tok)
    docs_off, _ = load_documents(off.data, tok)
    assert torch.equal(rows_off.target_weights, pack(docs_off, 128, tok.pad_token_id).target_weights)
    on = load_config(DistillConfig, None, [*base, "shedding.open_book=true", "shedding.recall_masking=annotated"])
    rows_on, _ = load_rows(on, tok)
    # the converted contexts add tokens but every statement is masked: fewer trained tokens per row
    assert rows_on.trained_tokens / rows_on.input_ids.numel() < rows_off.trained_tokens / rows_off.input_ids.numel()
    assert isinstance(on.data, DataConfig)


def test_retrieval_puts_the_supporting_passage_in_front_and_the_detector_keeps_the_answer(tmp_path):
    """Real-corpus open-book conversion: BM25 over a document store, then detector masking."""
    tok = tiny_tokenizer()
    store = tmp_path / "notes.jsonl"
    store.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "Zorbania is a small island nation. Its capital is Quellport, founded in 1642.",
        "Quellport has a harbour and a lighthouse.",
        "The river Tamsk flows through Veldra.",
    ]))
    records = [{"prompt": "Question: What is the capital of Zorbania?\nAnswer:", "completion": " Quellport."},
               {"messages": [{"role": "user", "content": "Which river flows through Veldra?"},
                             {"role": "assistant", "content": "The Tamsk."}]},
               {"text": "Plain text has no question and stays as it is."}]
    closed = shed_documents(records, tok, ShedConfig(recall_masking="detector"))
    cfg = ShedConfig(open_book=True, retrieval=str(store), retrieval_k=1, recall_masking="detector")
    opened = shed_documents(records, tok, cfg)
    answer = len(tok(" Quellport.", add_special_tokens=False).input_ids)

    def trained(doc, n):
        return [w for w in doc.weights[-n - 1:-1]]

    assert 0.0 in trained(closed[0], answer)  # closed book: "Quellport" is recall, masked
    assert all(w == 1.0 for w in trained(opened[0], answer))  # the passage supports it: trained
    prompt0 = tok.decode(opened[0].input_ids)
    assert prompt0.startswith("Context:\n[1] Zorbania is a small island nation.") and "Veldra" not in prompt0
    assert "[1] The river Tamsk flows through Veldra." in tok.decode(opened[1].input_ids)
    assert opened[2].input_ids == closed[2].input_ids  # no question: unchanged


def test_retrieval_config_errors(tmp_path):
    with pytest.raises(ValueError, match="open_book=true"):
        ShedConfig(retrieval="notes.jsonl")
    with pytest.raises(CogcoreError, match="does not exist"):
        shed_documents([{"prompt": "Q?", "completion": "A."}], tiny_tokenizer(),
                       ShedConfig(open_book=True, retrieval=str(tmp_path / "missing.jsonl")))


def test_core_shedding_leaves_procedure_records_as_plain_kd_sees_them(world, tok):
    """Issue 15: the core's procedures deficit is not its shedding touching procedure tokens —
    every procedure record is kept (core_records), none is converted, and its token weights
    (numbers included) are exactly the ones plain KD trains on."""
    from cogcore.distill.cognitive_core import _core_shedding, core_records
    mixture = world.teacher_mixture(40, 40, 20, 12, seed=3)
    kept = core_records(mixture, 0.25, seed=3)
    procs = [r for r in mixture if r["meta"]["kind"] == "procedures"]
    assert [r for r in kept if r["meta"]["kind"] == "procedures"] == procs
    assert not any(s["recall"] for r in procs for s in r["segments"])
    core = shed_documents(procs, tok, _core_shedding(), train_on="all")
    plain = [tokenize_record(r, tok, "all") for r in procs]
    assert [d.input_ids for d in core] == [d.input_ids for d in plain]
    assert [d.weights for d in core] == [d.weights for d in plain]
    assert all(3.0 in d.weights for d in core)  # the computed answer keeps its weight
