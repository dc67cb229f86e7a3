"""The distill recipe on tiny models: cached, live and on-policy teachers, and bad input."""

import json

import pytest
import torch

from cogcore.distill import recipe
from cogcore.distill.recipe import DistillConfig
from cogcore.train.config import CogcoreError, ConfigError, load_config

BASE = ["teacher.source=tiny-llama-wide", "student.init=prune", "student.prune.layers=2",
        "student.prune.calibration_documents=8", "data.source=builtin:arithmetic", "data.seq_len=64",
        "data.builtin_size=120", "data.eval_documents=16", "train.micro_batch=8", "train.lr=3e-3",
        "train.warmup_steps=1", "train.progress=false", "train.tensorboard=false", "cache.k=16"]


def make(tmp_path, *extra):
    return load_config(DistillConfig, None, [*BASE, f"out={tmp_path / 'run'}", *extra])


def test_cached_teacher_distills_and_kl_falls(tmp_path, monkeypatch):
    cfg = make(tmp_path, "teacher_mode=cache", "train.max_steps=15", "loss.kind=forward_kl")
    recipe.run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["heldout_kl_end"] < 0.5 * summary["heldout_kl_start"]
    assert summary["student_params"] < summary["teacher_params"]
    assert summary["teacher_mode"] == "cache" and summary["tokens_seen"] > 0
    assert summary["heldout_kl_kind"] == "top-16 + tail bucket (lower bound of the exact KL)"
    # real token counts: 15 steps x 8 rows of 64 tokens, less padding; the loss weights apart
    assert summary["trained_tokens"] <= summary["tokens_seen"] <= 15 * 8 * 64
    assert summary["loss_weight_sum"] == pytest.approx(summary["trained_tokens"])  # weights are 0 or 1 here
    assert summary["base_hash"] != summary["student_init_hash"]  # the trained student is a new base
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert (tmp_path / "run" / "student-init" / "prune_report.json").is_file()

    # With the cache built, training never loads the teacher model.
    real = recipe.load_model

    def no_teacher(spec, *a, **kw):
        if getattr(spec, "source", spec) == "tiny-llama-wide":
            raise AssertionError("the teacher was loaded although its cache exists")
        return real(spec, *a, **kw)

    monkeypatch.setattr(recipe, "load_model", no_teacher)
    recipe.run(make(tmp_path / "again", "teacher_mode=cache", "train.max_steps=3", "cache.build_if_missing=false"))


def test_cache_with_all_ids_matches_the_live_teacher(tmp_path):
    """top-k with k = vocab is the full distribution: cached and live losses must agree."""
    from cogcore.distill.losses import DistillLoss, LossConfig
    from cogcore.distill.recipe import load_rows, teacher_caches
    from cogcore.distill.teacher import LiveTeacher
    from cogcore.train.data import make_batch
    from cogcore.train.distributed import DistInfo
    from cogcore.train.model import load_model, load_tokenizer
    cfg = make(tmp_path, "teacher_mode=cache", "cache.k=320")
    tok = load_tokenizer(cfg.teacher)
    rows, held = load_rows(cfg, tok)
    caches = teacher_caches(cfg, tok, rows, held, DistInfo(), build="if_missing")
    teacher = LiveTeacher(load_model(cfg.teacher))
    student = load_model("tiny-llama")
    loss = DistillLoss(student, LossConfig(kind="forward_kl", topk_tail="renorm"), teacher.weight)
    batch = make_batch(rows, torch.arange(4))
    live = loss(teacher.attach(batch))["loss_sum"]
    cached = loss(caches["train"].attach(batch))["loss_sum"]
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=2e-3)


