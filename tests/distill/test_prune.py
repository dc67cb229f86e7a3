"""Structured pruning on tiny random models: identity, function-preserving cuts on planted dead
structure (a layer, MLP channels, a KV group), ranking, the saved directory, config errors."""

import json

import pytest
import torch

from cogcore.distill.prune import PruneConfig, _real_tokens, calibration_batches, prune_model, prune_to_dir
from cogcore.train.config import CogcoreError, ConfigError, load_config
from cogcore.train.data import DataConfig, Document, make_batch, pack
from cogcore.train.model import base_hash, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DataConfig(source="builtin:chat-arithmetic", seq_len=64, builtin_size=16)


@pytest.fixture(scope="module")
def batches():
    # every tiny preset shares the byte-level tokenizer
    return calibration_batches(load_tokenizer("tiny-llama"), DATA, PruneConfig(calibration_documents=16))


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def teacher(name: str, tied: bool = True):
    """A tiny preset; Qwen2 gets non-zero q/k/v biases so that slicing them is actually tested."""
    model = load_model(name)
    if not tied:  # untie: a separate lm_head with its own values
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("name,tied", [("tiny-llama-wide", True), ("tiny-qwen2", True), ("tiny-llama-wide", False)])
def test_keeping_everything_is_the_teacher(batches, name, tied):
    model = teacher(name, tied)
    student, report = prune_model(model, batches, PruneConfig())
    assert student is not model and type(student) is type(model)
    assert report["dropped_layers"] == [] and report["params_before"] == report["params_after"]
    assert torch.equal(logits(student, batches[0]), logits(model, batches[0]))
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert student.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def plant_dead_structure(model, dead_layers: list[int], dead_group: int):
    """Make layers exact identities, half of each MLP's channels zero and one KV group silent.

    Returns the live MLP channels per layer. Cutting exactly this structure must leave the
    function unchanged, so the pruned student's logits must match the teacher's.
    """
    layers = model.model.layers
    inter = model.config.intermediate_size
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(2)
    live = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i in dead_layers:  # residual stream passes through untouched
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            dead = torch.randperm(inter, generator=g)[: inter // 2]
            layer.mlp.gate_proj.weight[dead] = 0  # act(0) * 0 = 0 on dead channels
            layer.mlp.up_proj.weight[dead] = 0
            live[i] = sorted(set(range(inter)) - set(dead.tolist()))
            v = layer.self_attn.v_proj
            v.weight[dead_group * hd:(dead_group + 1) * hd] = 0  # the group attends to zeros
            if v.bias is not None:
                v.bias[dead_group * hd:(dead_group + 1) * hd] = 0
    return live


@pytest.mark.parametrize("name,dead_layers,keep", [("tiny-llama-wide", [0, 2], 3), ("tiny-qwen2", [1], 1)])
def test_cutting_dead_structure_preserves_the_function(batches, name, dead_layers, keep):
    model = teacher(name)
    live = plant_dead_structure(model, dead_layers, dead_group=0)
    cfg = PruneConfig(layers=keep, mlp_ratio=0.5, kv_groups=1)
    student, report = prune_model(model, batches, cfg)

    # layer 0 is an identity too in the Llama case, but it is never dropped
    assert report["dropped_layers"] == [i for i in dead_layers if i != 0]
    for i in dead_layers:
        assert report["layer_importance"][i] < 1e-5
    assert all(report["layer_importance"][i] > 1e-3 for i in report["kept_layers"] if i not in dead_layers)
    assert report["kv_groups"]["kept"] == [[1]] * keep
    for j, i in enumerate(report["kept_layers"]):  # the live MLP channels survived, in order
        src, dst = model.model.layers[i].mlp, student.model.layers[j].mlp
        assert torch.equal(dst.up_proj.weight, src.up_proj.weight[live[i]])
        assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, live[i]])

    c = student.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.num_attention_heads) == (
        keep, model.config.intermediate_size // 2, 1, 2)
    assert report["params_after"] < report["params_before"]
    torch.testing.assert_close(logits(student, batches[0]), logits(model, batches[0]), rtol=1e-4, atol=1e-5)


def test_mlp_keeps_the_channels_with_the_largest_activations(batches):
    model = teacher("tiny-llama-wide")
    inter = model.config.intermediate_size
    loud = sorted(torch.randperm(inter, generator=torch.Generator().manual_seed(3))[: inter // 4].tolist())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[loud] *= 100.0
    student, report = prune_model(model, batches, PruneConfig(mlp_ratio=0.25))
    for j, i in enumerate(report["kept_layers"]):
        assert torch.equal(student.model.layers[j].mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight[loud])


def test_last_method_keeps_the_first_layers(batches):
    model = teacher("tiny-llama-wide")
    _, report = prune_model(model, batches, PruneConfig(layers=2, layer_method="last"))
    assert report["kept_layers"] == [0, 1] and report["dropped_layers"] == [2, 3]


def test_padding_is_not_a_calibration_token():
    docs = [Document([5] * n, [0.0] + [1.0] * (n - 1)) for n in (3, 4, 2, 6)]
    rows = pack(docs, seq_len=8, pad_id=0)
    batch = make_batch(rows, torch.arange(len(rows)))
    assert not (rows.doc_ids >= 0).all()  # the case has padding
    assert torch.equal(_real_tokens(batch), rows.doc_ids >= 0)
    assert _real_tokens({"input_ids": batch["input_ids"]}).all()


def test_prune_to_dir_saves_a_reloadable_student(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "student"
    cfg = PruneConfig(layers=2, mlp_ratio=0.5, kv_groups=1, calibration_documents=8)
    report = prune_to_dir("tiny-llama-wide", out, cfg, DATA)
    assert report["out_dir"] == str(out) and report["base_hash"] == base_hash(out)
    assert json.loads((out / "prune_report.json").read_text())["kept_layers"] == report["kept_layers"]
    assert (out / "prune_report.png").stat().st_size > 0
    assert len(report["kept_layers"]) == 2 and 0 in report["kept_layers"]
    assert report["mlp_channels"] == {"before": 256, "after": 128}
    assert report["kv_groups"]["before"] == 2 and report["kv_groups"]["after"] == 1
    assert report["params_after"] < report["params_before"]

    student = AutoModelForCausalLM.from_pretrained(out)
    assert type(student).__name__ == "LlamaForCausalLM"
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (2 * 32, 128)
    assert student.model.layers[1].mlp.down_proj.weight.shape == (128, 128)
    assert sum(p.numel() for p in student.parameters()) == report["params_after"]
    batch = calibration_batches(load_tokenizer(str(out)), DATA, cfg)[0]
    assert torch.isfinite(logits(student, batch)).all()


@pytest.mark.parametrize("override,message", [
    ("layers=-1", "prune.layers"), ("mlp_ratio=0", r"prune.mlp_ratio=0.0 must be in \(0, 1\]"),
    ("mlp_ratio=1.5", "prune.mlp_ratio"), ("kv_groups=-2", "prune.kv_groups"),
    ("calibration_documents=0", "prune.calibration_documents"), ("layer_method=first", "layer_method"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PruneConfig, overrides=[override])


def test_asking_for_more_than_the_teacher_has(batches):
    model = load_model("tiny-qwen2")
    with pytest.raises(CogcoreError, match="only 2 layers"):
        prune_model(model, batches, PruneConfig(layers=3))
    with pytest.raises(CogcoreError, match="only 2 KV heads"):
        prune_model(model, batches, PruneConfig(kv_groups=3))
    with pytest.raises(CogcoreError, match="calibration batch"):
        prune_model(model, [], PruneConfig())


def test_calibration_shows_a_bar_in_logs(batches, capsys):
    from cogcore.distill.prune import measure_importance
    from cogcore.train.model import load_model
    measure_importance(load_model("tiny-llama-wide"), batches[:2])
    err = capsys.readouterr().err
    assert "prune: calibrate" in err and "2/2" in err
