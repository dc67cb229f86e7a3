"""Recipe: distill a small core from a teacher.

    cogcore distill --config configs/distill/smollm2-core.yaml
    cogcore distill cache --config configs/distill/smollm2-core.yaml   # teacher top-k once, to disk
    cogcore distill prune --config configs/distill/smollm2-core.yaml   # only build the pruned student

Top to bottom: tokenizer + data → student (pruned from the teacher, an existing model, or a
fresh config) → teacher (live, cached top-k, or on-policy) → held-out KL before → the one
training loop on the lean distillation loss → held-out KL after → HF directory + summary.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from ..train.checkpoint import check_resume
from ..train.config import CogcoreError, field, save_config
from ..train.data import DataConfig, load_documents, make_batch, pack
from ..train.distributed import DistInfo, barrier, setup
from ..train.loop import TrainConfig, TrainResult, check_rows_fit, print_summary, train
from ..train.model import ModelSpec, base_hash, count_params, load_model, load_tokenizer, resolve, save_model
from ..train.workspace import get_workspace, run_dir
from .losses import DistillLoss, LossConfig, heldout_kl
from .prune import PruneConfig, prune_to_dir
from .shedding import ShedConfig, load_shed_documents
from .teacher import (
    LiveTeacher,
    TeacherCache,
    cache_key,
    check_same_tokenizer,
    on_policy_rows,
    teacher_load_key,
    tokenizer_fingerprint,
)


@dataclass
class StudentConfig:
    init: Literal["prune", "model", "config"] = field(
        "prune", help="prune = cut from the teacher (Minitron); model = start from student.source; "
                      "config = random init from the teacher's config with student.overrides")
    source: str = field("", help="init=model: the student model (preset, HF directory or .gguf)")
    overrides: dict = field(default_factory=dict, help="init=config: HF config keys to change, e.g. {num_hidden_layers: 4}")
    prune: PruneConfig = field(default_factory=PruneConfig, help="init=prune: what to keep")
    seed: int = field(0, help="init=config: seed of the random initialisation")


@dataclass
class CacheConfig:
    k: int = field(64, help="top-k teacher log-probs stored per position")
    shard_rows: int = field(256, help="packed rows per safetensors shard")
    build_if_missing: bool = field(True, help="teacher_mode=cache: build the cache first when none exists")

    def __post_init__(self):
        if self.k < 1 or self.shard_rows < 1:
            raise ValueError("cache.k and cache.shard_rows must be >= 1")


@dataclass
class OnPolicyConfig:
    lmbda: float = field(0.5, help="fraction of steps trained on the student's own samples (GKD's lambda)")
    max_new_tokens: int = field(32, help="tokens the student generates per prompt")
    temperature: float = field(1.0, help="student sampling temperature (0 = greedy)")

    def __post_init__(self):
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"on_policy.lmbda must be in [0, 1], got {self.lmbda}")


@dataclass
class DistillConfig:
    name: str = field("distill", help="run name: the run lives in <home>/runs/<name> unless out is set")
    out: str = field("", help="run directory (default <home>/runs/<name>)")
    teacher: ModelSpec = field(default_factory=ModelSpec, help="the teacher model")
    student: StudentConfig = field(default_factory=StudentConfig, help="how the student is made")
    teacher_mode: Literal["live", "cache", "on-policy"] = field(
        "cache", help="live = teacher runs each step; cache = precomputed top-k; on-policy = GKD with student samples")
    data: DataConfig = field(default_factory=DataConfig, help="distillation data")
    train: TrainConfig = field(default_factory=TrainConfig, help="the training loop")
    loss: LossConfig = field(default_factory=LossConfig, help="the distillation loss")
    cache: CacheConfig = field(default_factory=CacheConfig, help="teacher top-k cache")
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig, help="on-policy (GKD) sampling")
    shedding: ShedConfig = field(default_factory=ShedConfig, help="knowledge shedding: open-book conversion, "
                                 "recall-token masking, reasoning-over-knowledge data selection")

    def __post_init__(self):
        if self.student.init == "model" and not self.student.source:
            raise ValueError("student.init=model needs student.source (a preset, HF directory or .gguf file)")
        if self.student.init != "model" and self.student.source:
            raise ValueError(f"student.source={self.student.source} is only read with student.init=model "
                             f"(student.init is {self.student.init}): set student.init=model or drop student.source")
        if self.student.init != "config" and self.student.overrides:
            raise ValueError(f"student.overrides is only read with student.init=config (student.init is "
                             f"{self.student.init}): set student.init=config or drop student.overrides")
        if self.train.eval_every and not self.data.eval_documents:
            raise ValueError(f"train.eval_every={self.train.eval_every} needs held-out documents: set "
                             "data.eval_documents (or train.eval_every=0)")
        if self.teacher_mode == "on-policy" and self.data.packing:
            self.data.packing = False  # on-policy rows hold one prompt each


def run_dir_for(cfg: DistillConfig) -> Path:
    return run_dir(cfg.name, cfg.out)


# ----------------------------------------------------------------------------- steps

def make_student(cfg: DistillConfig, run_dir: Path, di: DistInfo):
    """The student model: pruned from the teacher (once, kept in the run), loaded, or fresh."""
    s = cfg.student
    if s.init == "model":
        return load_model(ModelSpec(source=s.source, dtype=cfg.teacher.dtype))
    if s.init == "prune":
        init_dir = run_dir / "student-init"
        key = prune_key(cfg)
        if di.is_main and pruned_key(init_dir) != key:
            if init_dir.exists():  # pruned for another teacher, prune config or data: never reuse it
                print(f"{init_dir} was pruned with other settings; pruning again", flush=True)
                shutil.rmtree(init_dir)
            prune_to_dir(cfg.teacher, init_dir, s.prune, cfg.data, key=key)
        barrier()
        return load_model(ModelSpec(source=str(init_dir)))
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.from_pretrained(resolve(cfg.teacher))
    for k, v in s.overrides.items():
        if not hasattr(hf_cfg, k):
            raise CogcoreError(f"student.overrides: the teacher's config has no key '{k}'")
        setattr(hf_cfg, k, v)
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    init_dir = run_dir / "student-init"
    if di.is_main:
        save_model(model, load_tokenizer(cfg.teacher), init_dir)
    barrier()
    return load_model(ModelSpec(source=str(init_dir)))


def check_student_source(cfg: DistillConfig, teacher_tok) -> None:
    """student.init=model: the student must share the teacher's vocabulary (checked from the
    tokenizer and config files, before any weights are loaded). Pruned and fresh students are
    built from the teacher's, so they always do."""
    if cfg.student.init != "model":
        return
    from transformers import AutoConfig
    spec = ModelSpec(source=cfg.student.source, dtype=cfg.teacher.dtype)
    student_tok = load_tokenizer(spec)
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        check_same_tokenizer(teacher_tok, student_tok)
    vt = AutoConfig.from_pretrained(resolve(cfg.teacher)).vocab_size
    vs = AutoConfig.from_pretrained(resolve(spec)).vocab_size
    if vt != vs:
        raise CogcoreError(f"the teacher has {vt} output logits and the student ({cfg.student.source}) {vs}; they must "
                           "match (resize the student's embeddings to the teacher's).")


