"""Junk rules, near-duplicate detection and the perplexity score (a real tiny model, briefly trained)."""

import math

import pytest

from cogcore.memory.junk import RULES, Deduplicator, PerplexityScorer, judge_episode, junk_rule
from cogcore.memory.junk_examples import GOOD_TEXTS, RULE_DEV_JUNK

JUNK, GOOD = RULE_DEV_JUNK, GOOD_TEXTS


@pytest.mark.parametrize("rule", list(JUNK))
def test_each_rule_catches_its_kind_of_junk(rule):
    for text in JUNK[rule]:
        assert junk_rule(text) is not None, text
        assert RULES[rule](text), (rule, text)


@pytest.mark.parametrize("text", GOOD)
def test_good_text_passes_every_rule(text):
    assert junk_rule(text) is None, (text, junk_rule(text))


def test_rules_can_be_switched_off_and_the_episode_verdict_names_the_text():
    assert junk_rule("lol ok", rules=("templated",)) is None
    verdict = judge_episode(["I want a refund for order 4411, please.", "Like and subscribe for more!!! 🔥🔥"])
    assert verdict == ("engagement_bait", "Like and subscribe for more!!! 🔥🔥")
    assert judge_episode(GOOD[:3]) is None


def test_deduplicator_exact_near_and_distinct():
    d = Deduplicator(threshold=0.85, shingle_chars=5)
    base = ("I want a refund for order 4411, it arrived broken and the box was soaked. "
            "Could you tell me the last four digits of your card?")
    assert d.seen("a", base) is None
    assert d.seen("b", "  " + base.upper() + " ") == ("a", "exact")      # case and spacing do not matter
    assert d.seen("c", base.replace("soaked", "soaked through")) == ("a", "near")
    assert d.seen("d", "Please ship my order to the new address on Baker Street, I moved last week.") is None
    assert d.seen("e", base.replace("4411", "9921").replace("box", "parcel").replace("soaked", "crushed")) is None


def test_perplexity_score_separates_gibberish_after_a_little_training(one_thread, english_tiny):
    from cogcore.train.model import load_model, load_tokenizer
    texts = ["Could you tell me your order number, please?", "Your refund for the order is on its way.",
             "zxq vbnm qwpk jjjx", "Ωβ 😵‍💫 ⟁⟁ ∰ kq"]                 # unseen English, then gibberish
    untrained = PerplexityScorer(load_model("tiny-llama"), load_tokenizer("tiny-llama"))(texts)
    trained = PerplexityScorer.load(str(english_tiny))(texts)
    assert all(math.isfinite(p) and p > 1 for p in untrained + trained)
    assert max(trained[:2]) < min(trained[2:]) / 2, trained          # English became likely, gibberish did not
    assert max(trained[:2]) < min(untrained[:2]) / 2, (untrained, trained)
    # padding in a batch does not change a text's score
    scorer = PerplexityScorer.load(str(english_tiny))
    alone = [scorer([t])[0] for t in texts]
    assert all(abs(a - b) / b < 1e-3 for a, b in zip(alone, trained)), (alone, trained)
