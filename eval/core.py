"""The cognitive-core suite: does a model answer from memory, or read its context?

:func:`evaluate_core` runs two families of questions on any Hugging Face causal LM:

**Synthetic world** (when a :class:`~cogcore.eval.world.World` is given; plain text, the
format of the world's training records, tokenized segment by segment exactly like
``cogcore.train.data`` does):

====================  ===========================================================  =========
metric                question                                                     chance
====================  ===========================================================  =========
closed_book_recall    a seen person's fact, no context (memory)                     1/|values|
open_book_seen        the fact among 4–6 statements with a same-attribute distractor 1/|values|
open_book_unseen      the same for people never in training (reading)              1/|values|
two_hop_unseen        "X works for C" + "C is based in V" both needed               1/|values|
procedures            larger of two numbers (chance 1/2), a small sum (1/|sums|)    mean
follows_context       the context contradicts memory; answered the context's value  1/|values|
follows_memory        same examples; answered the memorised value instead           1/|values|
====================  ===========================================================  =========

Scoring ``"greedy"`` (default, the strict one): greedy decoding of just enough tokens for the
longest value, the first word of the reply must equal the answer exactly. ``"restricted"``:
the argmax of the summed log-probability over the question's closed value set — always some
value, so it is never below chance by formatting and reads higher on undertrained models.

**Real-world probes** (:mod:`cogcore.eval.probes`), chat template when the tokenizer has one,
greedy, ``max_new_tokens`` (default 48, so "J.K. Rowling" is not cut to "J.K. Row"), each reply
stopped at the end of its first line or sentence (:func:`first_sentence`; "J.K." is no sentence end):
``closed_book`` (question only), ``open_book`` (the supporting sentence first),
``follows_context_real`` / ``follows_memory_real`` (a false sentence first: names only the
counterfact / only the true answer), ``language_drift_real`` (share of all replies not in
English — those count as wrong everywhere). Open questions have no chance level (0).

Generation is batched with left padding; prompts are sorted by length so batches pad little.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Literal, Sequence

import torch

from cogcore.train.config import CogcoreError, field
from cogcore.train.model import ModelSpec, load_model, load_tokenizer
from cogcore.train.workspace import get_workspace

from .probes import Probe, load_probes, score_reply
from .world import EVAL_KINDS, Example, World, WorldConfig

SYNTHETIC_METRICS: dict[str, str] = {  # metric -> World.examples kind
    "closed_book_recall": "closed_book",
    "open_book_seen": "open_book_seen",
    "open_book_unseen": "open_book_unseen",
    "two_hop_unseen": "two_hop_unseen",
    "procedures": "procedures",
    "follows_context": "contradiction",
}
REAL_METRICS = ("closed_book", "open_book", "follows_context_real", "follows_memory_real", "language_drift_real")
assert set(SYNTHETIC_METRICS.values()) <= set(EVAL_KINDS)


# ----------------------------------------------------------------------------- report

@dataclasses.dataclass
class EvalReport:
    """Named metrics, each ``{"value", "n", "chance"}``, plus what produced them."""

    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    samples: dict[str, list[dict]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, hits: Sequence[bool | float], chance: float) -> None:
        n = len(hits)
        self.metrics[name] = {"value": float(sum(hits)) / n if n else float("nan"), "n": n, "chance": float(chance)}

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]["value"]

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "meta": self.meta, "samples": self.samples}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        d = json.loads(Path(path).read_text())
        return cls(d.get("metrics", {}), d.get("meta", {}), d.get("samples", {}))

    def table(self, title: str | None = None):
        from rich.table import Table
        t = Table(title=title or "cognitive-core eval")
        for col in ("metric", "value", "± s.e.", "n", "chance"):
            t.add_column(col, justify="left" if col == "metric" else "right")
        for name, m in self.metrics.items():
            v, n = m["value"], m["n"]
            se = math.sqrt(max(v * (1 - v), 0.0) / n) if n and not math.isnan(v) else float("nan")
            t.add_row(name, f"{v:.3f}", f"{se:.3f}", str(n), f"{m['chance']:.3f}")
        return t

    def print(self, console=None, title: str | None = None) -> None:
        from rich.console import Console
        (console or Console()).print(self.table(title))


# ----------------------------------------------------------------------------- generation

def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_plain(tokenizer, texts: Sequence[str]) -> list[int]:
    """Token ids of consecutive segments, each tokenized on its own (as ``cogcore.train.data``)."""
    ids: list[int] = []
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids.append(tokenizer.bos_token_id)
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


# A sentence ends at . ! or ? after a lowercase letter, digit or closing mark, then a space:
# "Canberra. It is" ends after "Canberra."; the initials of "J.K. Rowling" do not end one.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\]\"'’])[.!?](?=\s)")


def first_sentence(text: str) -> str:
    """The reply up to the end of its first line or first sentence (leading blank lines skipped)."""
    body = text.lstrip()
    cut = len(body)
    nl = body.find("\n")
    if nl >= 0:
        cut = nl
    m = _SENTENCE_END.search(body, 0, cut)
    if m:
        cut = m.end()
    return text[: len(text) - len(body) + cut]


class _StopAtFirstSentence:
    """A stopping criterion: a row is done once its reply holds a complete first line or sentence."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.width:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done.append(first_sentence(text) != text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


