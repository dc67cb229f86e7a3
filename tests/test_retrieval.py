"""BM25 retrieval over a document store: ranking, passages, file formats and bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogcore.train.config import CogcoreError
from cogcore.train.retrieval import BM25Index, DocumentStore, split_passages, terms

DOCS = [
    "Oslo is the capital of Norway. The city lies at the head of the Oslofjord.",
    "Lima is the capital of Peru and its largest city, on the Pacific coast.",
    "The element with symbol Fe is iron; it is the most common element on Earth by mass.",
    "Norway is a country in northern Europe. Its king lives in the capital.",
]


def test_bm25_ranks_the_passage_that_answers_first():
    index = BM25Index(DocumentStore.from_texts(DOCS))
    hits = index.search("What is the capital of Peru?", k=2)
    assert hits[0].passage == 1 and hits[0].score > hits[1].score > 0
    # both Norway passages match "Norway"; the one that also says "capital" and "Oslo" wins
    assert [h.passage for h in index.search("Oslo capital Norway", k=2)] == [0, 3]
    assert index.search("symbol Fe", k=5)[0].passage == 2
    assert index.search("zebra quantum", k=3) == []  # nothing shares a word: no hit at all
    assert {h.passage for h in index.search("capital", k=4, exclude={0})} == {1, 3}


def test_idf_prefers_rare_words_and_stop_words_are_ignored():
    assert terms("What IS the capital of Peru?") == ["capital", "peru"]
    index = BM25Index(DocumentStore.from_texts(DOCS))
    assert index.idf["peru"] > index.idf["capital"]  # in 1 passage vs 3


def test_long_documents_are_cut_into_overlapping_passages():
    words = [f"w{i}" for i in range(250)]
    parts = split_passages(" ".join(words), passage_words=100, overlap=20)
    assert [len(p.split()) for p in parts] == [100, 100, 90]
    assert parts[1].split()[0] == "w80" and parts[-1].split()[-1] == "w249"
    store = DocumentStore.from_texts([" ".join(words), "short one"], passage_words=100)
    assert len(store) == 4 and store[3].doc == 1
    with pytest.raises(CogcoreError, match="passage_words"):
        split_passages("a b c", passage_words=2)


def test_store_loads_jsonl_parquet_txt_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"title": "Peru", "text": t}) + "\n" for t in DOCS[:2]))
    pq.write_table(pa.table({"text": DOCS[2:]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("First paragraph about owls.\n\nSecond paragraph about bats.\n")
    store = DocumentStore.load(tmp_path)
    assert len(store) == 6
    assert store[0].text.startswith("Peru: Oslo") and store[0].source == "a.jsonl:1"
    assert store[5].text == "Second paragraph about bats."
    hits = BM25Index(store).search("bats", k=1)
    assert store.format_context(hits) == "Context:\n[1] Second paragraph about bats."


def test_bad_stores_get_clear_errors(tmp_path):
    with pytest.raises(CogcoreError, match="does not exist"):
        DocumentStore.load(tmp_path / "missing.jsonl")
    with pytest.raises(CogcoreError, match="without any"):
        DocumentStore.load(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text key"}) + "\n")
    with pytest.raises(CogcoreError, match=r"record 2: needs a 'text' string \(it has: body\)"):
        DocumentStore.load(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CogcoreError, match="line 2 is not valid JSON"):
        DocumentStore.load(broken)
    with pytest.raises(CogcoreError, match="empty"):
        DocumentStore.from_texts(["   "])
