"""Junk rules, near-duplicate detection and the perplexity score (a real tiny model, briefly trained)."""

import math

import pytest

from cogcore.memory.junk import RULES, Deduplicator, PerplexityScorer, judge_episode, junk_rule

JUNK = {
    "too_short": ["lol ok", "+1", "👍", "ok", "k thx", "same"],
    "engagement_bait": ["Like and subscribe for more!", "Smash that like button and follow for more tips",
                        "You won't believe what happens next", "Link in bio, go check it out now",
                        "Tag a friend who needs to see this today", "This is amazing 🔥🔥🔥 everyone should try it"],
    "shouting": ["THIS IS THE BEST SERVICE EVER WOW", "Why is nobody answering me???", "Best day ever!!!!"],
    "repetitive": ["great great great", "yes yes yes I agree with that", "buy it buy it buy it buy it buy it",
                   "sooooo good honestly", "I love it I love it I love it so much", "I I don't know know",
                   "Buy cheap watches best price cheap watches discount watches cheap"],
    "templated": ["Click here to win a free iPhone today", "Congratulations, you have been selected as our winner",
                  "Dear {name}, your account needs attention", "As an AI language model, I cannot help with that",
                  "Earn $500 a day working from your couch", "Lorem ipsum dolor sit amet, consectetur",
                  "[Agent Name] will reply within [X] hours.", "Sent from my iPhone, please excuse typos",
                  "Hello dear, kindly send your details to claim the inheritance"],
    "low_information": ["ok sure thanks, that is fine", "yeah yeah cool cool whatever",
                        "#### $$$$ %%%% 1234 5678 !!", "asdfghjkl qwrtzp mnbvcxz", "I'm literally crying rn",
                        "hahahaha yes"],
}

GOOD = [
    "I want a refund for order 4411, it arrived broken.",
    "Could you tell me the last four digits of the card you paid with?",
    "Issue a refund for order 4411.",
    "Done! Your refund is on its way and should arrive in 3-5 business days.",
    "refund(order=4411, amount=29.99)",
    "lookup_order(4411)",
    "Please subscribe me to the weekly newsletter.",
    "Which plan are you on, and what is your account number?",
    "Your free trial ends on May 3; after that the plan costs $9 a month.",
    "The strengths of this approach are speed and simplicity.",
    "Order 1000000 shipped from warehouse B.",
    "See https://example.com/help/returns for the return policy.",
    "Yes, refunded.",
    "2 x 10 = 20.",                                   # numbers are information
    "10 x 32 = 320.",
    "See [the docs](https://example.com/docs) for the details.",
    "Use csv.reader on the open file and iterate row by row; each row is a list of strings.",
    "lol my order never arrived, can you check order 4411?",
]


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