COPY_BYTES = 2 << 30  # the bf16 copy ``in_precision`` makes of a model, at most


@contextlib.contextmanager
def in_precision(model, precision: str):
    """``model`` to generate with in ``precision``: itself, or for bf16 a bf16 copy of it (the
    model stays as it was). Greedy generation of 64 of the demo's probes (24 tokens, frozen
    weights) ran 1.75x faster from the copy on 2 CPU cores with AMX (11.7 s against 6.7 s) and
    answered as many right; bf16 autocast instead ran 1.6x faster. fp32 models whose copy fits
    ``COPY_BYTES`` only; others generate as they are."""
    params = list(model.parameters())
    if precision != "bf16" or not params or any(p.dtype != torch.float32 for p in params) \
            or sum(p.numel() * 2 for p in params) > COPY_BYTES:
        yield model
        return
    import copy
    replica = copy.deepcopy(model).to(torch.bfloat16).eval()
    try:
        yield replica
    finally:
        del replica


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 16,
             progress=None, stop_at_sentence: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, decoded without specials.

    ``stop_at_sentence``: a row stops generating once it holds a whole first line or sentence,
    and its reply is cut there (one-word answers do not pay for ``max_new_tokens``)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    from cogcore.train.model import plain_head_input
    plain_head_input(model)  # models built in code (a pruned student) were not loaded by load_model
    pad = _pad_id(tokenizer)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    dev = _device(model)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: the prompts end where generation starts
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        stop = StoppingCriteriaList([_StopAtFirstSentence(tokenizer, width)]) if stop_at_sentence else None
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc,
                             stopping_criteria=stop)
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[r, width:].tolist(), skip_special_tokens=True)
            if stop_at_sentence:
                out[i] = first_sentence(out[i])
        if progress is not None:
            progress(len(idx))
    return out


@torch.no_grad()
def choose(model, tokenizer, prompts: Sequence[list[int]], candidates: Sequence[Sequence[str]], *,
           batch_size: int = 16, progress=None) -> list[str]:
    """For each prompt, the candidate whose tokens (``" " + candidate``) have the highest total log-prob."""
    rows: list[tuple[int, str, list[int], int]] = []  # (prompt index, candidate, ids, prompt length)
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        for c in cands:
            rows.append((i, c, list(p) + tokenizer(" " + c, add_special_tokens=False).input_ids, len(p)))
    pad = _pad_id(tokenizer)
    dev = _device(model)
    best: dict[int, tuple[float, str]] = {}
    step = max(1, batch_size * 4)  # rows are short single forwards: larger batches
    for s in range(0, len(rows), step):
        chunk = rows[s:s + step]
        width = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, seq, _) in enumerate(chunk):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(dev))[..., 0]  # (B, T-1)
        for r, (i, c, seq, n_prompt) in enumerate(chunk):
            score = float(logp[r, n_prompt - 1:len(seq) - 1].sum())
            if i not in best or score > best[i][0]:
                best[i] = (score, c)
        if progress is not None:
            progress(len({r[0] for r in chunk}))
    return [best[i][1] for i in range(len(prompts))]


_FIRST_WORD = re.compile(r"[^\W_]+")


def first_word(text: str) -> str:
    m = _FIRST_WORD.search(text)
    return m.group(0) if m else ""


# ----------------------------------------------------------------------------- prompts

