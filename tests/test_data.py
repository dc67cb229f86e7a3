import json

import pytest
import torch

from cogcore.train.config import CogcoreError
from cogcore.train.data import (
    BatchPlan,
    DataConfig,
    Document,
    attention_mask,
    load_documents,
    make_batch,
    pack,
    read_records,
    tokenize_record,
)
from cogcore.train.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def test_prompt_completion_weights_only_completion(tok):
    doc = tokenize_record({"prompt": "Q? ", "completion": "A."}, tok)
    n_prompt = len(tok("Q? ", add_special_tokens=False).input_ids)
    assert doc.weights[:n_prompt] == [0.0] * n_prompt
    assert all(w == 1.0 for w in doc.weights[n_prompt:])
    assert doc.input_ids[-1] == tok.eos_token_id
    all_doc = tokenize_record({"prompt": "Q? ", "completion": "A."}, tok, train_on="all")
    assert all_doc.weights[0] == 0.0 and all(w == 1.0 for w in all_doc.weights[1:])


def test_chat_trains_on_assistant_turns_only(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    doc = tokenize_record(rec, tok)
    text = tok.decode([i for i, w in zip(doc.input_ids, doc.weights) if w > 0])
    assert "hello" in text and "hi" not in text.replace("hello", "")


def test_segments_carry_their_weights(tok):
    rec = {"segments": [{"text": "ctx ", "weight": 0}, {"text": "act", "weight": 1}, {"text": " obs", "weight": 0.5}]}
    doc = tokenize_record(rec, tok, add_eos=False)
    assert doc.weights == [0.0] * 4 + [1.0] * 3 + [0.5] * 4
    with pytest.raises(CogcoreError, match="segment weight"):
        tokenize_record({"segments": [{"text": "x", "weight": -1}]}, tok)


def test_malformed_inputs_are_explained(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CogcoreError, match="line 2 is not valid JSON"):
        read_records(str(bad))
    with pytest.raises(CogcoreError, match="none of the keys"):
        tokenize_record({"question": "x"}, tok)
    with pytest.raises(CogcoreError, match="unsupported data file type"):
        (tmp_path / "x.csv").write_text("a")
        read_records(str(tmp_path / "x.csv"))


def test_file_formats_and_split(tmp_path, tok):
    recs = [{"text": f"document number {i}"} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        train, held = load_documents(DataConfig(source=str(tmp_path / name), eval_documents=5), tok)
        assert len(train) == 25 and len(held) == 5
    with pytest.raises(CogcoreError, match="no training documents left"):
        load_documents(DataConfig(source=str(tmp_path / "d.jsonl"), eval_documents=30), tok)


def test_packing_targets_positions_and_waste():
    docs = [Document([1, 2, 3], [0, 1, 1]), Document([4, 5, 6, 7], [0, 1, 1, 1]), Document([8, 9], [0, 1])]
    rows = pack(docs, seq_len=8, pad_id=0)
    assert len(rows) == 2
    assert rows.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert rows.target_ids[0, :6].tolist() == [2, 3, 0, 5, 6, 7]
    # the last token of a document never predicts the next document's first token
    assert rows.target_weights[0].tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
    assert rows.padding_fraction == pytest.approx(1 - 9 / 16)
    unpacked = pack(docs, seq_len=8, pad_id=0, packing=False)
    assert len(unpacked) == 3 and unpacked.padding_fraction > rows.padding_fraction


def test_long_documents_are_split():
    rows = pack([Document(list(range(1, 21)), [0] + [1] * 19)], seq_len=8, pad_id=0)
    assert len(rows) == 3 and rows.position_ids[1, 0] == 0 and rows.target_weights[1, 0] == 1


def test_packed_forward_equals_separate_documents():
    model = load_model("tiny-llama").eval()
    torch.manual_seed(0)
    docs = [Document(torch.randint(0, 256, (n,)).tolist(), [0] + [1] * (n - 1)) for n in (5, 9, 3)]
    rows = pack(docs, seq_len=20, pad_id=0)
    assert len(rows) == 1
    b = make_batch(rows, torch.tensor([0]))
    # use_cache=False: transformers reads packing from position ids only without a cache
    packed = model(b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
    off = 0
    for d in docs:
        n = len(d.input_ids)
        alone = model(torch.tensor([d.input_ids])).logits[0]
        torch.testing.assert_close(packed[off:off + n], alone, atol=1e-5, rtol=1e-5)
        off += n
    assert not torch.isnan(packed).any()  # padding rows attend to themselves, no NaN


def test_attention_mask_blocks_across_documents():
    m = attention_mask(torch.tensor([[0, 0, 1, 1, -1, -1]]))[0, 0]
    assert m[1, 0] and not m[2, 1] and m[3, 2] and not m[0, 1] and m[4, 4] and not m[4, 3]
    assert m[5, 5] and not m[5, 4]  # padding sees only itself, not earlier padding


def test_batch_plan_is_a_function_of_step_and_splits_ranks():
    one = BatchPlan(n_rows=50, micro_batch=4, grad_accum=2, world_size=1, seed=3)
    two = BatchPlan(n_rows=50, micro_batch=4, grad_accum=1, world_size=2, seed=3)
    for step in (0, 5, 12):  # step 12 crosses into a later epoch
        a = torch.cat(one.micro_batches(step, 0))
        b = torch.cat([two.micro_batches(step, r)[0] for r in range(2)])
        assert sorted(a.tolist()) == sorted(b.tolist())
    epoch0 = torch.cat([torch.cat(one.micro_batches(s, 0)) for s in range(7)])[:50]
    assert sorted(epoch0.tolist()) == list(range(50))  # each row once per epoch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(attn, one_thread):
    """The same documents packed into few rows or one per row give the same loss, and each
    document's logits are those it gets alone (no future token, no other document leaks in)."""
    from cogcore.train.lm import CausalLMLoss, decoder_hidden
    model = load_model("tiny-llama").eval()
    model.set_attn_implementation(attn)
    torch.manual_seed(1)
    docs = [Document(torch.randint(0, 256, (n,)).tolist(), [0] + [1] * (n - 1)) for n in (7, 12, 3, 9, 20, 5)]
    packed, unpacked = pack(docs, 32, 0, packing=True), pack(docs, 32, 0, packing=False)
    assert len(packed) < len(unpacked) == len(docs)
    loss = CausalLMLoss(model)
    with torch.no_grad():
        a = loss(make_batch(packed, torch.arange(len(packed))))
        b = loss(make_batch(unpacked, torch.arange(len(unpacked))))
        torch.testing.assert_close(a["loss_sum"], b["loss_sum"], atol=1e-5, rtol=1e-5)
        assert a["weight"] == b["weight"]
        hp = decoder_hidden(model, make_batch(packed, torch.arange(len(packed))))
        for r in range(len(packed)):
            for d in packed.doc_ids[r].unique().tolist():
                if d < 0:
                    continue
                span = (packed.doc_ids[r] == d).nonzero()[:, 0]
                alone = decoder_hidden(model, {"input_ids": packed.input_ids[r:r + 1, span],
                                               "position_ids": packed.position_ids[r:r + 1, span]})
                torch.testing.assert_close(hp[r, span], alone[0], atol=1e-5, rtol=1e-5)
    assert "attention_mask" not in make_batch(packed, torch.arange(1))  # nothing O(T^2) per batch


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_on_cuda(attn):
    """The same on a GPU, flash attention included (varlen from the restarting position ids)."""
    import importlib.util
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from cogcore.train.lm import CausalLMLoss
    model = load_model("tiny-llama").to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(attn)
    torch.manual_seed(1)
    docs = [Document(torch.randint(0, 256, (n,)).tolist(), [0] + [1] * (n - 1)) for n in (7, 12, 3, 9, 20, 5)]
    packed, unpacked = pack(docs, 32, 0, packing=True), pack(docs, 32, 0, packing=False)
    loss = CausalLMLoss(model)
    with torch.no_grad():
        a, b = (loss({k: v.cuda() for k, v in make_batch(r, torch.arange(len(r))).items()}) for r in (packed, unpacked))
    torch.testing.assert_close(a["loss_sum"].float(), b["loss_sum"].float(), rtol=2e-2, atol=1e-2)


def test_chat_everyday_is_seeded_correct_and_apart_from_the_real_world_probes():
    import re

    from cogcore.eval.probes import load_probes
    from cogcore.train.data import builtin_records
    recs = builtin_records("chat-everyday", 3000, 7)
    assert recs == builtin_records("chat-everyday", 3000, 7) and recs != builtin_records("chat-everyday", 3000, 8)
    qa = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs]
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in recs)
    assert len({q for q, _ in qa}) > 500  # varied, not a handful of strings repeated
    checked = 0
    for q, a in qa:  # the computable answers are right
        if m := re.fullmatch(r'Spell "(\w+)" backwards\.', q):
            assert a == f'"{m[1]}" spelled backwards is "{m[1][::-1]}".'
            checked += 1
        elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q):
            assert a.startswith(f"{max(int(m[1]), int(m[2]))} is larger")
            checked += 1
        elif m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", q):
            assert a == f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
            checked += 1
    assert checked > 300
    probes = {p.question.lower() for p in load_probes()}
    assert not probes & {q.lower() for q, _ in qa}  # replay must not train on what the probes ask