def test_corrupt_and_stale_caches_are_caught(tmp_path):
    from cogcore.distill.recipe import load_rows, teacher_caches
    from cogcore.distill.teacher import TeacherCache
    from cogcore.train.distributed import DistInfo
    from cogcore.train.model import load_tokenizer
    cfg = make(tmp_path, "teacher_mode=cache", "cache.shard_rows=8", "data.seed=7")  # data no other test caches
    tok = load_tokenizer(cfg.teacher)
    rows, held = load_rows(cfg, tok)
    cache = teacher_caches(cfg, tok, rows, held, DistInfo(), build="verify")["train"]
    shard = cache.root / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = TeacherCache.open(cache.root.parent, cache.key, rows, cfg.cache.k)
    with pytest.raises(CogcoreError, match="corrupt.*rerun `cogcore distill cache`"):
        fresh.lookup(torch.tensor([8]))
    # rebuilding repairs only the bad shard
    rebuilt = teacher_caches(cfg, tok, rows, held, DistInfo(), build="verify")["train"]
    assert rebuilt.lookup(torch.tensor([8]))[0].shape == (1, cfg.data.seq_len, cfg.cache.k)
    # other data -> another key; a cache is never reused for different rows
    other = load_config(DistillConfig, None, [*BASE, "data.builtin_size=100", "data.seed=7", "teacher_mode=cache"])
    rows2, _ = load_rows(other, tok)
    with pytest.raises(CogcoreError, match="other data|no teacher cache"):
        TeacherCache.open(cache.root.parent, cache.key, rows2, cfg.cache.k)
    # an interrupted build is reported as incomplete
    index = json.loads((cache.root / "index.json").read_text())
    index["complete"] = False
    (cache.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(CogcoreError, match="incomplete"):
        TeacherCache.open(cache.root.parent, cache.key, rows, cfg.cache.k)


def test_live_and_on_policy_teachers_train(tmp_path):
    for mode, extra in [("live", []), ("on-policy", ["on_policy.lmbda=1.0", "on_policy.max_new_tokens=8"])]:
        cfg = make(tmp_path / mode, f"teacher_mode={mode}", "train.max_steps=3", "loss.kind=jsd", *extra)
        res = recipe.run(cfg)
        assert res.steps == 3 and all(torch.isfinite(torch.tensor(res.losses)))
        summary = json.loads((tmp_path / mode / "run" / "summary.json").read_text())
        assert summary["heldout_kl_kind"] == "exact"


def test_mismatched_tokenizer_is_explained_before_training(tmp_path):
    from cogcore.train.model import load_model, load_tokenizer, save_model
    tok = load_tokenizer("tiny-llama")
    tok.add_tokens(["<extra_token>"])
    save_model(load_model("tiny-llama"), tok, tmp_path / "odd-student")
    cfg = make(tmp_path, "teacher_mode=live", "student.init=model", f"student.source={tmp_path / 'odd-student'}")
    with pytest.raises(CogcoreError, match="tokenizers differ.*one vocabulary"):
        recipe.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_keys_that_do_nothing_are_rejected_or_wired(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every=2 needs held-out documents"):
        make(tmp_path, "data.eval_documents=0", "train.eval_every=2")
    with pytest.raises(ConfigError, match="student.source=x is only read with student.init=model"):
        make(tmp_path, "student.source=x")
    with pytest.raises(ConfigError, match="student.overrides is only read with student.init=config"):
        make(tmp_path, "student.overrides={num_hidden_layers: 1}")
    res = recipe.run(make(tmp_path, "teacher_mode=live", "train.max_steps=4", "train.eval_every=2"))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["heldout_loss"] == res.eval_loss and res.eval_loss > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="student.init=model needs student.source"):
        load_config(DistillConfig, None, ["student.init=model"])
    with pytest.raises(ConfigError, match="loss.beta must be in"):
        load_config(DistillConfig, None, ["loss.beta=2"])
    with pytest.raises(ConfigError, match=r"loss.alpha must be in \[0, 1\), got 1.0: skew KL"):
        load_config(DistillConfig, None, ["loss.kind=skew_kl", "loss.alpha=1"])
    with pytest.raises(ConfigError, match="train.lr: got 'nan', expected a finite number"):
        load_config(DistillConfig, None, ["train.lr=nan"])
    with pytest.raises(ConfigError, match="allowed values are 'live', 'cache', 'on-policy'"):
        load_config(DistillConfig, None, ["teacher_mode=offline"])


def test_empty_dataset_is_explained(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    cfg = make(tmp_path, f"data.source={tmp_path / 'empty.jsonl'}", "data.eval_documents=0")
    with pytest.raises(CogcoreError, match="holds no records"):
        recipe.run(cfg)


def test_distill_cli_cache_then_train(cli, tmp_path):
    args = ["distill", "--config", "configs/distill/tiny.yaml", f"out={tmp_path / 'cli'}", "train.max_steps=4",
            "train.progress=false", "data.builtin_size=120"]
    built = cli(args[0], "cache", *args[1:], check=True)
    assert "checking teacher cache" in built.stdout
    trained = cli(*args, check=True)
    assert "building teacher cache" not in trained.stdout and "held-out KL end" in trained.stdout


def test_distill_cli_with_retrieval_shedding(cli, tmp_path):
    """The README's real-corpus shedding command: QA records + a document store, detector masking."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"Island {i} has the harbour town Port{i * 7 % 13}."}) + "\n"
                             for i in range(40)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Which harbour town is on Island {i}?",
                                      "completion": f" Port{i * 7 % 13}."}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    proc = cli("distill", "--config", "configs/distill/tiny.yaml", f"out={out}", f"data.source={qa}",
               "data.eval_documents=8", "teacher_mode=live", "train.max_steps=2", "train.progress=false",
               "shedding.open_book=true", f"shedding.retrieval={notes}", "shedding.recall_masking=detector",
               check=True)
    assert (out / "model" / "config.json").is_file(), proc.stdout
    bad = cli("distill", "--config", "configs/distill/tiny.yaml", f"out={tmp_path / 'bad'}", f"data.source={qa}",
              "shedding.open_book=true", f"shedding.retrieval={tmp_path / 'nope.jsonl'}")
    assert bad.returncode == 2 and "does not exist" in bad.stderr + bad.stdout


def test_heldout_kl_label_says_what_the_number_is(tmp_path):
    assert recipe.heldout_kl_kind(make(tmp_path, "teacher_mode=live"), live=True) == "exact"
    assert "lower bound" in recipe.heldout_kl_kind(make(tmp_path, "loss.topk_tail=bucket"), live=False)
    renorm = recipe.heldout_kl_kind(make(tmp_path, "loss.topk_tail=renorm"), live=False)
    assert "lower bound" not in renorm and "not a bound" in renorm


def test_a_pruned_student_is_never_reused_for_another_prune_config(tmp_path):
    from cogcore.train.distributed import DistInfo
    run = tmp_path / "run"
    two = recipe.make_student(make(tmp_path), run, DistInfo())
    assert two.config.num_hidden_layers == 2
    three = recipe.make_student(make(tmp_path, "student.prune.layers=3"), run, DistInfo())
    assert three.config.num_hidden_layers == 3
    again = recipe.make_student(make(tmp_path, "student.prune.layers=3"), run, DistInfo())
    assert again.base_hash == three.base_hash  # same settings: reused, not pruned again
    recipe.make_student(make(tmp_path, "student.prune.layers=3", "data.seed=5"), run, DistInfo())
    report = json.loads((run / "student-init" / "prune_report.json").read_text())
    assert report["data"]["seed"] == 5  # measured again on the other calibration documents


def test_teacher_cache_is_keyed_by_the_teacher_dtype_and_quantization(tmp_path):
    from cogcore.distill.recipe import load_rows, teacher_caches
    from cogcore.distill.teacher import cache_key, teacher_load_key
    from cogcore.train.distributed import DistInfo
    from cogcore.train.model import ModelSpec, load_tokenizer
    cfg32 = make(tmp_path, "data.builtin_size=40", "data.eval_documents=0", "cache.k=8")
    cfg16 = make(tmp_path, "data.builtin_size=40", "data.eval_documents=0", "cache.k=8", "teacher.dtype=bfloat16")
    tok = load_tokenizer(cfg32.teacher)
    rows, _ = load_rows(cfg32, tok)
    c32 = teacher_caches(cfg32, tok, rows, None, DistInfo())["train"]
    c16 = teacher_caches(cfg16, tok, rows, None, DistInfo())["train"]
    assert c32.root != c16.root
    assert not torch.equal(c32.lookup(torch.arange(4))[1], c16.lookup(torch.arange(4))[1])
    nf4 = teacher_load_key(ModelSpec(source="tiny-llama-wide", quantize="nf4"))
    assert cache_key("h", "t", rows, 8, nf4) != cache_key("h", "t", rows, 8, teacher_load_key(cfg32.teacher))


def test_a_changed_config_is_refused_before_pruning(tmp_path, monkeypatch):
    recipe.run(make(tmp_path, "teacher_mode=live", "train.max_steps=2", "train.save_every=1"))

    def no_prune(*a, **kw):
        raise AssertionError("pruned before the resume check")

    monkeypatch.setattr(recipe, "prune_to_dir", no_prune)
    with pytest.raises(CogcoreError, match=r"student.prune.layers 2 -> 3"):
        recipe.run(make(tmp_path, "teacher_mode=live", "train.max_steps=2", "student.prune.layers=3"))


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Pruning, building a teacher cache or loading the teacher fails the test: errors must come first."""
    from cogcore.distill import prune
    from cogcore.distill.teacher import TeacherCache

    def expensive(*a, **kw):
        raise AssertionError("the expensive part ran before the error")

    monkeypatch.setattr(recipe, "prune_to_dir", expensive)
    monkeypatch.setattr(TeacherCache, "build", expensive)
    monkeypatch.setattr(prune, "load_model", expensive)


def test_a_cache_mode_tokenizer_mismatch_is_found_before_pruning_or_caching(tmp_path, nothing_expensive):
    from cogcore.train.model import load_model, load_tokenizer, save_model
    tok = load_tokenizer("tiny-llama")
    tok.add_tokens(["<extra_token>"])
    save_model(load_model("tiny-llama"), tok, tmp_path / "odd-student")
    cfg = make(tmp_path, "teacher_mode=cache", "student.init=model", f"student.source={tmp_path / 'odd-student'}")
    with pytest.raises(CogcoreError, match="tokenizers differ.*one vocabulary"):
        recipe.run(cfg)


def test_too_little_data_for_one_step_is_found_before_pruning(tmp_path, nothing_expensive):
    cfg = make(tmp_path, "teacher_mode=cache", "data.builtin_size=20", "data.eval_documents=2", "train.micro_batch=64")
    with pytest.raises(CogcoreError, match="one step needs 64"):
        recipe.run(cfg)


def test_a_missing_cache_without_build_is_found_before_pruning(tmp_path, nothing_expensive):
    cfg = make(tmp_path, "teacher_mode=cache", "cache.build_if_missing=false", "data.seed=11")
    with pytest.raises(CogcoreError, match="no teacher cache.*distill cache"):
        recipe.run(cfg)


def test_a_missing_data_file_is_found_before_the_teacher_loads(tmp_path, nothing_expensive, monkeypatch):
    from cogcore.distill import prune
    cfg = make(tmp_path, f"data.source={tmp_path / 'none.jsonl'}")
    with pytest.raises(CogcoreError, match="does not exist"):
        recipe.run(cfg)
    monkeypatch.setattr(recipe, "prune_to_dir", prune.prune_to_dir)  # `distill prune`: prunes, teacher load fails
    with pytest.raises(CogcoreError, match="does not exist"):
        recipe.run_prune(cfg)


def test_every_model_is_on_the_device_before_the_heldout_kl(tmp_path, monkeypatch):
    """On a GPU the held-out batches are on CUDA: the student must be there before the first KL.
    Checked here with the meta device standing in for CUDA (no arithmetic runs on it; the cached
    teacher's lookup copies row ids to the CPU, which meta cannot, so the live teacher stands in)."""
    from cogcore.train.distributed import DistInfo
    from cogcore.train.loop import TrainResult
    seen = []

    def record(student, batches, teacher_weight, topk_tail="bucket"):
        seen.append((next(student.parameters()).device.type, {b["input_ids"].device.type for b in batches},
                     teacher_weight.device.type))
        return 1.0

    def stop(module, rows, cfg, run_dir, di, **kw):
        seen.append(("loop", next(module.parameters()).device.type))
        return TrainResult(0, 0.0, float("nan"), [], None, 0.0, 0.0, None, str(run_dir))

    def teacher_hidden(self, batch):  # the teacher's forward, without arithmetic on meta
        seen.append(("teacher", next(self.model.parameters()).device.type, batch["input_ids"].device.type))
        return torch.empty(*batch["input_ids"].shape, self.model.config.hidden_size, device=batch["input_ids"].device)

    monkeypatch.setattr(recipe, "heldout_kl", record)
    monkeypatch.setattr(recipe, "train", stop)
    monkeypatch.setattr(recipe.LiveTeacher, "hidden", teacher_hidden)
    recipe.run(make(tmp_path, "teacher_mode=live", "train.max_steps=2"), di=DistInfo(device=torch.device("meta")))
    assert seen[-2:] == [("meta", {"meta"}, "meta"), ("loop", "meta")]
    assert set(seen[:-2]) == {("teacher", "meta", "meta")}