def probe_prompt(tokenizer, question: str, context: str | None = None, chat: bool | None = None) -> list[int]:
    """Token ids of a probe question (after ``context`` if given): a chat turn when the tokenizer
    has a chat template (or ``chat=True``), else "Question: …\\nAnswer:"."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        content = f"{context}\n{question}" if context else question
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    lines = ([f"Context: {context}"] if context else []) + [f"Question: {question}", "Answer:"]
    return encode_plain(tokenizer, ["\n".join(lines)])


def _cut_plain_reply(reply: str) -> str:
    """A base model goes on with more Q/A pairs; only its first answer counts."""
    return re.split(r"\n\s*\n|\nQuestion:|\nContext:", reply, maxsplit=1)[0]


# ----------------------------------------------------------------------------- the suite

def evaluate_core(model, tokenizer, *, world: World | None = None, probes: bool | str | Path | list[Probe] = True,
                  n_per_metric: int = 200, max_new_tokens: int | None = None, batch_size: int = 16,
                  scoring: Literal["greedy", "restricted"] = "greedy", chat: bool | None = None, seed: int = 0,
                  n_samples: int = 3, progress: bool = True, precision: Literal["fp32", "bf16"] = "fp32"
                  ) -> EvalReport:
    """Measure recall vs. reading on ``model``; see the module docstring for every metric.

    ``world``: also run the synthetic-world metrics (``n_per_metric`` examples each).
    ``probes``: True for the built-in real-world probes, a JSON path, a list of probes, or
    False; at most ``n_per_metric`` probes are used (a seeded sample, all when fewer).
    ``max_new_tokens``: for the probes (default 48); world answers get just what the longest
    value needs. ``chat``: None uses the tokenizer's chat template for probes when it has one.
    ``precision``: bf16 generates from a bf16 copy of an fp32 model (:func:`in_precision`), about
    2x faster on CPUs with AMX; compare models evaluated in the same precision.
    """
    if scoring not in ("greedy", "restricted"):
        raise CogcoreError(f"scoring={scoring!r}: use 'greedy' (strict next word) or 'restricted' (argmax over the value set)")
    if n_per_metric < 1:
        raise CogcoreError(f"n_per_metric={n_per_metric}: use at least 1")
    probe_list: list[Probe] = []
    if probes is True:
        probe_list = load_probes()
    elif isinstance(probes, (str, Path)):
        probe_list = load_probes(probes)
    elif probes:
        probe_list = list(probes)
    if len(probe_list) > n_per_metric:
        probe_list = random.Random(f"cogcore-probes-{seed}").sample(probe_list, n_per_metric)
    if world is None and not probe_list:
        raise CogcoreError("evaluate_core has nothing to measure: pass world=World(...) and/or probes=True")

    report = EvalReport(meta={
        "model": getattr(model, "source_dir", type(model).__name__),
        "base_hash": getattr(model, "base_hash", None),
        "params": sum(p.numel() for p in model.parameters()),
        "scoring": scoring, "n_per_metric": n_per_metric, "seed": seed,
        "world": dataclasses.asdict(world.cfg) if world is not None else None,
        "probes": len(probe_list), "seconds": {},
    })
    was_training = model.training
    model.eval()
    try:
        with in_precision(model, precision) as answering:
            # what the replies really came from (a bf16 or quantized model stays as it is)
            report.meta["precision"] = str(next(answering.parameters()).dtype).removeprefix("torch.")
            _evaluate_all(answering, tokenizer, world, probe_list, report, n_per_metric, max_new_tokens, batch_size,
                          scoring, chat, seed, n_samples, progress)
    finally:
        model.train(was_training)
    return report


def _evaluate_all(model, tokenizer, world, probe_list, report, n_per_metric, max_new_tokens, batch_size, scoring,
                  chat, seed, n_samples, progress) -> None:
    if world is not None:
        t0 = time.perf_counter()
        n_world = len(SYNTHETIC_METRICS) * n_per_metric
        with _progress(progress, n_world, f"eval core: synthetic world ({n_world} questions)") as advance:
            _evaluate_world(model, tokenizer, world, report, n_per_metric, batch_size, scoring, seed,
                            n_samples, advance)
        report.meta["seconds"]["world"] = round(time.perf_counter() - t0, 2)
    if probe_list:
        t0 = time.perf_counter()
        use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        report.meta["chat"] = use_chat
        report.meta["max_new_tokens"] = max_new_tokens or 48
        report.meta["stop"] = "first line or sentence"
        n_probe = 3 * len(probe_list)
        with _progress(progress, n_probe, f"eval core: real-world probes ({len(probe_list)} facts x 3 "
                                          "conditions)") as advance:
            _evaluate_probes(model, tokenizer, probe_list, report, max_new_tokens or 48, batch_size, use_chat,
                             n_samples, advance)
        report.meta["seconds"]["probes"] = round(time.perf_counter() - t0, 2)


class _progress:
    """A progress bar (rate, ETA) over one phase's prompts, or nothing; ``with _progress(on, n, what) as advance``.

    tqdm writes to stderr even when it is not a terminal (logs, CI), where a rich live bar prints nothing."""

    def __init__(self, on: bool, total: int, desc: str):
        self.on, self.total, self.desc, self.bar = on, total, desc, None

    def __enter__(self):
        if not self.on:
            return lambda n: None
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, desc=self.desc, unit="prompt", dynamic_ncols=True, disable=False)
        return self.bar.update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _world_prompt(tokenizer, ex: Example) -> list[int]:
    segs = ex.segments()
    cut = next(i for i, s in enumerate(segs) if s["kind"] == "answer")
    return encode_plain(tokenizer, [s["text"] for s in segs[:cut]])


def _evaluate_world(model, tokenizer, world: World, report: EvalReport, n: int, batch_size: int, scoring: str,
                    seed: int, n_samples: int, advance) -> None:
    sets = {name: world.examples(kind, n, seed) for name, kind in SYNTHETIC_METRICS.items()}
    examples = [ex for name in SYNTHETIC_METRICS for ex in sets[name]]
    prompts = [_world_prompt(tokenizer, ex) for ex in examples]
    if scoring == "restricted":
        preds = choose(model, tokenizer, prompts, [ex.values for ex in examples], batch_size=batch_size,
                       progress=advance)
    else:
        longest = max(len(tokenizer(" " + v, add_special_tokens=False).input_ids)
                      for ex in examples for v in ex.values)
        replies = generate(model, tokenizer, prompts, max_new_tokens=longest + 1, batch_size=batch_size,
                           progress=advance)
        preds = [first_word(r) for r in replies]
    k = 0
    for name in SYNTHETIC_METRICS:
        exs, ps = sets[name], preds[k:k + len(sets[name])]
        k += len(exs)
        chance = sum(1 / len(ex.values) for ex in exs) / len(exs)
        report.add(name, [p == ex.answer for p, ex in zip(ps, exs)], chance)
        report.samples[name] = [{"prompt": ex.prompt, "answer": ex.answer, "reply": p} for ex, p in
                                list(zip(exs, ps))[:n_samples]]
        if name == "follows_context":
            report.add("follows_memory", [p == ex.memory_answer for p, ex in zip(ps, exs)], chance)


def _evaluate_probes(model, tokenizer, probes: list[Probe], report: EvalReport, max_new_tokens: int,
                     batch_size: int, chat: bool, n_samples: int, advance) -> None:
    conditions = {"closed_book": None, "open_book": "context", "counter": "counter_context"}
    prompts, keys = [], []
    for cond, attr in conditions.items():
        for p in probes:
            prompts.append(probe_prompt(tokenizer, p.question, getattr(p, attr) if attr else None, chat=chat))
            keys.append((cond, p))
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=advance, stop_at_sentence=True)
    if not chat:
        replies = [_cut_plain_reply(r) for r in replies]
    scored = [(cond, p, r.strip(), score_reply(p, r)) for (cond, p), r in zip(keys, replies)]
    by = {cond: [(p, r, s) for c, p, r, s in scored if c == cond] for cond in conditions}
    report.add("closed_book", [s["correct"] for _, _, s in by["closed_book"]], 0.0)
    report.add("open_book", [s["correct"] for _, _, s in by["open_book"]], 0.0)
    report.add("follows_context_real", [s["follows_context"] for _, _, s in by["counter"]], 0.0)
    report.add("follows_memory_real", [s["follows_memory"] for _, _, s in by["counter"]], 0.0)
    report.add("language_drift_real", [s["drift"] for *_, s in scored], 0.0)
    for cond, name in (("closed_book", "closed_book"), ("open_book", "open_book"), ("counter", "follows_context_real")):
        report.samples[name] = [{"id": p.id, "answer": p.answer, "counterfact": p.counterfact, "reply": r, **s}
                                for p, r, s in by[cond][:n_samples]]
    report.meta["replies"] = {f"{cond}/{p.id}": r for cond, p, r, _ in scored}


# ----------------------------------------------------------------------------- plot

def _metrics_of(result) -> dict:
    if isinstance(result, EvalReport):
        return result.metrics
    return result.get("metrics", result)


def plot_core(results: dict[str, EvalReport | dict], path: str | Path, *, title: str | None = None) -> Path:
    """Save a bar chart: recall (closed book) next to reading (open book) for each model.

    ``results`` maps a model label to an :class:`EvalReport`, its ``to_dict()``, or its metrics.
    Synthetic-world metrics are used when present (``closed_book_recall`` / ``open_book_unseen``),
    else the real-world ones (``closed_book`` / ``open_book``). Chance is a dashed line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise CogcoreError("plot_core needs at least one model's results")
    labels = list(results)
    bars = {"closed book (recall)": [], "open book (reading)": []}
    chances = []
    for label in labels:
        m = _metrics_of(results[label])
        recall = m.get("closed_book_recall") or m.get("closed_book")
        read = m.get("open_book_unseen") or m.get("open_book")
        if recall is None or read is None:
            raise CogcoreError(f"results for '{label}' have no closed-book and open-book metrics "
                               f"(found: {', '.join(m) or 'none'})")
        bars["closed book (recall)"].append(recall["value"])
        bars["open book (reading)"].append(read["value"])
        chances.append(max(recall.get("chance", 0.0), read.get("chance", 0.0)))
    fig = Figure(figsize=(max(4.0, 1.6 * len(labels) + 2), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for k, (name, values) in enumerate(bars.items()):
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        rects = ax.bar(xs, values, width, label=name, color=("#c0504d", "#4f81bd")[k])
        for r, v in zip(rects, values):
            ax.annotate(f"{v:.2f}", (r.get_x() + r.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    for i, c in enumerate(chances):
        if c > 0:
            ax.hlines(c, i - 2 * width * 0.6, i + 2 * width * 0.6, colors="grey", linestyles="dashed",
                      label="chance" if i == 0 else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 1.25)  # headroom for the legend above the bars
    ax.set_ylabel("accuracy")
    ax.set_title(title or "knowledge shedding: recall vs. reading")
    ax.legend(fontsize=8, loc="upper left", ncol=3, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- entry point

@dataclasses.dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec, help="the model to evaluate")
    probes: bool = field(True, help="run the real-world fact probes")
    probes_file: str = field("", help="a probe JSON file (default: the built-in probes)")
    use_world: bool = field(False, help="also run the synthetic-world metrics of world.* (for a model trained on it)")
    world: WorldConfig = field(default_factory=WorldConfig, help="the synthetic world (when use_world)")
    n_per_metric: int = field(200, help="examples per metric (and at most this many probes)")
    max_new_tokens: int = field(48, help="tokens generated per probe reply")
    batch_size: int = field(16, help="prompts generated together (left padding)")
    scoring: Literal["greedy", "restricted"] = field("greedy", help="world answers: strict greedy word, or argmax over the value set")
    chat: Literal["auto", "yes", "no"] = field("auto", help="probe prompts as a chat turn: auto = when the tokenizer has a template")
    device: str = field("auto", help="where the model runs: auto = cuda when a GPU is visible, else cpu; or cpu, cuda, cuda:1")
    seed: int = field(0, help="seed of the example sample")
    precision: Literal["fp32", "bf16"] = field("fp32", help="generate in bf16 from a bf16 copy (about 2x faster on "
                                                            "CPUs with AMX); compare models evaluated alike")
    out: str = field("", help="folder for report.json and core.png (default <home>/runs/eval-core)")

    def __post_init__(self):
        if not self.probes and not self.use_world:
            raise ValueError("eval: nothing to measure; set probes=true and/or use_world=true")
        if self.n_per_metric < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval: n_per_metric, max_new_tokens and batch_size must be >= 1")


def run(cfg: EvalConfig) -> EvalReport:
    """Load the model, run :func:`evaluate_core`, save ``report.json`` and ``core.png``, print the table."""
    out = Path(cfg.out).expanduser() if cfg.out else get_workspace().runs / "eval-core"
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CogcoreError(f"device={cfg.device}: no CUDA device is visible; use device=auto or device=cpu")
    print(f"eval core: loading {cfg.model.source} on {device}", flush=True)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=device)
    probes: bool | str = (cfg.probes_file or True) if cfg.probes else False
    report = evaluate_core(model, tokenizer, world=World(cfg.world) if cfg.use_world else None, probes=probes,
                           n_per_metric=cfg.n_per_metric, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, scoring=cfg.scoring, seed=cfg.seed,
                           chat={"auto": None, "yes": True, "no": False}[cfg.chat], precision=cfg.precision)
    report.meta["config"] = dataclasses.asdict(cfg)
    report.save(out / "report.json")
    plot_core({Path(cfg.model.source).name: report}, out / "core.png")
    report.print(title=f"cognitive-core eval: {cfg.model.source}")
    print(f"saved {out / 'report.json'} and {out / 'core.png'}")
    return report