def test_chat_general_mixes_sums_and_everyday_questions_and_leaves_the_gates_sums_as_they_were():
    import re

    from cogcore.train.data import builtin_records
    recs = builtin_records("chat-general", 2000, 3)
    assert recs == builtin_records("chat-general", 2000, 3)
    qs = [r["messages"][0]["content"] for r in recs]
    sums = [q for q in qs if re.fullmatch(r"What is \d+ [+-] \d+\?", q)]
    everyday = [q for q in qs if q not in sums]
    assert 0.4 < len(sums) / len(qs) < 0.6 and len({q[:12] for q in everyday}) >= 10
    for r in recs:  # every sum is answered right
        if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["messages"][0]["content"]):
            c = int(m[1]) + int(m[3]) if m[2] == "+" else int(m[1]) - int(m[3])
            assert r["messages"][1]["content"] == f"{m[1]} {m[2]} {m[3]} = {c}."
    # the sums alone are the same records as before the mix existed (the gate's general set is seeded)
    assert [r["messages"][0]["content"] for r in builtin_records("chat-arithmetic", 3, 1234)] == \
        ["What is 99 + 56?", "What is 0 + 11?", "What is 85 + 88?"]


def test_chat_broad_adds_general_knowledge_questions_none_of_them_a_probe():
    import re

    from cogcore.eval.probes import load_probes
    from cogcore.train.data import _KNOWLEDGE, builtin_records
    probes = {p.question.lower() for p in load_probes()}
    assert not probes & {q.lower() for q, _ in _KNOWLEDGE}  # the probes stay questions never trained on
    assert len({q for q, _ in _KNOWLEDGE}) == len(_KNOWLEDGE) >= 100
    knowledge = builtin_records("chat-knowledge", 500, 0)
    assert {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in knowledge} <= set(_KNOWLEDGE)
    recs = builtin_records("chat-broad", 3000, 0)
    assert recs == builtin_records("chat-broad", 3000, 0)
    qs = [r["messages"][0]["content"] for r in recs]
    known = {q for q, _ in _KNOWLEDGE}
    sums = sum(bool(re.fullmatch(r"What is \d+ [+-] \d+\?", q)) for q in qs)
    facts = sum(q in known for q in qs)
    assert 0.28 < sums / len(qs) < 0.39 and 0.28 < facts / len(qs) < 0.39   # a third each (everyday has sums too)
    assert not probes & {q.lower() for q in qs}
