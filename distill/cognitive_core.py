"""Experiment: does knowledge shedding keep the teacher's reading and drop its memorised facts?

    cogcore experiment cognitive-core --out DIR            # one seed, ~30 min on a shared 2-core CPU
    cogcore experiment cognitive-core --out DIR seeds=[0,1,2]
    cogcore experiment cognitive-core --out DIR quick=true  # tests: minutes, direction only

Per seed, top to bottom, every phase on the one training loop (``train.loop.train``):

1. **reader** — a tiny word-level Llama (rotary positions) trained from scratch on open-book
   questions about *throwaway* people whose facts are drawn at random per example, plus
   procedures, with zero weight on the (random) context statements. It learns to look things
   up (and two hops) but holds no fact of the world:
   no seen or unseen person ever appears in its data, and company bases are random there.
   This is the shared initialisation of the teacher and of both students — FINDINGS: lookup
   is learned suddenly after a ~1,000-step plateau; paying that once, with no facts in it, is
   fair to both students and is what makes them affordable. (Measured here at 8 rows x 256
   tokens per step: open-book unseen 0.13 after 1,400 steps, 0.33 after 2,000 — the plateau
   lasts longer than FINDINGS' bigger batches suggested. A 6,000-step reader on fresh data
   (25 min on one core) reaches 0.42-0.48: it then copies a value of the asked attribute from
   the context for all four attributes, but does not yet bind it to the asked person — that
   second step of lookup was not reached within any budget tried; see the issue notes.)
2. **teacher** — the reader trained on the world's full mixture (fact statements, closed-book,
   open-book with 60 % throwaway contexts and some contradicting contexts, procedures) for
   ``teacher.max_steps``, to recite the seen facts and keep reading (follow a contradicting
   context); the eval reports how far it got (``follows_context``, ``closed_book_recall``).
3. **plain_kd** — a student (from the reader) distilled from the live teacher on the teacher's
   full mixture.
4. **core** — a student (from the reader) distilled from the live teacher on the same mixture
   through knowledge shedding (``distill.shedding``, config ``core``): open-book conversion +
   zero weight on every recall token (annotated exactly). Data selection is a lever of the
   config (``core.knowledge_weight``); after open-book conversion no knowledge-dense record is
   left, so it is neutral (1.0) by default.
5. **eval** — ``eval.core.evaluate_core`` on the world for all three (greedy next word).

Writes ``DIR/results.json`` (per model: metric means over seeds, their spread, per-seed
values; the targets of issue 5 with pass/fail), ``DIR/core.png`` and a printed table. Each
phase's model is kept in ``DIR/seed-N/<phase>/model``; a rerun skips finished phases.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..eval.world import WorldConfig
from ..train.config import field, save_config
from ..train.data import Document, pack, tokenize_record
from ..train.distributed import DistInfo
from ..train.lm import CausalLMLoss
from ..train.loop import TrainConfig, train
from ..train.model import ModelSpec, load_model, save_model
from ..train.workspace import get_workspace
from .losses import DistillLoss, LossConfig
from .shedding import ShedConfig, shed_documents
from .teacher import LiveTeacher

METRICS = ("closed_book_recall", "open_book_seen", "open_book_unseen", "two_hop_unseen", "procedures",
           "follows_context", "follows_memory")
MODELS = ("teacher", "plain_kd", "core")


@dataclass
class NetConfig:
    hidden_size: int = field(128, help="model width (teacher and students are the same size)")
    layers: int = field(4, help="decoder layers")
    heads: int = field(4, help="attention heads")
    intermediate_size: int = field(384, help="MLP width")

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"net.hidden_size={self.hidden_size} must be a multiple of net.heads={self.heads}")


@dataclass
class MixtureConfig:
    facts: int = field(3000, help="teacher mixture: fact-statement records (1–3 seen facts each)")
    closed_book: int = field(3000, help="teacher mixture: closed-book questions about seen facts")
    open_book: int = field(3000, help="teacher mixture: open-book contexts (1–3 questions each)")
    procedures: int = field(600, help="teacher mixture: procedure questions (compare, add)")
    throwaway_fraction: float = field(0.6, help="open-book contexts about throwaway people with random facts")
    two_hop_fraction: float = field(0.2, help="open-book contexts that start with a two-hop question")
    contradiction_fraction: float = field(0.15, help="seen-people contexts that contradict memory (context wins)")
    reader_open_book: int = field(4000, help="reader data: open-book contexts, throwaway people only")
    reader_procedures: int = field(400, help="reader data: procedure questions")

    def __post_init__(self):
        for name in ("throwaway_fraction", "two_hop_fraction", "contradiction_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"mixture.{name} must be in [0, 1]")
        if min(self.facts, self.closed_book, self.open_book, self.reader_open_book) < 1:
            raise ValueError("mixture: facts, closed_book, open_book and reader_open_book need at least 1 record each")


def _train_cfg(steps: int, lr: float, micro_batch: int, warmup: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, micro_batch=micro_batch, lr=lr, warmup_steps=warmup, min_lr_ratio=0.1,
                       weight_decay=0.0, grad_clip=1.0, precision="fp32", log_every=10, save_every=0,
                       keep_checkpoints=1, tensorboard=False, progress=False)


def _core_shedding() -> ShedConfig:
    return ShedConfig(open_book=True, recall_masking="annotated", recall_weight=0.0, reasoning_weight=1.0,
                      knowledge_weight=1.0)


@dataclass
class ExperimentConfig:
    out: str = field("", help="experiment directory (default <home>/runs/cognitive-core)")
    seeds: list[int] = field(default_factory=lambda: [0], help="seeds to run (world, data, init); [0,1,2] for the spread")
    quick: bool = field(False, help="tests: a small world, a small model and short runs; checks the direction only")
    world: WorldConfig = field(default_factory=WorldConfig, help="the synthetic world (its seed is replaced by each run seed)")
    net: NetConfig = field(default_factory=NetConfig, help="the model (tiny Llama, word-level vocabulary)")
    mixture: MixtureConfig = field(default_factory=MixtureConfig, help="training data of the reader and the teacher")
    seq_len: int = field(256, help="tokens per packed row")
    reader: TrainConfig = field(default_factory=lambda: _train_cfg(1400, 2e-3, 8, 50),
                                help="phase 1: lookup skill from throwaway open-book data (the shared init)")
    teacher: TrainConfig = field(default_factory=lambda: _train_cfg(1600, 2e-3, 8, 50),
                                 help="phase 2: the teacher, from the reader, on the full mixture")
    train: TrainConfig = field(default_factory=lambda: _train_cfg(600, 2e-3, 8, 30),
                               help="phase 3: each student, from the reader, distilled from the live teacher")
    loss: LossConfig = field(default_factory=lambda: LossConfig(kind="forward_kl"), help="the students' distillation loss")
    core: ShedConfig = field(default_factory=_core_shedding, help="the core student's knowledge shedding")
    eval_n: int = field(200, help="questions per metric")
    threads: int = field(1, help="torch CPU threads (tiny matmuls: one is faster than two on a shared 2-core machine)")

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: give one or more distinct seeds, e.g. [0,1,2]")
        if self.eval_n < 1 or self.threads < 1:
            raise ValueError("eval_n and threads must be >= 1")
        for phase in ("reader", "teacher", "train"):
            if getattr(self, phase).eval_every:
                raise ValueError(f"{phase}.eval_every does nothing here (the phases hold out no rows; the eval step "
                                 "scores every model at the end): leave it at 0")
        if self.seq_len < 64:
            raise ValueError(f"seq_len={self.seq_len}: a world record needs up to ~120 tokens; use >= 64")
        if self.quick:
            self._shrink()

    def _shrink(self) -> None:
        """The quick size: a world of 24 seen people, a 2-layer model and a few hundred steps in all.

        Too short for the reader to learn lookup; enough for the teacher to memorise part of the
        world and for the direction (plain KD recites, core does not) to show. Only values still
        at their full-size default take the quick size: a key the user set (``quick=true
        train.max_steps=50``) keeps the user's value."""
        full = ExperimentConfig.__new__(ExperimentConfig)  # the full-size defaults, without __post_init__
        for f in dataclasses.fields(ExperimentConfig):
            setattr(full, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        quick = {
            "world": WorldConfig(n_seen=24, n_unseen=24, n_throwaway=48, n_values=6),
            "net": NetConfig(hidden_size=64, layers=2, heads=4, intermediate_size=192),
            "mixture": replace(full.mixture, facts=200, closed_book=200, open_book=200, procedures=40,
                               reader_open_book=200, reader_procedures=20),
            "seq_len": 128,
            "reader": _train_cfg(20, 3e-3, 8, 5),
            "teacher": _train_cfg(500, 3e-3, 8, 10),
            "train": _train_cfg(250, 3e-3, 8, 10),
            "eval_n": 60,
            "threads": 1,
        }
        for name, small in quick.items():
            setattr(self, name, _keep_overrides(getattr(self, name), getattr(full, name), small))


def _keep_overrides(current, full_default, quick):
    """``quick``, except where ``current`` differs from the full-size default (a user's value)."""
    if dataclasses.is_dataclass(current):
        return replace(quick, **{f.name: _keep_overrides(getattr(current, f.name), getattr(full_default, f.name),
                                                         getattr(quick, f.name))
                                 for f in dataclasses.fields(current) if f.init})
    return quick if current == full_default else current


# ----------------------------------------------------------------------------- steps

def build_model(tokenizer, net: NetConfig, seed: int):
    """A fresh tiny Llama over the world's word-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=net.hidden_size, intermediate_size=net.intermediate_size,
                      num_hidden_layers=net.layers, num_attention_heads=net.heads, num_key_value_heads=net.heads,
                      max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def documents(records: list[dict], tokenizer) -> list[Document]:
    return [tokenize_record(r, tokenizer, "all", where=f"world record {i}") for i, r in enumerate(records)]


def _done(phase_dir: Path) -> bool:
    return (phase_dir / "model" / "config.json").is_file()


def train_lm(model, tokenizer, docs: list[Document], tcfg: TrainConfig, phase_dir: Path, seq_len: int) -> float:
    """Next-token training (reader, teacher) on the one loop; returns seconds."""
    t0 = time.time()
    rows = pack(docs, seq_len, tokenizer.pad_token_id)
    train(CausalLMLoss(model), rows, tcfg, phase_dir, DistInfo(), base_hash=None)
    save_model(model, tokenizer, phase_dir / "model")
    return time.time() - t0


def distill_student(student, teacher, tokenizer, docs: list[Document], tcfg: TrainConfig, loss: LossConfig,
                    phase_dir: Path, seq_len: int) -> float:
    """Distil ``student`` from the live ``teacher`` on ``docs``; returns seconds."""
    t0 = time.time()
    rows = pack(docs, seq_len, tokenizer.pad_token_id)
    live = LiveTeacher(teacher)
    module = DistillLoss(student, loss, live.weight)
    train(module, rows, tcfg, phase_dir, DistInfo(), prepare_batch=lambda batch, step: live.attach(batch))
    save_model(student, tokenizer, phase_dir / "model")
    return time.time() - t0


def run_seed(cfg: ExperimentConfig, seed: int, out: Path) -> dict:
    """All phases for one seed; returns {model: metrics} plus timings."""
    from ..eval.core import evaluate_core
    from ..eval.world import World, mask_recall, world_tokenizer

    t_start = time.time()
    seed_dir = out / f"seed-{seed}"
    world = World(replace(cfg.world, seed=seed))
    tok = world_tokenizer(world)
    mx = cfg.mixture
    seconds: dict[str, float] = {}

    def phase_cfg(tcfg: TrainConfig) -> TrainConfig:
        return replace(tcfg, seed=seed)

    # 1. reader: lookup and procedures on throwaway people only (no fact of the world)
    reader_dir = seed_dir / "reader"
    if not _done(reader_dir):
        # The statements are random draws about throwaway people: noise to predict. Zero weight on
        # them (mask_recall) spends the whole loss on questions and answers, i.e. on lookup.
        records = ([mask_recall(r) for r in world.training_records(
                       "open_book", mx.reader_open_book, seed=1000 + seed, throwaway_fraction=1.0,
                       two_hop_fraction=mx.two_hop_fraction)]
                   + world.training_records("procedures", mx.reader_procedures, seed=1000 + seed))
        print(f"[seed {seed}] reader: {len(records)} records (throwaway people only)", flush=True)
        seconds["reader"] = train_lm(build_model(tok, cfg.net, seed), tok, documents(records, tok),
                                     phase_cfg(cfg.reader), reader_dir, cfg.seq_len)

    def from_reader():
        return load_model(ModelSpec(source=str(reader_dir / "model")))

    # 2. teacher: the full mixture (memorise the seen world, keep reading)
    mixture = world.teacher_mixture(mx.facts, mx.closed_book, mx.open_book, mx.procedures, seed=seed,
                                    throwaway_fraction=mx.throwaway_fraction, two_hop_fraction=mx.two_hop_fraction,
                                    contradiction_fraction=mx.contradiction_fraction)
    teacher_dir = seed_dir / "teacher"
    if not _done(teacher_dir):
        print(f"[seed {seed}] teacher: {len(mixture)} records", flush=True)
        seconds["teacher"] = train_lm(from_reader(), tok, documents(mixture, tok), phase_cfg(cfg.teacher),
                                      teacher_dir, cfg.seq_len)
    teacher = load_model(ModelSpec(source=str(teacher_dir / "model")))

    # 3. students from the reader: plain KD on the full mixture, core through knowledge shedding
    student_docs = {
        "plain_kd": documents(mixture, tok),
        "core": shed_documents(mixture, tok, replace(cfg.core, seed=seed), train_on="all", where="teacher mixture"),
    }
    for name, docs in student_docs.items():
        phase_dir = seed_dir / name
        if not _done(phase_dir):
            trained = sum(sum(d.weights) for d in docs)
            print(f"[seed {seed}] student {name}: {len(docs)} documents, {trained:,.0f} trained token weight", flush=True)
            seconds[name] = distill_student(from_reader(), teacher, tok, docs, phase_cfg(cfg.train), cfg.loss,
                                            phase_dir, cfg.seq_len)

    # 4. eval: the same questions for all three
    results: dict[str, dict] = {}
    for name in MODELS:
        model = teacher if name == "teacher" else load_model(ModelSpec(source=str(seed_dir / name / "model")))
        report = evaluate_core(model, tok, world=world, probes=False, n_per_metric=cfg.eval_n, batch_size=64,
                               seed=seed, progress=False)
        report.meta["phase_seconds"] = seconds.get(name)
        report.save(seed_dir / f"eval-{name}.json")
        results[name] = report.metrics
    return {"metrics": results, "seconds": seconds, "wall_s": time.time() - t_start}


# ----------------------------------------------------------------------------- summary

def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(per_seed: dict[int, dict], eval_n: int) -> dict:
    """results.json: per model the mean over seeds of every metric, its spread (sample std),
    per-seed values, ``chance`` (of closed-book recall) and ``n``; plus the issue-5 targets."""
    out: dict = {"seeds": sorted(per_seed)}
    for name in MODELS:
        entry: dict = {}
        chance_of: dict[str, float] = {}
        spread: dict[str, float] = {}
        for metric in METRICS:
            vals = [per_seed[s]["metrics"][name][metric]["value"] for s in sorted(per_seed)
                    if metric in per_seed[s]["metrics"][name]]
            if not vals:
                continue
            entry[metric], spread[metric] = _mean_spread(vals)
            chance_of[metric] = per_seed[min(per_seed)]["metrics"][name][metric]["chance"]
        entry["chance"] = chance_of["closed_book_recall"]
        entry["n"] = eval_n
        entry["chance_per_metric"] = chance_of
        entry["spread"] = spread
        entry["per_seed"] = {str(s): {m: per_seed[s]["metrics"][name][m]["value"] for m in entry["spread"]}
                             for s in sorted(per_seed)}
        out[name] = entry
    out["targets"] = targets(out)
    out["wall_s"] = {str(s): round(per_seed[s]["wall_s"], 1) for s in sorted(per_seed)}
    out["phase_seconds"] = {str(s): {k: round(v, 1) for k, v in per_seed[s]["seconds"].items()} for s in sorted(per_seed)}
    return out


# A target about keeping what the teacher can do is measurable only if the teacher can do it.
TEACHER_READS = 0.9    # teacher open_book_unseen / two_hop_unseen needed to judge "keeps the teacher's reading"
TEACHER_RECITES = 0.1  # teacher closed_book_recall above chance needed to judge "sheds the teacher's recall"


def _target(ok: bool, measurable: bool = True, requires: str = "", **values) -> dict:
    status = ("PASS" if ok else "FAIL") if measurable else "not measurable"
    out = {"pass": bool(ok and measurable), "status": status, **values}
    if not measurable:
        out["requires"] = requires
    return out


def targets(res: dict) -> dict:
    """Issue 5's targets on the seed means (never relaxed here: a miss is reported as a miss).

    A target about keeping the teacher's reading is "not measurable" (and does not pass) unless
    the teacher reads (>= TEACHER_READS on that metric); shedding recall needs a teacher that
    recites (> TEACHER_RECITES above chance)."""
    t, p, c = res["teacher"], res["plain_kd"], res["core"]
    chance = t["chance"]
    recites = t["closed_book_recall"] - chance > TEACHER_RECITES
    reads = t["open_book_unseen"] >= TEACHER_READS
    two_hops = t["two_hop_unseen"] >= TEACHER_READS
    need_read = f"teacher open_book_unseen >= {TEACHER_READS} (it is {t['open_book_unseen']:.3f})"
    need_hop = f"teacher two_hop_unseen >= {TEACHER_READS} (it is {t['two_hop_unseen']:.3f})"
    return {
        "core_sheds_90pct_recall": _target(
            c["closed_book_recall"] - chance <= 0.1 * (t["closed_book_recall"] - chance), recites,
            f"teacher closed_book_recall > chance + {TEACHER_RECITES} (it is {t['closed_book_recall']:.3f}, "
            f"chance {chance:.3f})",
            core_above_chance=c["closed_book_recall"] - chance, allowed=0.1 * (t["closed_book_recall"] - chance)),
        "core_keeps_95pct_open_book_unseen": _target(
            c["open_book_unseen"] >= 0.95 * t["open_book_unseen"], reads, need_read,
            core=c["open_book_unseen"], needed=0.95 * t["open_book_unseen"], teacher=t["open_book_unseen"]),
        "core_not_worse_than_plain_kd_open_book_unseen": _target(
            c["open_book_unseen"] >= p["open_book_unseen"], reads, need_read,
            core=c["open_book_unseen"], plain_kd=p["open_book_unseen"]),
        "core_not_worse_than_plain_kd_two_hop": _target(
            c["two_hop_unseen"] >= p["two_hop_unseen"], two_hops, need_hop,
            core=c["two_hop_unseen"], plain_kd=p["two_hop_unseen"]),
        "core_keeps_95pct_two_hop": _target(
            c["two_hop_unseen"] >= 0.95 * t["two_hop_unseen"], two_hops, need_hop,
            core=c["two_hop_unseen"], needed=0.95 * t["two_hop_unseen"], teacher=t["two_hop_unseen"]),
        "plain_kd_recites_more_than_core": _target(
            p["closed_book_recall"] > c["closed_book_recall"], recites,
            f"teacher closed_book_recall > chance + {TEACHER_RECITES}",
            plain_kd=p["closed_book_recall"], core=c["closed_book_recall"]),
    }


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    several = len(res["seeds"]) > 1
    table = Table(title=f"cognitive-core experiment, seeds {res['seeds']} (n={res['teacher']['n']} per metric"
                        + (", mean ± std" if several else "") + ")")
    table.add_column("metric")
    for name in MODELS:
        table.add_column(name, justify="right")
    table.add_column("chance", justify="right")
    for metric in METRICS:
        if metric not in res["teacher"]:
            continue
        cells = []
        for name in MODELS:
            v, s = res[name][metric], res[name]["spread"][metric]
            cells.append(f"{v:.3f}" + (f" ± {s:.3f}" if several else ""))
        table.add_row(metric, *cells, f"{res['teacher']['chance_per_metric'][metric]:.3f}")
    console = Console()
    console.print(table)
    for name, t in res["targets"].items():
        detail = ", ".join(f"{k}={v:.3f}" for k, v in t.items() if isinstance(v, float))
        why = f" — needs {t['requires']}" if t.get("requires") else ""
        console.print(f"  {t['status']}  {name}: {detail}{why}", highlight=False)


# ----------------------------------------------------------------------------- recipe

def run(cfg: ExperimentConfig) -> dict:
    """Run every seed, then write results.json and core.png and print the table."""
    from ..eval.core import plot_core

    out = Path(cfg.out).expanduser() if cfg.out else get_workspace().runs / "cognitive-core"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        per_seed = {}
        for seed in cfg.seeds:
            per_seed[seed] = run_seed(cfg, seed, out)
            (out / f"seed-{seed}" / "metrics.json").write_text(json.dumps(per_seed[seed], indent=1))
    finally:
        torch.set_num_threads(threads)
    res = summarize(per_seed, cfg.eval_n)
    res["config"] = asdict(cfg)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out / "results.json")
    plot_core({name: {m: {"value": res[name][m], "n": cfg.eval_n, "chance": res[name]["chance_per_metric"][m]}
                      for m in ("closed_book_recall", "open_book_unseen")} for name in MODELS},
              out / "core.png", title=f"knowledge shedding (seeds {res['seeds']})")
    print_table(res)
    print(f"saved {out / 'results.json'} and {out / 'core.png'}; wall time per seed (s): {res['wall_s']}")
    return res

