"""The real-world probe file and how replies are scored."""

import json

import pytest

from cogcore.eval.probes import PROBE_FIELDS, language_drift, load_probes, mentions, score_reply
from cogcore.train.config import CogcoreError


@pytest.fixture(scope="module")
def probes():
    return load_probes()


def test_probe_file_is_valid(probes):
    assert len(probes) >= 100
    assert len({p.id for p in probes}) == len(probes)
    assert len({p.question for p in probes}) == len(probes)
    assert len({p.category for p in probes}) >= 6
    for p in probes:
        assert p.question.endswith("?") and p.answer and p.context and p.counterfact, p.id
        # the context states the answer, the question does not give it away
        assert mentions(p.context, [p.answer], case_sensitive=True), p.id
        assert not mentions(p.question, p.answers, p.case_sensitive), p.id
        # the counterfact is really another answer
        assert not mentions(p.counterfact, p.answers, p.case_sensitive), p.id
        assert not mentions(p.answer, p.counterfacts, p.case_sensitive), p.id
        # the counter context states the counterfact and nothing of the answer
        cc = p.counter_context
        assert cc != p.context and mentions(cc, [p.counterfact], case_sensitive=True), p.id
        assert not mentions(cc, p.answers, p.case_sensitive), p.id
    assert all(p.case_sensitive for p in probes if p.category == "element_symbol")


def test_load_probes_reports_missing_fields(tmp_path):
    bad = tmp_path / "probes.json"
    bad.write_text(json.dumps([{"id": "x", "question": "Q?"}]))
    with pytest.raises(CogcoreError, match="lacks category"):
        load_probes(bad)
    assert set(PROBE_FIELDS) >= {"question", "answer", "aliases", "context", "counterfact"}


def test_whole_word_case_and_accent_rules():
    assert mentions("The chemical symbol for gold is Au.", ["Au"], case_sensitive=True)
    assert not mentions("The symbol is AU.", ["Au"], case_sensitive=True)
    assert not mentions("Gold is found in Australia.", ["Au"], case_sensitive=True)
    assert mentions("It was written by J.K. Rowling.", ["J. K. Rowling"])
    assert not mentions("It was written by J.K. Row", ["J. K. Rowling", "Rowling"])  # a cut name is wrong
    assert mentions("Gabriel Garcia Marquez wrote it.", ["Gabriel García Márquez"])
    assert mentions("the capital is canberra", ["Canberra"])
    assert not mentions("Canberras", ["Canberra"])


def test_language_drift_counts_as_wrong(probes):
    assert language_drift("La capitale de l'Australie est Canberra.")
    assert language_drift("Die Hauptstadt von Australien ist Canberra.")
    assert language_drift("Столица Австралии — Канберра.")
    assert not language_drift("The capital of Australia is Canberra.")
    australia = next(p for p in probes if p.answer == "Canberra")
    assert score_reply(australia, "The capital of Australia is Canberra.")["correct"]
    assert not score_reply(australia, "La capitale de l'Australie est Canberra.")["correct"]
    s = score_reply(australia, "Sydney is the capital of Australia.")
    assert s["follows_context"] and not s["follows_memory"] and not s["correct"]
    both = score_reply(australia, "Not Sydney but Canberra.")
    assert not both["follows_context"] and not both["follows_memory"]
