"""The junk classifier: a logistic regression over a (tiny, random) core's last-token hidden states.

A random tiny model cannot know what junk is; what is tested here is the machinery: it fits what it
is given, scores a text the same alone or in a batch, survives a save/load, refuses a file made for
another base or a broken file, trains once per base in the workspace, and drops episodes in
consolidation. How well it finds junk under the embedded model is measured in bench/bench_memory.py.
"""

import random

import pytest
import torch

from cogcore.memory.junk_classifier import JunkClassifier, default_path, embed, load_or_train
from cogcore.memory.junk_examples import (
    GOOD_TEMPLATES,
    RULE_DEV_JUNK,
    fill,
    read_labelled,
    training_examples,
    vary_junk,
)
from cogcore.train.config import CogcoreError
from cogcore.train.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-llama").eval(), load_tokenizer("tiny-llama")


def small_set(seed: int = 0):
    rng = random.Random(seed)
    junk = [vary_junk(t, rng, slots=False) for t in RULE_DEV_JUNK["engagement_bait"] + RULE_DEV_JUNK["shouting"]
            for _ in range(3)]
    good = [fill(side, rng) for pair in GOOD_TEMPLATES[:8] for side in pair]
    return junk + good, [1] * len(junk) + [0] * len(good)


def test_it_fits_its_training_texts_and_scores_a_text_the_same_alone_or_in_a_batch(tiny, one_thread):
    model, tok = tiny
    texts, labels = small_set()
    clf = JunkClassifier.train(model, tok, texts, labels)
    p = clf.probabilities(model, tok, texts)
    junk_p = [x for x, y in zip(p, labels) if y]
    good_p = [x for x, y in zip(p, labels) if not y]
    assert min(junk_p) > 0.5 > max(good_p), (min(junk_p), max(good_p))
    assert clf.info["train_accuracy"] == 1.0 and clf.info["n_junk"] == sum(labels)
    alone = [clf.probabilities(model, tok, [t])[0] for t in texts[:4] + texts[-4:]]
    assert alone == pytest.approx(p[:4] + p[-4:], abs=1e-6)           # padding in a batch changes nothing
    assert clf.probabilities(model, tok, []) == []


def test_training_is_deterministic_and_needs_both_labels(tiny, one_thread):
    model, tok = tiny
    texts, labels = small_set()
    a = JunkClassifier.train(model, tok, texts, labels)
    b = JunkClassifier.train(model, tok, texts, labels)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(CogcoreError, match="both junk and good"):
        JunkClassifier.train(model, tok, texts[:3], [1, 1, 1])
    with pytest.raises(CogcoreError, match="one label"):
        JunkClassifier.train(model, tok, texts, labels[:-1])


def test_save_load_round_trip_and_refusals(tiny, tmp_path, one_thread):
    model, tok = tiny
    texts, labels = small_set()
    clf = JunkClassifier.train(model, tok, texts, labels)
    path = clf.save(tmp_path / "clf.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))                            # written atomically
    back = JunkClassifier.load(path, model)
    assert back.probabilities(model, tok, texts[:5]) == pytest.approx(clf.probabilities(model, tok, texts[:5]), abs=1e-12)
    assert back.threshold == clf.threshold and back.info == clf.info

    other = load_model("tiny-llama")
    other.base_hash = "f" * 64                                           # another base
    with pytest.raises(CogcoreError, match="trained on base"):
        JunkClassifier.load(path, other)
    with pytest.raises(CogcoreError, match="no junk classifier"):
        JunkClassifier.load(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: 200])
    with pytest.raises(CogcoreError, match="unreadable"):
        JunkClassifier.load(broken)


def test_features_ignore_padding_and_differ_between_texts(tiny, one_thread):
    model, tok = tiny
    X = embed(model, tok, ["lol ok", "Please cancel my blender order, it has not shipped yet."])
    assert X.shape == (2, 2 * model.config.hidden_size) and X.dtype == torch.float64
    assert torch.allclose(embed(model, tok, ["lol ok"])[0], X[0], atol=1e-5)
    assert not torch.allclose(X[0], X[1])


