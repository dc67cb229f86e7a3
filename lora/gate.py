"""The eval gate: a refreshed adapter is published only if it learned the user's world and
did not get dumber or leak.

Three checks, each reporting its numbers and sample size ``n``:

  (a) **held-out episodes** of the user (``heldout.parquet``) improve over the reference
      (the LIVE version, or the base when there is none): greedy policy accuracy must not drop
      beyond a tolerance (a reply is right when it matches the episode's ``check`` regex, else
      when it starts with / contains the normalised right action), and the weighted CE on the
      policy and world-model segments must go down;
  (b) **brain rot**: a fixed subset of the real-world probes (greedy, scored with
      ``eval.probes.mentions``) must not fall beyond a tolerance below the base, and neither
      may the loss on a fixed general text set (``builtin:chat-arithmetic`` answers). On tiny
      presets probe accuracy is ~0 for every model, so there the loss does the work;
  (c) **no leakage**: other users' held-out specifics (their ``check`` regex, else their right
      action) must not show up in this adapter's replies, to this user's prompts or theirs,
      more often than in the base's replies.

The model is a ``peft.PeftModel`` holding the candidate (and the reference, if any) as named
adapters; the base is the same model with adapters disabled, so nothing is loaded twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from cogcore.train.config import field
from cogcore.train.data import make_batch, pack, read_records, tokenize_record
from cogcore.train.lm import CausalLMLoss

GATE_VERSION = 3  # bump when what the gate measures changes: the cached base numbers are keyed by it


@dataclass
class GateConfig:
    enabled: bool = field(True, help="false publishes without gating (the report says it was skipped)")
    policy_tolerance: float = field(0.0, help="held-out policy accuracy may fall at most this much below the reference")
    heldout_min_gain: float = field(0.0, help="held-out policy and world-model losses must fall by at least this "
                                              "fraction of the reference's (0 = any decrease)")
    max_new_tokens: int = field(48, help="tokens generated per held-out / leakage reply")
    probes: int = field(40, help="real-world probes asked (a fixed, spread-out subset; 0 = skip)")
    probe_max_new_tokens: int = field(24, help="tokens generated per probe reply")
    probe_tolerance: float = field(0.075, help="probe and general-answer accuracy may fall at most this much below "
                                               "the base")
    general_source: str = field("builtin:chat-arithmetic", help="general text whose loss must not rise (data source)")
    general_documents: int = field(64, help="documents of general_source scored (0 = skip)")
    general_loss_tolerance: float = field(0.05, help="general loss may rise at most this fraction above the base's")
    junk_margin_tolerance: float = field(0.5, help="junk margin = CE of generic junk replies (lol, ok, same...) "
                                                   "minus CE of the proper replies, after general prompts and after "
                                                   "the user's held-out requests (nats/token); it may fall at most "
                                                   "this much below the base's")
    leak_users: int = field(8, help="other users whose held-out specifics are checked for leakage (0 = skip)")
    leak_episodes: int = field(4, help="held-out episodes per other user used as leakage prompts")
    leak_tolerance: float = field(0.0, help="leak rate may exceed the base's by at most this much")
    seq_len: int = field(512, help="tokens per packed row when scoring losses")
    precision: Literal["bf16", "fp32"] = field("fp32", help="loss scoring precision: bf16 autocast scores about 2x "
                                                       "faster on CPUs with AMX / AVX512-BF16 and on GPUs (the candidate "
                                                       "and the base are always scored alike); generation is unchanged")
    batch_size: int = field(64, help="prompts generated / rows scored together (the 64 general questions in one batch "
                                     "generate 1.5x faster than in batches of 16 on one CPU thread)")

    def __post_init__(self):
        for name in ("max_new_tokens", "probe_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"gate.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("probes", "general_documents", "leak_users", "leak_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"gate.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("policy_tolerance", "probe_tolerance", "leak_tolerance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"gate.{name} is a rate difference in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.heldout_min_gain < 1 or self.general_loss_tolerance < 0 or self.junk_margin_tolerance < 0:
            raise ValueError("gate.heldout_min_gain must be in [0, 1); general_loss_tolerance, junk_margin_tolerance >= 0")


# ----------------------------------------------------------------------------- model switching

@contextlib.contextmanager
def using(model, adapter: str | None, merged: bool = False):
    """Run ``model`` as the base (``adapter=None``) or with one named adapter active.

    ``merged``: fold the adapter into the base weights for the duration (same function, one matmul
    per layer instead of three): the gate's greedy generation runs 1.19x faster on 2 CPU cores
    (``bench/bench_gate.py``: 1.14-1.25x per kind of prompt, the same replies). The adapted weights
    are copied first and put back after: unmerging alone leaves them ~1e-7 off, which flipped 29k
    of their bf16 roundings and moved a bf16-scored loss by 0.3 %. Only fp32 bases up to
    ``MERGE_COPY_BYTES`` are merged."""
    was_training = model.training
    model.eval()
    if adapter is None:
        with model.disable_adapter():
            yield model
    else:
        before = model.active_adapter
        model.set_adapter(adapter)
        layers = mergeable(model) if merged else []
        saved = [layer.weight.detach().clone() for layer in layers]
        if layers:
            model.merge_adapter([adapter])
        try:
            yield model
        finally:
            if layers:
                model.unmerge_adapter()
                with torch.no_grad():
                    for layer, w in zip(layers, saved):
                        layer.weight.copy_(w)
            model.set_adapter(before)
    model.train(was_training)


MERGE_COPY_BYTES = 2 << 30  # the copy ``using(merged=True)`` keeps of the adapted weights, at most


def mergeable(model) -> list[torch.nn.Linear]:
    """The base layers under the adapters, when merging is exact and cheap: every one a plain fp32
    ``nn.Linear`` (a bf16 or 4-/8-bit weight would round the delta) and their copy within
    ``MERGE_COPY_BYTES``; else none."""
    bases = [m.base_layer for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    if not bases or not all(type(b) is torch.nn.Linear and b.weight.dtype == torch.float32 for b in bases):
        return []
    return bases if sum(b.weight.numel() * 4 for b in bases) <= MERGE_COPY_BYTES else []


# ----------------------------------------------------------------------------- measurements

def weighted_loss(model, tokenizer, records: list[dict], seq_len: int, batch_size: int,
                  precision: str = "fp32") -> tuple[float, int]:
    """Token-weighted CE of ``records`` (segments / chat records) and how many records were scored."""
    docs = [tokenize_record(r, tokenizer, where="gate record") for r in records]
    docs = [d for d in docs if len(d.input_ids) >= 2 and sum(d.weights) > 0]
    if not docs:
        return float("nan"), 0
    rows = pack(docs, seq_len, tokenizer.pad_token_id, packing=True)
    # no collectives here: under --nproc only rank 0 gates while the others wait at a barrier
    device = next(model.parameters()).device
    scorer = CausalLMLoss(model)
    loss_sum, weight = 0.0, 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        for s in range(0, len(rows), batch_size):
            batch = make_batch(rows, torch.arange(s, min(s + batch_size, len(rows))))
            out = scorer({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            loss_sum += float(out["loss_sum"])
            weight += float(out["weight"])
    return loss_sum / max(weight, 1e-9), len(docs)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt tokenized exactly as training tokenizes a weight-0 segment."""
    return tokenize_record({"segments": [{"text": text, "weight": 0.0}]}, tokenizer, add_eos=False).input_ids


def replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
            memo: dict | None = None, who: str = "") -> list[str]:
    """Greedy replies. With ``memo``, a reply of ``who`` (the base, or an adapter name) to a prompt
    already asked is reused: the gate asks the base the same held-out prompts as a reference, as
    leakage prompts, and again for every other user it gates."""
    from cogcore.eval.core import generate
    if memo is None:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    key = lambda p: (who, tuple(p), max_new_tokens)  # noqa: E731
    todo = list({key(p): p for p in prompts if key(p) not in memo}.values())
    if todo:
        for p, r in zip(todo, generate(model, tokenizer, todo, max_new_tokens=max_new_tokens, batch_size=batch_size)):
            memo[key(p)] = r
    return [memo[key(p)] for p in prompts]


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def acts_right(reply: str, check: str, right_action: str) -> bool:
    """The episode's ``check`` regex when there is one, else the normalised right action is the
    reply's start (or appears in it)."""
    if check:
        return bool(re.search(check, reply))
    want, got = normalise(right_action), normalise(reply)
    return bool(want) and (got.startswith(want) or want in got)


def fixed_probes(n: int, exclude: frozenset[str] | set[str] = frozenset()):
    """``n`` real-world probes spread over the whole file (every category), always the same ones;
    questions in ``exclude`` are skipped (a check that must stay apart from the gate's own)."""
    from cogcore.eval.probes import load_probes
    if n <= 0:
        return []
    probes = [p for p in load_probes() if p.question not in exclude]
    step = max(1, len(probes) // n)
    return probes[::step][:n]


def general_records(cfg: GateConfig) -> list[dict]:
    if cfg.general_documents <= 0:
        return []
    # a fixed seed, apart from any training data's: the same documents for every gate
    return read_records(cfg.general_source, builtin_size=cfg.general_documents, seed=1234)[: cfg.general_documents]


# Generic low-information replies (not the demo's planted junk): a brain-rotted model finds them
# likely answers to anything. Their CE after general prompts is the loss-side brain-rot probe.
JUNK_REPLIES = ("lol", "ok", "same", "haha yes", "omg this!!!", "nice", "idk lol", "true true true", "k",
                "follow for more", "yes yes yes", "😂😂😂")


def reply_record(prompt: str, reply: str, tokenizer) -> dict:
    """A ``segments`` record scoring only ``reply`` (and the end of the turn) after ``prompt``."""
    from cogcore.memory.formats import reply_end
    return {"segments": [{"text": prompt, "weight": 0.0}, {"text": reply + reply_end(tokenizer), "weight": 1.0}]}


def junk_records(prompts: list[str], tokenizer) -> list[dict]:
    """Each prompt followed by two junk replies (only the reply is scored)."""
    return [reply_record(p, JUNK_REPLIES[(2 * i + k) % len(JUNK_REPLIES)], tokenizer)
            for i, p in enumerate(prompts) for k in (0, 1)]


def prompt_text(segments: list[dict]) -> str:
    """The prompt of a segments example: everything before its first trained segment."""
    out = []
    for s in segments:
        if float(s.get("weight", 1.0)) > 0:
            break
        out.append(s["text"])
    return "".join(out)


def general_prompt_texts(tokenizer, records: list[dict]) -> list[tuple[str, str]]:
    """(prompt text, expected answer) of the chat / prompt-completion records among ``records``."""
    from cogcore.memory.formats import render_prompt
    out = []
    for r in records:
        if "messages" in r and r["messages"] and r["messages"][-1]["role"] == "assistant":
            out.append((render_prompt(tokenizer, r["messages"][:-1]), r["messages"][-1]["content"]))
        elif "prompt" in r and "completion" in r:
            out.append((r["prompt"], r["completion"]))
    return out


def _answer_hit(reply: str, want: str) -> bool:
    """The expected answer's result — its last word: 173 of "85 + 88 = 173.", cold of "The opposite
    of hot is cold." — is a word of the reply. The result counts, not its wording: a model that
    answers "The sum is 173" knows the sum as well as one that says "85 + 88 = 173"."""
    result = re.findall(r"-?\w+", want)
    return bool(result) and re.search(rf"(?<![\w-]){re.escape(result[-1])}(?!\w)", reply, re.I) is not None


def probe_questions(tokenizer, cfg: GateConfig) -> tuple[list, list[list[int]]]:
    """The gate's real-world probes and their prompts."""
    from cogcore.eval.core import probe_prompt
    probes = fixed_probes(cfg.probes)
    return probes, [probe_prompt(tokenizer, p.question) for p in probes]


def general_questions(tokenizer, cfg: GateConfig) -> tuple[list[dict], list[tuple[str, str]], list[list[int]]]:
    """The general set's records, its (question, answer) pairs and the questions' prompts."""
    recs = general_records(cfg)
    qa = general_prompt_texts(tokenizer, recs)
    return recs, qa, [prompt_ids(tokenizer, q) for q, _ in qa]


def heldout_prompts(tokenizer, heldout: list[dict]) -> tuple[list[dict], list[list[int]]]:
    """The held-out rows with a policy example, and their prompts."""
    rows = [h for h in heldout if h.get("policy_segments")]
    return rows, [prompt_ids(tokenizer, prompt_text(h["policy_segments"])) for h in rows]


def general_metrics(model, tokenizer, cfg: GateConfig, memo: dict | None = None, who: str = "") -> dict:
    """What brain rot would damage, measured on whatever ``model`` currently is: real-world probe
    accuracy, answers to the general set's questions, general-text loss and junk-reply loss."""
    from cogcore.eval.probes import mentions
    out: dict = {}
    probes, asked = probe_questions(tokenizer, cfg)
    if probes:
        got = replies(model, tokenizer, asked, cfg.probe_max_new_tokens, cfg.batch_size, memo, who)
        hits = [mentions(r, p.answers, p.case_sensitive) for p, r in zip(probes, got)]
        out["probe_accuracy"] = {"value": sum(hits) / len(hits), "n": len(hits), "hits": [bool(h) for h in hits],
                                 "samples": [{"q": p.question, "reply": r} for p, r in zip(probes[:3], got[:3])]}
    recs, qa, asked = general_questions(tokenizer, cfg)
    if qa:
        # the reply budget of held-out replies: a chatty core ("To add 85 and 88, we ...") states its
        # result after 24 tokens, and a cut reply would count its verbosity, not its arithmetic
        got = replies(model, tokenizer, asked, cfg.max_new_tokens, cfg.batch_size, memo, who)
        hits = [_answer_hit(r, want) for (_, want), r in zip(qa, got)]
        out["answer_accuracy"] = {"value": sum(hits) / len(hits), "n": len(hits), "hits": [bool(h) for h in hits],
                                  "samples": [{"want": w, "reply": r} for (_, w), r in zip(qa[:3], got[:3])]}
    if recs:  # questions score the answer and its end only, exactly like the junk replies below
        proper = [reply_record(q, want, tokenizer) for q, want in qa] if qa else recs
        loss, n = weighted_loss(model, tokenizer, proper, cfg.seq_len, cfg.batch_size, cfg.precision)
        out["general_loss"] = {"value": loss, "n": n}
    if qa:
        loss, n = weighted_loss(model, tokenizer, junk_records([q for q, _ in qa], tokenizer), cfg.seq_len,
                                cfg.batch_size, cfg.precision)
        out["junk_loss"] = {"value": loss, "n": n}
    return out


def heldout_junk_loss(model, tokenizer, heldout: list[dict], cfg: GateConfig) -> dict:
    """CE of generic junk replies after the user's own held-out requests (brain rot on the user's turf)."""
    prompts = [prompt_text(h["policy_segments"]) for h in heldout if h.get("policy_segments")]
    if not prompts:
        return {}
    loss, n = weighted_loss(model, tokenizer, junk_records(prompts, tokenizer), cfg.seq_len, cfg.batch_size, cfg.precision)
    return {"value": loss, "n": n}


def junk_margin(junk: dict | None, proper: dict | None) -> dict | None:
    if not junk or not proper or not junk.get("n") or not proper.get("n"):
        return None
    return {"value": junk["value"] - proper["value"], "n": junk["n"],
            "samples": [{"junk_loss": junk["value"], "proper_loss": proper["value"]}]}


def _policy_loss(model, tokenizer, heldout: list[dict], cfg: GateConfig) -> dict:
    recs = [{"segments": h["policy_segments"]} for h in heldout if h.get("policy_segments")]
    if not recs:
        return {}
    loss, n = weighted_loss(model, tokenizer, recs, cfg.seq_len, cfg.batch_size, cfg.precision)
    return {"value": loss, "n": n}


def heldout_metrics(model, tokenizer, heldout: list[dict], cfg: GateConfig, memo: dict | None = None,
                    who: str = "") -> dict:
    """Policy accuracy, policy loss and world-model loss on a user's held-out episodes."""
    out: dict = {}
    with_policy, asked = heldout_prompts(tokenizer, heldout)
    if with_policy:
        got = replies(model, tokenizer, asked, cfg.max_new_tokens, cfg.batch_size, memo, who)
        hits = [acts_right(r, h.get("check", ""), h.get("right_action", "")) for h, r in zip(with_policy, got)]
        out["policy_accuracy"] = {"value": sum(hits) / len(hits), "n": len(hits),
                                  "samples": [{"episode": h.get("episode_id"), "reply": r}
                                              for h, r in zip(with_policy[:3], got[:3])]}
        out["policy_loss"] = _policy_loss(model, tokenizer, with_policy, cfg)
    world = [{"segments": h["world_segments"]} for h in heldout if h.get("world_segments")]
    if world:
        loss, n = weighted_loss(model, tokenizer, world, cfg.seq_len, cfg.batch_size, cfg.precision)
        out["world_loss"] = {"value": loss, "n": n}
    return out


def leak_patterns(user_heldout: list[dict], others: dict[str, list[dict]]) -> list[tuple[str, re.Pattern | str]]:
    """(other user, what would betray them): their check regex, else their normalised right action.

    A specific that this user's own right actions also show is a shared rule, not a leak."""
    own = [h.get("right_action", "") for h in user_heldout]
    out = []
    for other, rows in sorted(others.items()):
        seen = set()
        for h in rows:
            check, right = h.get("check", ""), h.get("right_action", "")
            if check:
                pat = re.compile(check)
                if check in seen or any(pat.search(a) for a in own):
                    continue
                seen.add(check)
                out.append((other, pat))
            elif normalise(right) and not any(normalise(right) in normalise(a) for a in own):
                out.append((other, normalise(right)))
    return out


def _leaks(reply: str, patterns: list) -> bool:
    for _, p in patterns:
        if isinstance(p, re.Pattern):
            if p.search(reply):
                return True
        elif p in normalise(reply):
            return True
    return False


def leak_rate(model, tokenizer, prompts: list[list[int]], patterns: list, cfg: GateConfig, memo: dict | None = None,
              who: str = "") -> dict:
    got = replies(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, memo, who)
    hits = [_leaks(r, patterns) for r in got]
    return {"value": sum(hits) / len(hits) if hits else 0.0, "n": len(hits),
            "samples": [r for r, h in zip(got, hits) if h][:3]}


# ----------------------------------------------------------------------------- the gate

def paired_change(before: list[bool], after: list[bool]) -> dict:
    """Right/wrong per question, before and after, on the same questions: how many were lost and
    gained, and the exact one-sided sign-test (McNemar) p-value of losing at least that many of
    the changed ones if a change were as likely to go either way. Reported next to the gate's
    fixed tolerance, which it does not replace: at n = 64 and a 10 % base rate, a drop of a few
    answers is within noise, and this says how far within."""
    lost = sum(b and not a for b, a in zip(before, after))
    gained = sum(a and not b for b, a in zip(before, after))
    n = lost + gained
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0
    return {"lost": lost, "gained": gained, "p_value_worse": p}


def _base_general(model, tokenizer, cfg: GateConfig, cache_dir: Path | None, base_tag: str) -> dict:
    """The base's general metrics, cached per base and gate settings (the same for every user)."""
    key = hashlib.sha256(json.dumps([GATE_VERSION, base_tag, cfg.probes, cfg.probe_max_new_tokens, cfg.general_source,
                                     cfg.general_documents, cfg.seq_len, cfg.precision, cfg.batch_size,  # padding moves greedy ties
                                     cfg.max_new_tokens]).encode()).hexdigest()[:16]
    path = cache_dir / f"gate-base-{key}.json" if cache_dir is not None and base_tag else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    with using(model, None):
        out = general_metrics(model, tokenizer, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    return out


def gate(model, tokenizer, *, user: str, heldout: list[dict], cfg: GateConfig, candidate: str = "default",
         reference: str | None = None, reference_name: str = "base", others: dict[str, list[dict]] | None = None,
         cache_dir: Path | None = None, base_tag: str = "", memo: dict | None = None) -> dict:
    """Compare the ``candidate`` adapter of the PeftModel ``model`` with ``reference`` (another
    adapter name, or None for the base) and the base. Returns a JSON-able report with
    ``passed`` (bool), ``reasons`` (why not, one line each) and ``criteria`` (numbers and n).
    ``memo``: the base's replies, shared by the gates of several users over one base."""
    t0 = time.time()
    if not cfg.enabled:
        return {"passed": True, "skipped": True, "reasons": [], "criteria": {}, "user": user,
                "note": "gate.enabled=false: published without gating"}
    criteria: dict[str, dict] = {}
    reasons: list[str] = []

    def judge(name: str, new: dict | None, ref: dict | None, *, lower_is_better: bool, allowed: float,
              relative: bool, against: str, strict: bool = False) -> None:
        if not new or not ref or new.get("n", 0) == 0 or new["value"] != new["value"]:
            criteria[name] = {"passed": True, "n": 0, "note": "no data"}
            return
        v, r = new["value"], ref["value"]
        if lower_is_better and strict:  # must improve by at least the relative gain `allowed`
            limit = r * (1 - allowed)
            ok, word = v < r and v <= limit, "did not fall enough"
        elif lower_is_better:
            limit = r * (1 + allowed) if relative else r + allowed
            ok, word = v <= limit, "rose"
        else:
            limit = r * (1 - allowed) if relative else r - allowed
            ok, word = v >= limit, "fell"
        criteria[name] = {"passed": ok, "value": v, "reference": r, "against": against, "limit": limit,
                          "n": new["n"], **({"samples": new["samples"]} if "samples" in new else {})}
        if len(new.get("hits") or []) == len(ref.get("hits") or []) > 0:  # the same questions, asked of both
            criteria[name]["paired"] = paired_change(ref["hits"], new["hits"])
        if not ok:
            pc = criteria[name].get("paired")
            why = f"; paired: lost {pc['lost']}, gained {pc['gained']}, p={pc['p_value_worse']:.2g}" if pc else ""
            reasons.append(f"{name} {word}: {v:.4f} vs {against} {r:.4f} (limit {limit:.4f}, n={new['n']}{why})")

    # the other users' held-out prompts for (c), and what in a reply would betray them
    others = {u: rows[: cfg.leak_episodes] for u, rows in list(sorted((others or {}).items()))[: cfg.leak_users]}
    patterns = leak_patterns(heldout, others)
    leak_prompts = heldout_prompts(tokenizer, heldout + [h for rows in others.values() for h in rows])[1] \
        if patterns else []

    # a bar over the gate's measurements (each a few seconds to a minute on CPU)
    from tqdm.auto import tqdm
    bar = tqdm(total=7 if patterns else 5, desc=f"gate {user}", unit="check", dynamic_ncols=True, leave=False)

    def done(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)

    # the reference and the base first, then the candidate in one block with its adapter merged
    # (one merge per gate). The base's replies go into ``memo``: the same prompts come back as a
    # reference, as leakage prompts, and in every other user's gate.
    memo = {} if memo is None else memo
    with using(model, reference):
        ref_held = heldout_metrics(model, tokenizer, heldout, cfg, memo if reference is None else None, "base")
    done(f"held-out: {reference_name}")
    base_gen = _base_general(model, tokenizer, cfg, cache_dir, base_tag)
    done("general: base")
    with using(model, None):
        base_gen = {**base_gen, "heldout_junk_loss": heldout_junk_loss(model, tokenizer, heldout, cfg)}
        base_held = ref_held if reference is None else {
            "policy_loss": _policy_loss(model, tokenizer, heldout, cfg)}
        done("junk on the user's prompts: base")
        base_leak = leak_rate(model, tokenizer, leak_prompts, patterns, cfg, memo, "base") if patterns else None
    if patterns:
        done("leakage: base")
    # the candidate: every reply generated with its adapter merged, then the metrics with it
    # unmerged (they find their replies in ``mine``): bf16 loss scoring would round a merged delta
    # to the base weight's precision, generation runs in the model's own fp32
    mine: dict = {}
    bar.set_postfix_str("candidate: generating its replies")
    with using(model, candidate, merged=True):
        for prompts, max_new in ((heldout_prompts(tokenizer, heldout)[1] + leak_prompts, cfg.max_new_tokens),
                                 (probe_questions(tokenizer, cfg)[1], cfg.probe_max_new_tokens),
                                 (general_questions(tokenizer, cfg)[2], cfg.max_new_tokens)):
            replies(model, tokenizer, prompts, max_new, cfg.batch_size, mine, candidate)
    with using(model, candidate):
        new_held = heldout_metrics(model, tokenizer, heldout, cfg, mine, candidate)
        done("held-out: candidate")
        new_gen = general_metrics(model, tokenizer, cfg, mine, candidate)
        new_gen["heldout_junk_loss"] = heldout_junk_loss(model, tokenizer, heldout, cfg)
        done("general: candidate")
        new_leak = leak_rate(model, tokenizer, leak_prompts, patterns, cfg, mine, candidate) if patterns else None
    if patterns:
        done("leakage: candidate")

    # (a) the user's held-out episodes: candidate vs the LIVE version (or the base)
    judge("heldout_policy_accuracy", new_held.get("policy_accuracy"), ref_held.get("policy_accuracy"),
          lower_is_better=False, allowed=cfg.policy_tolerance, relative=False, against=reference_name)
    judge("heldout_policy_loss", new_held.get("policy_loss"), ref_held.get("policy_loss"), lower_is_better=True,
          allowed=cfg.heldout_min_gain, relative=True, against=reference_name, strict=True)
    judge("heldout_world_loss", new_held.get("world_loss"), ref_held.get("world_loss"), lower_is_better=True,
          allowed=cfg.heldout_min_gain, relative=True, against=reference_name, strict=True)

    # (b) brain rot vs the base: general probes, answers, junk replies and losses; junk on the user's prompts
    judge("general_probe_accuracy", new_gen.get("probe_accuracy"), base_gen.get("probe_accuracy"),
          lower_is_better=False, allowed=cfg.probe_tolerance, relative=False, against="base")
    judge("general_answer_accuracy", new_gen.get("answer_accuracy"), base_gen.get("answer_accuracy"),
          lower_is_better=False, allowed=cfg.probe_tolerance, relative=False, against="base")
    judge("general_loss", new_gen.get("general_loss"), base_gen.get("general_loss"), lower_is_better=True,
          allowed=cfg.general_loss_tolerance, relative=True, against="base")
    # junk margin = CE(junk reply) - CE(proper reply) after the same prompts: how much more surprising
    # "lol" is than the right answer. Brain rot shrinks it; learning the user's world does not.
    judge("general_junk_margin", junk_margin(new_gen.get("junk_loss"), new_gen.get("general_loss")),
          junk_margin(base_gen.get("junk_loss"), base_gen.get("general_loss")), lower_is_better=False,
          allowed=cfg.junk_margin_tolerance, relative=False, against="base")
    judge("heldout_junk_margin", junk_margin(new_gen.get("heldout_junk_loss"), new_held.get("policy_loss")),
          junk_margin(base_gen.get("heldout_junk_loss"), base_held.get("policy_loss")), lower_is_better=False,
          allowed=cfg.junk_margin_tolerance, relative=False, against="base")

    # (c) leakage of other users' held-out specifics, on this user's prompts and theirs
    if patterns:
        judge("leakage", new_leak, base_leak, lower_is_better=True, allowed=cfg.leak_tolerance, relative=False,
              against="base")
        criteria["leakage"]["other_users"] = sorted(others)
    else:
        criteria["leakage"] = {"passed": True, "n": 0, "note": "no other users' held-out specifics to check"}
    bar.close()

    return {"passed": not reasons, "reasons": reasons, "criteria": criteria, "user": user,
            "reference": reference_name, "config": asdict(cfg), "elapsed_s": round(time.time() - t0, 2)}


def gate_table(report: dict, title: str):
    """A rich table of a gate report: one row per criterion."""
    from rich.table import Table
    t = Table(title=title)
    for col in ("criterion", "ok", "candidate", "reference", "limit", "n", "paired"):
        t.add_column(col, justify="left" if col == "criterion" else "right")
    for name, c in report.get("criteria", {}).items():
        if "value" not in c:
            t.add_row(name, "-", c.get("note", ""), "", "", str(c.get("n", 0)), "")
            continue
        pc = c.get("paired")
        paired = f"-{pc['lost']} +{pc['gained']} p={pc['p_value_worse']:.2g}" if pc else ""
        t.add_row(name, "yes" if c["passed"] else "NO", f"{c['value']:.4f}",
                  f"{c['reference']:.4f} ({c['against']})", f"{c['limit']:.4f}", str(c["n"]), paired)
    return t


def heldout_records(rows: list[dict]) -> list[dict]:
    """Parquet rows → plain dicts with list segments (pyarrow gives lists already; numpy arrays otherwise)."""
    out = []
    for r in rows:
        r = dict(r)
        for k in ("policy_segments", "world_segments"):
            segs = r.get(k)
            r[k] = [dict(s) for s in segs] if segs is not None and len(segs) else []
        out.append(r)
    return out


def other_users_heldout(user: str, limit_users: int) -> dict[str, list[dict]]:
    """The held-out rows of the latest sets of up to ``limit_users`` other users."""
    from cogcore.memory.consolidate import latest_set, sets_root
    out: dict[str, list[dict]] = {}
    root = sets_root()
    if limit_users <= 0 or not root.is_dir():
        return out
    for other in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != user
                        and not p.name.startswith(".")):
        cset = latest_set(other)
        rows = heldout_records(cset.heldout()) if cset is not None and cset.heldout_path.is_file() else []
        if rows:
            out[other] = rows
        if len(out) >= limit_users:
            break
    return out
