"""How much of a real QA set's answer signal does retrieval give back to knowledge shedding?

    python bench/retrieval_probes.py [--tokenizer smollm2-135m] [--distractors 2000] [--k 3]

The built-in real-world probes (capitals, elements, authors, ...) as closed-book SFT records
(``prompt`` = the question, ``completion`` = the answer) go through ``shed_documents`` with
the recall detector, once closed-book and once with open-book conversion by BM25 retrieval
(``shedding.retrieval``) over a document store holding every probe's supporting sentence
shuffled among up to ``--distractors`` unrelated passages (Python standard-library docstrings;
about 400 exist). The hardest distractors are the other probes' sentences (same templates).
Reported: retrieval recall@1 / @k (a retrieved passage states the answer), and the share of
answer tokens that keep their distillation weight (the rest are masked as recall). Writes
bench/results/retrieval_probes.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokenizer is used (a ModelSpec source)")
    parser.add_argument("--distractors", type=int, default=2000, help="at most this many unrelated passages in the store")
    parser.add_argument("--k", type=int, default=3, help="passages put in front of each question")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "retrieval_probes.json")
    args = parser.parse_args(argv)

    from cogcore.distill.shedding import ShedConfig, shed_documents
    from cogcore.eval.probes import load_probes, mentions
    from cogcore.train.data import _stdlib_docstrings
    from cogcore.train.model import load_tokenizer
    from cogcore.train.retrieval import BM25Index, DocumentStore

    tok = load_tokenizer(args.tokenizer)
    probes = load_probes()
    texts = [p.context for p in probes] + _stdlib_docstrings()[: args.distractors]
    random.Random(0).shuffle(texts)
    records = [{"prompt": f"Question: {p.question}\nAnswer:", "completion": f" {p.answer}."} for p in probes]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "store.jsonl"
        store_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        store = DocumentStore.load(store_path)
        index = BM25Index(store)
        build_s = time.perf_counter() - started
        hits = [index.search(p.question, args.k) for p in probes]
        at1 = sum(bool(h) and mentions(store[h[0].passage].text, p.answers, p.case_sensitive) for p, h in zip(probes, hits))
        atk = sum(any(mentions(store[x.passage].text, p.answers, p.case_sensitive) for x in h) for p, h in zip(probes, hits))
        closed = shed_documents(records, tok, ShedConfig(recall_masking="detector"))
        opened = shed_documents(records, tok, ShedConfig(open_book=True, retrieval=str(store_path),
                                                         retrieval_k=args.k, recall_masking="detector"))

    def kept(docs) -> float:
        """Share of answer tokens (the completion minus its final '.' and EOS) with weight > 0."""
        total = trained = 0
        for doc, p in zip(docs, probes):
            n = len(tok(f" {p.answer}", add_special_tokens=False).input_ids)
            ws = doc.weights[-n - 2:-2]
            total += len(ws)
            trained += sum(w > 0 for w in ws)
        return trained / total

    result = {
        "probes": len(probes), "store_passages": len(store), "distractors": args.distractors, "k": args.k,
        "tokenizer": args.tokenizer, "index_build_s": round(build_s, 2),
        "retrieval_recall_at_1": round(at1 / len(probes), 3), f"retrieval_recall_at_{args.k}": round(atk / len(probes), 3),
        "answer_tokens_kept_closed_book": round(kept(closed), 3),
        "answer_tokens_kept_with_retrieval": round(kept(opened), 3),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