def test_an_action_is_read_after_its_request(tiny, one_thread):
    model, tok = tiny
    request = "What's 7 squared?"
    alone, after = embed(model, tok, ["49", "49"], [None, request])
    assert not torch.allclose(alone, after)                              # the request changes the reading
    again = embed(model, tok, ["lol ok", "49"], [None, request])[1]      # and a batch does not
    assert torch.allclose(again, after, atol=1e-5)
    texts, labels = small_set()
    requests = [request if i % 2 else None for i in range(len(texts))]
    clf = JunkClassifier.train(model, tok, texts, labels, requests)
    p = clf.probabilities(model, tok, texts, requests)
    assert min(x for x, y in zip(p, labels) if y) > 0.5 > max(x for x, y in zip(p, labels) if not y)
    with pytest.raises(CogcoreError, match="one request"):
        JunkClassifier.train(model, tok, texts, labels, requests[:-1])


def test_training_examples_and_user_labels(tmp_path):
    ex = training_examples(0)
    assert ex == training_examples(0)                                    # deterministic
    labels = [y for _, _, y in ex]
    assert 0.3 < sum(labels) / len(labels) < 0.7
    assert any(r is None for r, _, y in ex if y) and any(r is not None for r, _, y in ex if y)   # junk both ways
    assert all(t.strip() for _, t, _ in ex)
    f = tmp_path / "labels.jsonl"
    f.write_text('{"text": "gm fam", "junk": true}\n\n{"text": "49", "junk": false, "request": "7 squared?"}\n')
    assert read_labelled(f) == [(None, "gm fam", 1), ("7 squared?", "49", 0)]
    f.write_text('{"text": "gm fam", "junk": "yes"}\n')
    with pytest.raises(CogcoreError, match="labels.jsonl:1: expected"):
        read_labelled(f)
    f.write_text("{oops\n")
    with pytest.raises(CogcoreError, match="labels.jsonl:1: not JSON"):
        read_labelled(f)


def test_the_workspace_keeps_one_classifier_per_base(tiny, tmp_path, one_thread):
    model, tok = tiny
    first = load_or_train(model, tok, root=tmp_path)
    path = default_path(model.base_hash, tmp_path)
    assert path.is_file() and first.info["n_junk"] == sum(y for _, _, y in training_examples(0))
    stamp = path.stat().st_mtime_ns
    again = load_or_train(model, tok, root=tmp_path)                     # loaded, not trained again
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.weight, first.weight)


def test_the_benchmark_part_runs_on_a_tiny_model(one_thread):
    """bench/bench_memory.py's junk part end to end (sizes tiny): every set judged by the rules and
    by the classifier, the headline on the sets the classifier never trained on."""
    from cogcore.bench.bench_memory import bench_junk
    r = bench_junk(n_good=12, n_junk=12, model_score=False, model="tiny-llama", classifier=True, classifier_episodes=6)
    assert set(r["sets"]) >= {"good_docstrings", "good_heldout_v4", "junk_heldout_v5"}
    c = r["with_classifier"]
    assert c["texts_scored"] > 0 and c["trained_on"]["junk"] > 0
    for name in r["sets"]:
        key = "removed" if name.startswith("junk") else "kept"
        assert 0 <= c[name][key] <= 1 and c[name]["evaluated_on"] == 6
        assert c[name][key] >= max(c[name][f"heuristics_alone_{key}"], c[name][f"classifier_alone_{key}"]) \
            if key == "removed" else c[name][key] <= min(c[name][f"heuristics_alone_{key}"], c[name][f"classifier_alone_{key}"])
    assert 0 <= c["headline"]["heldout_junk_removed"] <= 1