def prune_key(cfg: DistillConfig) -> str:
    """Everything the pruned student depends on: the teacher's weights and how they are loaded,
    what is kept (student.prune) and the calibration data (data.*)."""
    import hashlib
    parts = {"teacher_hash": base_hash(resolve(cfg.teacher)), "dtype": cfg.teacher.dtype,
             "quantize": cfg.teacher.quantize, "prune": asdict(cfg.student.prune), "data": asdict(cfg.data)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def pruned_key(init_dir: Path) -> str | None:
    """The key a finished pruned student was built with (None: no finished student there)."""
    try:
        return json.loads((init_dir / "prune_report.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def params_in_dir(model_dir: Path) -> int:
    """Parameter count from the safetensors headers, without loading the weights."""
    import math

    from safetensors import safe_open
    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            n += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return n


def load_rows(cfg: DistillConfig, tokenizer):
    if cfg.shedding.active:
        train_docs, eval_docs = load_shed_documents(cfg.data, cfg.shedding, tokenizer)
    else:
        train_docs, eval_docs = load_documents(cfg.data, tokenizer)
    rows = pack(train_docs, cfg.data.seq_len, tokenizer.pad_token_id, cfg.data.packing)
    eval_rows = pack(eval_docs, cfg.data.seq_len, tokenizer.pad_token_id, cfg.data.packing) if eval_docs else None
    return rows, eval_rows


def teacher_caches(cfg: DistillConfig, tokenizer, rows, eval_rows, di: DistInfo, build: str = "if_missing"):
    """The top-k caches for the training rows and the held-out rows.

    build: "never" (open or explain), "if_missing" (build what does not exist yet), or
    "verify" (check every shard's sha256, rebuild missing or corrupt ones — `distill cache`).
    """
    ws = get_workspace()
    t_hash = base_hash(resolve(cfg.teacher))
    fp = tokenizer_fingerprint(tokenizer)
    parts = {"train": rows, **({"heldout": eval_rows} if eval_rows is not None else {})}
    caches = {}
    live = None
    for name, r in parts.items():
        key = cache_key(t_hash, fp, r, cfg.cache.k, teacher_load_key(cfg.teacher))
        if build != "verify":
            try:
                caches[name] = TeacherCache.open(ws.teacher_cache, key, r, cfg.cache.k)
                continue
            except CogcoreError:
                if build == "never":
                    raise
        if di.is_main:
            def teacher():
                nonlocal live
                live = live or LiveTeacher(load_model(cfg.teacher, device=di.device))
                return live
            print(f"building teacher cache ({name}: {len(r)} rows, k={cfg.cache.k})" if build != "verify" else
                  f"checking teacher cache ({name}: {len(r)} rows, k={cfg.cache.k}); rebuilding what is missing or corrupt",
                  flush=True)
            TeacherCache.build(ws.teacher_cache, key, r, teacher, cfg.cache.k, cfg.train.micro_batch,
                               cfg.cache.shard_rows, di.device,
                               extra_meta={"teacher": cfg.teacher.source, "teacher_hash": t_hash, "part": name})
        barrier()
        caches[name] = TeacherCache.open(ws.teacher_cache, key, r, cfg.cache.k)
    return caches


def _heldout_batches(eval_rows, micro_batch: int, device) -> list[dict]:
    if eval_rows is None:
        return []
    return [{k: v.to(device) for k, v in make_batch(eval_rows, torch.arange(s, min(len(eval_rows), s + micro_batch))).items()}
            for s in range(0, len(eval_rows), micro_batch)]


def _prompts(rows) -> list[list[int]]:
    """The prompt of each row's first document: the tokens up to its first trained target."""
    out = []
    for r in range(len(rows)):
        w = rows.target_weights[r]
        first = int((w > 0).nonzero()[0]) if (w > 0).any() else 0
        out.append(rows.input_ids[r, : first + 1].tolist())
    return out


# ----------------------------------------------------------------------------- recipes

def run(cfg: DistillConfig, di: DistInfo | None = None, stop_after: int | None = None) -> TrainResult:
    di = di or setup()
    if cfg.teacher_mode == "on-policy" and di.strategy in ("fsdp2", "zero3"):
        raise CogcoreError("teacher_mode=on-policy generates with the student, which needs its whole weights on every "
                           "process: use --dist ddp or zero2, or teacher_mode=live/cache with fsdp2/zero3")
    run_dir = run_dir_for(cfg)
    check_resume(run_dir, cfg.train, asdict(cfg))  # before pruning or a teacher cache
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    t_start = time.time()

    tokenizer = load_tokenizer(cfg.teacher)
    rows, eval_rows = load_rows(cfg, tokenizer)
    # What can be checked cheaply is checked before pruning, a teacher cache or a training step.
    check_rows_fit(len(rows), cfg.train, di.world_size)
    check_student_source(cfg, tokenizer)
    if cfg.teacher_mode == "cache" and not cfg.cache.build_if_missing:
        teacher_caches(cfg, tokenizer, rows, eval_rows, di, build="never")  # opens the indexes, or explains
    student = make_student(cfg, run_dir, di)
    student.to(di.device)  # before the held-out KL, on-policy sampling or the loop use it
    student_init_hash = student.base_hash  # save_model re-stamps base_hash with the trained weights
    student_tok = load_tokenizer(ModelSpec(source=student.source_dir))
    teacher_dir = resolve(cfg.teacher)
    teacher_hash = base_hash(teacher_dir)

    # The teacher: live in this process, or only its cached top-k (never loaded for training).
    live = None
    caches = {}
    if cfg.teacher_mode == "cache":
        caches = teacher_caches(cfg, tokenizer, rows, eval_rows, di,
                                build="if_missing" if cfg.cache.build_if_missing else "never")
        from transformers import AutoConfig
        if AutoConfig.from_pretrained(teacher_dir).vocab_size != student.get_output_embeddings().weight.shape[0]:
            raise CogcoreError("the teacher's vocab_size differs from the student's output size; they must match")
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(student_tok):
            check_same_tokenizer(tokenizer, student_tok, student, student)
    else:
        live = LiveTeacher(load_model(cfg.teacher, device=di.device))
        check_same_tokenizer(tokenizer, student_tok, live.model, student)
    teacher_weight = live.weight if live is not None else None

    def attach(batch: dict, cache_part: str) -> dict:
        if live is not None:
            return live.attach(batch)
        return caches[cache_part].attach(batch)

    def prepare(batch: dict, step: int | None) -> dict:
        if step is None:  # held-out evaluation
            return attach(batch, "heldout")
        if cfg.teacher_mode == "on-policy" and _on_policy_step(cfg, step):
            prompts = [prompts_all[int(i)] for i in batch["row_index"]]
            gen = on_policy_rows(student, tokenizer, prompts, cfg.data.seq_len, cfg.on_policy.max_new_tokens,
                                 cfg.on_policy.temperature, di.device)
            batch = {k: v.to(di.device) for k, v in make_batch(gen, torch.arange(len(gen))).items()}
        return attach(batch, "train")

    prompts_all = _prompts(rows) if cfg.teacher_mode == "on-policy" else []
    held = [attach(b, "heldout") for b in _heldout_batches(eval_rows, cfg.train.micro_batch, di.device)]
    if held and di.is_main:
        print(f"distill: held-out KL of the initial student ({len(held)} batches)", flush=True)
    kl_start = heldout_kl(student, held, teacher_weight, cfg.loss.topk_tail) if held else None
    if di.is_main:
        print(f"distill: teacher {cfg.teacher.source} ({teacher_hash[:12]}), student {count_params(student):,} params, "
              f"{len(rows)} rows x {cfg.data.seq_len}, teacher_mode={cfg.teacher_mode}"
              + (f", held-out KL {kl_start:.4f}" if kl_start is not None else ""), flush=True)

    module = DistillLoss(student, cfg.loss, teacher_weight)
    # eval_rows: the loop logs the held-out distillation loss every train.eval_every steps and at the end
    result = train(module, rows, cfg.train, run_dir, di, eval_rows=eval_rows, prepare_batch=prepare,
                   base_hash=getattr(student, "base_hash", None), run_config=asdict(cfg), stop_after=stop_after)
    if result.steps < cfg.train.max_steps:
        return result

    # Under FSDP2 / ZeRO-3 the student's weights stay sharded after training; its held-out KL
    # would need a gathered copy, so it is reported as not measured there.
    sharded = di.strategy in ("fsdp2", "zero3")
    kl_end = heldout_kl(student, held, teacher_weight, cfg.loss.topk_tail) if held and not sharded else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if di.is_main:
        out_hash = save_model(student, student_tok, run_dir / "model", state_dict=full)
        save_config(cfg, run_dir / "config.yaml")
        summary = {
            "steps": result.steps, "tokens_seen": result.tokens_seen, "trained_tokens": result.trained_tokens,
            "loss_weight_sum": result.loss_weight_sum, "final_loss": result.final_loss,
            "elapsed_s": time.time() - t_start, "train_elapsed_s": result.elapsed_s, "tokens_per_s": result.tokens_per_s,
            "teacher": cfg.teacher.source, "teacher_hash": teacher_hash, "teacher_params": params_in_dir(teacher_dir),
            "student_params": count_params(student), "base_hash": out_hash, "student_init_hash": student_init_hash,
            "teacher_mode": cfg.teacher_mode, "loss": cfg.loss.kind,
            "heldout_kl_start": kl_start, "heldout_kl_end": kl_end, "heldout_loss": result.eval_loss,
            "heldout_kl_kind": heldout_kl_kind(cfg, live is not None),
            "world_size": di.world_size, "strategy": di.strategy, "device": str(di.device),
            "resumed_from": result.resumed_from,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(f"distill {cfg.name}", {
            "run": str(run_dir), "steps": result.steps, "final loss": result.final_loss,
            "held-out KL start": kl_start if kl_start is not None else "-",
            "held-out KL end": kl_end if kl_end is not None else "-",
            "held-out KL is": summary["heldout_kl_kind"] if kl_start is not None else "-",
            "tokens/s": result.tokens_per_s, "student params": f"{count_params(student):,}",
            "output": str(run_dir / "model")})
    barrier()
    return result


def heldout_kl_kind(cfg: DistillConfig, live: bool) -> str:
    """What the held-out KL number is: exact with a live teacher; with a cached top-k it is
    coarse-grained to the k ids + a tail bucket (a lower bound of the exact KL, by the data
    processing inequality), or renormalised over the k ids (an approximation, no bound)."""
    if live:
        return "exact"
    if cfg.loss.topk_tail == "bucket":
        return f"top-{cfg.cache.k} + tail bucket (lower bound of the exact KL)"
    return f"top-{cfg.cache.k} renormalised (approximation, not a bound)"


def _on_policy_step(cfg: DistillConfig, step: int) -> bool:
    g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    return float(torch.rand((), generator=g)) < cfg.on_policy.lmbda


def run_cache(cfg: DistillConfig) -> dict:
    """`cogcore distill cache`: run the teacher once over the data and store its top-k."""
    di = setup()
    tokenizer = load_tokenizer(cfg.teacher)
    rows, eval_rows = load_rows(cfg, tokenizer)
    caches = teacher_caches(cfg, tokenizer, rows, eval_rows, di, build="verify")
    info = {name: {"dir": str(c.root), "rows": c.n_rows, "k": c.k} for name, c in caches.items()}
    if di.is_main:
        print_summary("teacher cache", {f"{n} ({v['rows']} rows, k={v['k']})": v["dir"] for n, v in info.items()})
    return info


def run_prune(cfg: DistillConfig) -> dict:
    """`cogcore distill prune`: write the pruned student as an HF directory and report what was kept."""
    out = run_dir_for(cfg) / "student-init"
    if out.exists():
        shutil.rmtree(out)
    report = prune_to_dir(cfg.teacher, out, cfg.student.prune, cfg.data, key=prune_key(cfg))
    print_summary("prune", {"out": str(out), "params before": f"{report['params_before']:,}",
                            "params after": f"{report['params_after']:,}",
                            "kept layers": str(report.get("kept_layers"))})
    return report


