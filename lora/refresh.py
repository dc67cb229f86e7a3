"""Recipe: refresh one user's LoRA adapter on their consolidated experience, gate it, publish it.

    cogcore refresh --user alice
    cogcore refresh --user alice --config configs/refresh/tiny.yaml lora.r=8 train.max_steps=40
    cogcore refresh --all-due                 # every user whose latest set is newer than their LIVE adapter

Reads top to bottom: the user's latest ConsolidatedSet (policy / world / replay rows with
per-segment loss weights) → the base model (fresh each cycle; warm start from the LIVE
adapter as an option; NF4 base for QLoRA) → a PEFT LoRA → the one training loop (exact
resume; the run lives in <home>/runs/refresh-<user>-set<N>) → the eval gate → publish to the
registry, or record the refusal (gate.json in the run) and keep the previous version LIVE.
A per-user lock means two refreshes of one user never train at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from cogcore.memory.consolidate import ConsolidatedSet, latest_set, load_set
from cogcore.train import checkpoint
from cogcore.train.config import CogcoreError, ConfigError, describe, field, load_config, save_config
from cogcore.train.distributed import DistInfo, barrier, broadcast_object, setup
from cogcore.train.lm import decoder_hidden, output_weight
from cogcore.train.loop import TrainConfig, TrainResult, print_summary, train
from cogcore.train.model import ModelSpec, base_hash, load_model, load_tokenizer, resolve
from cogcore.train.workspace import get_workspace

from .gate import (
    GateConfig,
    gate,
    gate_probes,
    gate_table,
    heldout_records,
    may_back_off,
    other_users_heldout,
    scaled_adapter,
)
from .grouped import (
    base_hidden_for_kl,
    layers_to_transform,
    model_layers,
    pack_user_rows_kl,
    rows_loss_sum,
    train_adapters_grouped,
)
from .registry import AdapterArtifact, AdapterRegistry, check_user

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = ("policy", "world", "replay")


@dataclass
class LoraSpec:
    r: int = field(16, help="LoRA rank")
    alpha: float = field(32.0, help="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = field(0.0, help="LoRA dropout")
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR), help="names of the linear layers that get adapters")
    rslora: bool = field(False, help="rank-stabilised scale alpha / sqrt(r)")
    layers: list[int] = field(default_factory=list, help="decoder layers that get adapters, by index (PEFT's "
                              "layers_to_transform; negative counts from the last, so [-15,...,-1] is the upper 15); "
                              "empty = every layer")

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1 for a refresh, got {self.r}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one linear layer (e.g. q_proj,v_proj)")

    def for_model(self, model: nn.Module) -> LoraSpec:
        """This spec with its layer indices checked against ``model`` (negative ones counted from the last)."""
        return dataclasses.replace(self, layers=model_layers(model, self.layers))

    def peft_config(self) -> dict:
        """The peft.LoraConfig fields this spec stands for (also what the registry records)."""
        return {"r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.targets), "use_rslora": self.rslora, "task_type": "CAUSAL_LM",
                **layers_to_transform(self.layers)}


@dataclass
class RefreshData:
    set_version: int = field(0, help="the user's consolidated set to train on (0 = the latest)")
    seq_len: int = field(512, help="tokens per packed row")
    packing: bool = field(True, help="pack several examples per row (block-diagonal attention)")
    policy_scale: float = field(1.0, help="multiplies the set's loss weights on policy rows")
    world_scale: float = field(1.0, help="multiplies the set's loss weights on world-model rows")
    replay_scale: float = field(1.0, help="multiplies the set's loss weights on replay rows")
    replay_answers: Literal["set", "base"] = field("set", help="answers the replay rows are trained on: the set's own "
                                                   "('set'), or the base model's greedy reply to each replay prompt "
                                                   "('base': self-distillation, so the adapter keeps answering general "
                                                   "prompts the way the core does)")
    replay_max_new_tokens: int = field(64, help="longest base reply generated per replay prompt (replay_answers=base)")
    replay_loss: Literal["ce", "kl", "kl+ce"] = field("ce", help="how replay rows train: cross-entropy on their answers "
                                                    "('ce'), KL from the base's own next-token distribution on those "
                                                    "answer tokens ('kl': the adapter is held to all the core would say "
                                                    "there, not only its top answer; the base runs once more on those "
                                                    "rows, no grad), or the sum of both ('kl+ce')")
    replay_rows: Literal["apart", "mixed"] = field("apart", help="with replay_loss kl / kl+ce: replay packed into rows "
                                                   "of its own ('apart'), or among the user's rows ('mixed': every "
                                                   "row holding a replay token also goes through the base)")

    def __post_init__(self):
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len={self.seq_len} is too short; use at least 8 tokens")
        if self.set_version < 0:
            raise ValueError(f"data.set_version must be >= 0 (0 = latest), got {self.set_version}")
        for t in TARGETS:
            if getattr(self, f"{t}_scale") < 0:
                raise ValueError(f"data.{t}_scale must be >= 0")
        if self.replay_max_new_tokens < 1:
            raise ValueError(f"data.replay_max_new_tokens must be >= 1, got {self.replay_max_new_tokens}")


def _refresh_train() -> TrainConfig:
    return TrainConfig(max_steps=100, micro_batch=4, lr=2e-4, warmup_steps=5, save_every=25)


@dataclass
class RefreshConfig:
    user: str = field("", help="whose adapter to refresh (set by --user)")
    out: str = field("", help="run directory (default <home>/runs/refresh-<user>-set<N>)")
    model: ModelSpec = field(default_factory=ModelSpec, help="the shared base; model.quantize=nf4 for QLoRA")
    lora: LoraSpec = field(default_factory=LoraSpec, help="the adapter")
    train: TrainConfig = field(default_factory=_refresh_train, help="the training loop")
    data: RefreshData = field(default_factory=RefreshData, help="the consolidated set and its loss weights")
    gate: GateConfig = field(default_factory=GateConfig, help="what a refreshed adapter must pass to be published")
    warm_start: bool = field(False, help="start from the LIVE adapter instead of a fresh LoRA on the base")
    lock_timeout: float = field(0.0, help="seconds to wait while another refresh of this user runs (0 = fail at once)")

    def __post_init__(self):
        if self.user:
            try:
                check_user(self.user)
            except CogcoreError as e:
                raise ValueError(f"user: {e}") from None
        if self.lock_timeout < 0:
            raise ValueError("lock_timeout must be >= 0 seconds")
        if self.out and not self.user:
            raise ValueError("out needs a user: one run directory per user")


@dataclass
class RefreshResult:
    user: str
    set_version: int
    run_dir: str
    passed: bool | None           # None: training stopped early (stop_after), nothing gated
    published: str | None         # "alice@v3" when the gate passed
    live: str | None              # what serves after this refresh
    reasons: list[str]
    train: TrainResult | None = None
    gate: dict | None = None


# ----------------------------------------------------------------------------- steps shared with --all-due

def _kl_target(data: RefreshData) -> str | None:
    return "replay" if data.replay_loss != "ce" else None


def _kl_ce_weight(data: RefreshData) -> float:
    return 1.0 if data.replay_loss == "kl+ce" else 0.0


class AdapterLoss(nn.Module):
    """The refresh objective on a PEFT model: weighted cross-entropy, except on the tokens flagged
    ``kl_token`` (replay, with ``data.replay_loss=kl``), where the adapter's next-token distribution
    is pulled to the base's (the same model with its adapter disabled)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, kl_ce_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.kl_ce_weight = kl_ce_weight

    def forward(self, batch: dict) -> dict:
        base_hidden = base_hidden_for_kl(self.model, batch, self.model.disable_adapter)
        hidden = decoder_hidden(self.model, batch)
        loss_sum = rows_loss_sum(hidden, base_hidden, batch.get("kl_token"), output_weight(self.model), batch,
                                 chunk_size=self.chunk_size, kl_ce_weight=self.kl_ce_weight)
        return {"loss_sum": loss_sum, "weight": batch["target_weights"].sum()}


def find_set(user: str, version: int = 0) -> ConsolidatedSet:
    """The user's consolidated set ``version`` (0 = the latest), or a CogcoreError saying what to run."""
    cset = load_set(user, version) if version else latest_set(user)
    if cset is None:
        raise CogcoreError(f"{user} has no consolidated set yet: run `cogcore memory consolidate --user {user}` "
                           "(or `cogcore sleep`) first")
    return cset


def set_records(cset: ConsolidatedSet, data: RefreshData) -> list[dict]:
    """train.parquet rows as ``segments`` records, loss weights scaled per target (policy / world / replay)."""
    if not cset.train_path.is_file():
        raise CogcoreError(f"{cset.train_path} is missing: the consolidated set is incomplete; consolidate again")
    out = []
    for row in cset.train_records():
        scale = getattr(data, f"{row['target']}_scale")
        out.append({"segments": [{"text": s["text"], "weight": float(s["weight"]) * scale} for s in row["segments"]],
                    "target": row["target"]})
    return out


@torch.no_grad()
def answer_replay_with_base(model, tokenizer, records: list[dict], max_new_tokens: int, quiet: bool = False,
                            precision: str = "fp32") -> list[dict]:
    """Self-distillation replay: every replay row's answer becomes the base model's own greedy
    reply to the row's prompt. Trained on these, an adapter learns its user's rules while it is
    pulled back to what the core itself says on general prompts, instead of to a dataset's
    wording (which moves the core too). ``model`` must be the plain base (no adapter active).
    A reply cut at ``max_new_tokens`` is no answer: its row keeps the set's own answer (trained on
    the base's unfinished "To add 30 and 2, we need to combine the numbers...", a demo user's
    adapter answered 2 of the gate's 64 sums against the base's 7). Rows without a prompt (plain
    text) are kept as they are."""
    from cogcore.eval.core import generate, in_precision
    from cogcore.memory.formats import render_prompt, reply_end

    from .gate import prompt_ids, prompt_text
    # the assistant header a chat template puts before a reply: part of the prompt when generating
    bare = [{"role": "user", "content": "x"}]
    header = ""
    if getattr(tokenizer, "chat_template", None):
        header = render_prompt(tokenizer, bare)[len(tokenizer.apply_chat_template(bare, tokenize=False)):]
    jobs: dict[str, list[tuple[int, str, float]]] = {}   # prompt text -> (row, its own prompt, its weight)
    for i, r in enumerate(records):
        segs = r["segments"]
        trained = next((s for s in segs if float(s["weight"]) > 0), None)
        prompt = prompt_text(segs)
        if r.get("target") != "replay" or trained is None or not prompt.strip():
            continue
        lead = header if header and trained["text"].startswith(header) else ""
        jobs.setdefault(prompt + lead, []).append((i, prompt, float(trained["weight"])))
    if not jobs:
        return records
    t0 = time.time()
    prompts = list(jobs)
    # one batch of 32 prompts: 14.2 s on 2 CPU cores, against 19.6-23.5 s in batches of 16
    with in_precision(model, precision) as g:  # bf16: the weights a bf16 server answers with, 2x faster on AMX
        got = generate(g, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                       batch_size=64)
    out = list(records)
    end = reply_end(tokenizer)
    n_cut = 0
    for prompt, reply in zip(prompts, got):
        reply = reply.strip()
        if len(tokenizer(reply, add_special_tokens=False).input_ids) >= max_new_tokens - 1:
            n_cut += 1  # it did not end within the budget: the set's answer stays
            continue
        for i, own_prompt, weight in jobs[prompt]:
            out[i] = {**records[i], "segments": [{"text": own_prompt, "weight": 0.0},
                                                 {"text": prompt[len(own_prompt):] + reply + end, "weight": weight}]}
    if not quiet:
        print(f"replay: {len(prompts) - n_cut} of {len(prompts)} general prompts answered by the base itself in "
              f"{time.time() - t0:.0f} s (self-distillation replay; {n_cut} replies cut at {max_new_tokens} tokens "
              "keep the set's answer)", flush=True)
    return out


def answered_replay(model, tokenizer, records: dict[str, list[dict]], data: RefreshData, di: DistInfo,
                    precision: str = "fp32") -> dict:
    """Each user's records, their replay rows answered by the base when ``data.replay_answers=base``
    (one generation pass for all users, in the refresh's ``precision``); ``model`` is the plain base."""
    if data.replay_answers != "base":
        return records
    users = sorted(records)
    flat = answer_replay_with_base(model, tokenizer, [r for u in users for r in records[u]],
                                   data.replay_max_new_tokens, quiet=not di.is_main, precision=precision)
    out, start = {}, 0
    for u in users:
        out[u], start = flat[start:start + len(records[u])], start + len(records[u])
    return out


def add_lora(model, spec: LoraSpec):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    return get_peft_model(model, PeftLoraConfig(**spec.for_model(model).peft_config()))


def default_run_dir(user: str, set_version: int) -> Path:
    return get_workspace().runs / f"refresh-{user}-set{set_version}"


def base_tag(spec: ModelSpec, base: str) -> str:
    """What the gate's cached base numbers depend on: the weights and how they are loaded."""
    return f"{base}-{spec.quantize}-{spec.dtype}"


@contextlib.contextmanager
def refresh_lock(registry: AdapterRegistry, user: str, timeout: float, di: DistInfo):
    """The per-user refresh lock, taken by rank 0; every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        error = None
        if di.is_main:
            try:
                stack.enter_context(registry.lock(user, "refresh", timeout=timeout))
            except CogcoreError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise CogcoreError(error)
        yield


def gate_and_publish(model, tokenizer, cfg: RefreshConfig, *, user: str, cset, adapter_dir: Path, run_dir: Path,
                     base: str, registry: AdapterRegistry, candidate: str = "default",
                     lineage: dict | None = None, memo: dict | None = None) -> tuple[dict, AdapterArtifact | None]:
    """Gate the ``candidate`` adapter of PeftModel ``model`` against the user's LIVE version (or
    the base), write gate.json into the run, publish when it passes. Rank 0 only. ``memo`` keeps
    the base's replies for the next user gated over the same base."""
    heldout = heldout_records(cset.heldout())
    memo = {} if memo is None else memo  # the base's replies, reused by a back-off's gates
    live = _live_for_base(registry, user, base)
    reference = None
    if live is not None:
        registry.verify(live, base)
        reference = f"live-{user}"
        model.load_adapter(str(live.path), adapter_name=reference)
    others = other_users_heldout(user, cfg.gate.leak_users)
    print(f"gate {user}: {len(heldout)} held-out episodes, {len(gate_probes(cfg.gate))} general probes and "
          f"{len(others)} other users' specifics, against {live.name if live else 'the base'}", flush=True)
    gate_args = dict(user=user, heldout=heldout, cfg=cfg.gate, reference=reference,
                     reference_name=live.name if live else "base", others=others,
                     cache_dir=get_workspace().models / "gate-cache", base_tag=base_tag(cfg.model, base), memo=memo)
    report = gate(model, tokenizer, candidate=candidate, **gate_args)
    # the back-off: an adapter refused for forgetting alone is gated again with a smaller share of
    # its update, and the first share that passes is published
    scale, publish_dir, tried = 1.0, adapter_dir, []
    for smaller in cfg.gate.backoff_scales:
        if not may_back_off(report):
            break
        try:
            scaled_dir = scaled_adapter(adapter_dir, run_dir / f"adapter-scale{smaller:g}", smaller)
        except ValueError as e:  # weights other than LoRA A/B: refused as it is, with why
            report["reasons"].append(f"no back-off: {e}")
            break
        tried.append({"scale": scale, "passed": False, "reasons": report["reasons"],
                      "criteria": {k: {f: c[f] for f in ("passed", "value", "reference", "limit", "n") if f in c}
                                   for k, c in report["criteria"].items()}})
        print(f"gate {user}: refused at scale {scale:g} ({'; '.join(report['reasons'])}); gating the adapter with "
              f"{smaller:g} of its update", flush=True)
        scale, publish_dir = smaller, scaled_dir
        name = f"{candidate}-scale-{smaller:g}".replace(".", "_")  # a PEFT adapter name has no dots
        model.load_adapter(str(publish_dir), adapter_name=name)
        report = gate(model, tokenizer, candidate=name, **gate_args)
        model.delete_adapter(name)
    if reference is not None:
        model.delete_adapter(reference)
    report.update({"scale": scale, "backoff": tried, "set_version": cset.version, "base_hash": base, "time": time.time()})
    (run_dir / "gate.json").write_text(json.dumps(report, indent=1, default=str))
    if not report["passed"]:
        return report, None
    lineage = {"set_version": cset.version, "set_path": str(cset.path), "run_dir": str(run_dir),
               "base_source": cfg.model.source, "quantize": cfg.model.quantize, "scale": scale, **(lineage or {})}
    art = registry.publish(user, publish_dir, base_hash=base, lineage=lineage, gate=report)
    return report, art


def _live_for_base(registry: AdapterRegistry, user: str, base: str) -> AdapterArtifact | None:
    """The LIVE adapter when it was made for this base (one made for another base is no reference)."""
    if registry.live_version(user) is None:
        return None
    live = registry.get(user)
    return live if live.base_hash == base else None


def summarize(result: RefreshResult, report: dict | None) -> None:
    from rich.console import Console
    console = Console()
    if report is not None and report.get("criteria"):
        console.print(gate_table(report, f"gate: {result.user} set v{result.set_version}"))
    rows = {"run": result.run_dir, "set": f"v{result.set_version}",
            "gate": "passed" if result.passed else ("-" if result.passed is None else "REFUSED"),
            "published": result.published or "nothing", "live": result.live or "none"}
    if result.train is not None:
        rows.update({"steps": result.train.steps, "final loss": result.train.final_loss,
                     "tokens/s": result.train.tokens_per_s})
    for i, r in enumerate(result.reasons):
        rows[f"why ({i + 1})"] = r
    for tried in (report or {}).get("backoff", []):
        rows[f"refused at scale {tried['scale']:g}"] = "; ".join(tried["reasons"])
    if report is not None and report.get("passed") and report.get("scale", 1.0) != 1.0:
        rows["published scale"] = f"{report['scale']:g} of the update as trained (gate.backoff_scales)"
    print_summary(f"refresh {result.user}", rows)


# ----------------------------------------------------------------------------- the recipe

def run(cfg: RefreshConfig, di: DistInfo | None = None, registry: AdapterRegistry | None = None,
        stop_after: int | None = None) -> RefreshResult:
    if not cfg.user:
        raise ConfigError("say whose adapter to refresh: --user U (or user=U), or use --all-due")
    di = di or setup()
    if di.strategy in ("fsdp2", "zero3"):  # a LoRA is small: shard the optimizer (zero2) at most
        raise CogcoreError(f"refresh runs on one process, DDP or ZeRO-2, not {di.strategy}: an adapter is too small "
                           "to shard; use --dist ddp (or zero2)")
    registry = registry or AdapterRegistry()
    user = cfg.user
    with refresh_lock(registry, user, cfg.lock_timeout, di):
        cset = find_set(user, cfg.data.set_version)
        run_dir = Path(cfg.out).expanduser() if cfg.out else default_run_dir(user, cset.version)
        torch.manual_seed(cfg.train.seed)

        # the shared base, fresh each cycle (or the LIVE adapter, warm)
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
        base = model.base_hash
        lora = cfg.lora.for_model(model)  # a layer index the model lacks fails here, before any work
        # the set's rows with their per-segment weights (policy / world / replay)
        records = answered_replay(model, tokenizer, {user: set_records(cset, cfg.data)}, cfg.data, di,
                                  cfg.train.precision)[user]
        warm = _live_for_base(registry, user, base) if cfg.warm_start else None
        if warm is not None:
            from peft import PeftModel
            registry.verify(warm, base)
            model = PeftModel.from_pretrained(model, str(warm.path), is_trainable=True)
        else:
            model = add_lora(model, lora)

        rows, kl_tokens = pack_user_rows_kl(tokenizer, records, cfg.data.seq_len, user, packing=cfg.data.packing,
                                            kl_target=_kl_target(cfg.data), apart=cfg.data.replay_rows == "apart")
        train_cfg = cfg.train
        if len(rows) < train_cfg.micro_batch * train_cfg.grad_accum * di.world_size:
            # a user with little experience: smaller batches rather than no refresh at all
            train_cfg = dataclasses.replace(train_cfg, micro_batch=max(1, len(rows) // (train_cfg.grad_accum * di.world_size)))
        if di.is_main:
            counts = {t: sum(r["target"] == t for r in records) for t in TARGETS}
            print(f"refresh {user}: set v{cset.version} ({', '.join(f'{n} {t}' for t, n in counts.items())} rows) -> "
                  f"{len(rows)} rows of {cfg.data.seq_len} tokens; base {base[:12]}"
                  f"{'; warm start from ' + warm.name if warm else ''}", flush=True)

        # the gate's settings and the lock wait do not change the weights: a rerun with other ones resumes
        trained_by = {k: v for k, v in asdict(cfg).items() if k not in ("gate", "lock_timeout", "out")}
        result = train(AdapterLoss(model, kl_ce_weight=_kl_ce_weight(cfg.data)), rows, train_cfg, run_dir, di, base_hash=base,
                       run_config=trained_by, stop_after=stop_after,
                       prepare_batch=lambda b, _step: {**b, "kl_token": kl_tokens.to(b["row_index"].device)[b["row_index"]]})
        if result.steps < train_cfg.max_steps:
            return RefreshResult(user, cset.version, str(run_dir), None, None, None, ["stopped early"], result)

        published, report = None, None
        if di.is_main:
            save_config(cfg, run_dir / "config.yaml")
            adapter_dir = run_dir / "adapter"
            model.save_pretrained(adapter_dir)
            lineage = {"warm_start_from": warm.name if warm else None, "steps": result.steps,
                       "final_loss": result.final_loss}
            report, art = gate_and_publish(model, tokenizer, cfg, user=user, cset=cset, adapter_dir=adapter_dir,
                                           run_dir=run_dir, base=base, registry=registry, lineage=lineage)
            published = art.name if art else None
        report, published = broadcast_object((report, published))  # every rank ends with rank 0's verdict
        live = registry.live_version(user)
        out = RefreshResult(user, cset.version, str(run_dir), bool(report and report["passed"]), published,
                            f"{user}@v{live}" if live else None, list(report["reasons"]) if report else [],
                            result, report)
        if di.is_main:
            (run_dir / "summary.json").write_text(json.dumps(
                {k: v for k, v in asdict(out).items() if k not in ("gate", "train")}
                | {"steps": result.steps, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
                   "elapsed_s": result.elapsed_s, "resumed_from": result.resumed_from, "base_hash": base}, indent=1))
            summarize(out, report)
        return out


# ----------------------------------------------------------------------------- many users

def due_users(cfg: RefreshConfig, registry: AdapterRegistry | None = None) -> dict[str, str]:
    """Users whose latest set is newer than their LIVE adapter's lineage (or who have none), with why.
    A set the gate already refused for this base is not due again until a newer set exists."""
    registry = registry or AdapterRegistry()
    ws = get_workspace()
    base = base_hash(resolve(cfg.model))
    due: dict[str, str] = {}
    root = ws.consolidated
    users = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for user in users:
        cset = latest_set(user)
        if cset is None:
            continue
        refusal = default_run_dir(user, cset.version) / "gate.json"
        if refusal.is_file():
            rep = json.loads(refusal.read_text())
            if not rep.get("passed") and rep.get("base_hash") == base:
                continue
        live = _live_for_base(registry, user, base)
        if live is None:
            due[user] = f"set v{cset.version}, no live adapter for this base"
        elif int(live.lineage.get("set_version", 0)) < cset.version:
            due[user] = f"set v{cset.version} newer than {live.name} (set v{live.lineage.get('set_version')})"
    return due


def refresh_users(cfg: RefreshConfig, users: list[str], registry: AdapterRegistry | None = None) -> list[RefreshResult]:
    """Refresh several users: in one grouped pass over the base when more than one is due."""
    registry = registry or AdapterRegistry()
    if len(users) > 1:
        return refresh_grouped(cfg, users, registry)
    results = []
    for user in users:
        try:
            results.append(run(dataclasses.replace(cfg, user=user, out=""), registry=registry))
        except CogcoreError as e:  # one user's problem (busy, no data) does not stop the others
            results.append(RefreshResult(user, 0, "", False, None, None, [str(e)]))
    return results


def refresh_grouped(cfg: RefreshConfig, users: list[str], registry: AdapterRegistry,
                    di: DistInfo | None = None) -> list[RefreshResult]:
    """K users' adapters trained together over one frozen base (lora/grouped.py; users split over
    ranks under --nproc), then each gated and published like a single refresh (rank 0)."""
    from peft import PeftModel

    from .registry import write_adapter_dir
    di = di or setup()
    results: list[RefreshResult] = []
    with contextlib.ExitStack() as locks:
        problems: dict[str, str] = {}
        if di.is_main:  # rank 0 holds every user's refresh lock for the whole pass
            for user in users:
                try:
                    locks.enter_context(registry.lock(user, "refresh", timeout=cfg.lock_timeout))
                except CogcoreError as e:
                    problems[user] = str(e)
        problems = broadcast_object(problems)
        sets, records = {}, {}
        for user in users:
            if user in problems:
                continue
            try:
                sets[user] = find_set(user, 0)
                records[user] = set_records(sets[user], cfg.data)
            except CogcoreError as e:
                problems[user] = str(e)
        results += [RefreshResult(u, 0, "", False, None, None, [why]) for u, why in problems.items()]
        if not sets:
            return results

        # one frozen base for everyone; warm starts from the LIVE adapters when asked
        torch.manual_seed(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model)
        base = model.base_hash
        lora = cfg.lora.for_model(model)
        warm = {u: _live_for_base(registry, u, base) for u in sets} if cfg.warm_start else {}
        init = {u: registry.load_weights(a, base) for u, a in warm.items() if a is not None}
        records = answered_replay(model, tokenizer, records, cfg.data, di, cfg.train.precision)
        # the run directory is named by what is trained and how: other data (scales, replay answers), another
        # adapter shape or other training settings is another run (a killed run with the same ones resumes)
        tag = "-".join(f"{u}{sets[u].version}" for u in sorted(sets))
        tag += json.dumps(records, sort_keys=True, default=str)
        tag += checkpoint.config_hash(checkpoint.resume_config(asdict(cfg.train), {"lora": asdict(lora)}))
        tag += cfg.data.replay_loss + cfg.data.replay_rows
        group_dir = get_workspace().runs / f"refresh-grouped-{hashlib.sha256(tag.encode()).hexdigest()[:10]}"
        if di.is_main:
            print(f"refresh: {len(sets)} users in one pass ({', '.join(sorted(sets))}); base {base[:12]}; "
                  f"run {group_dir}", flush=True)
        weights = train_adapters_grouped(model, tokenizer, records, lora, cfg.train, group_dir, di,
                                         seq_len=cfg.data.seq_len, packing=cfg.data.packing, init=init or None,
                                         kl_target=_kl_target(cfg.data), kl_ce_weight=_kl_ce_weight(cfg.data),
                                         kl_apart=cfg.data.replay_rows == "apart")

        # gate and publish each user's adapter, on a fresh copy of the base, one adapter at a time
        if di.is_main:
            gate_model, previous, base_replies = None, None, {}
            for user in sorted(sets):
                run_dir = default_run_dir(user, sets[user].version)
                run_dir.mkdir(parents=True, exist_ok=True)
                adapter_dir = write_adapter_dir(run_dir / "adapter", weights[user], lora.peft_config())
                if gate_model is None:
                    gate_model = PeftModel.from_pretrained(load_model(cfg.model), str(adapter_dir), adapter_name=user)
                else:
                    gate_model.load_adapter(str(adapter_dir), adapter_name=user)
                    gate_model.set_adapter(user)
                    gate_model.delete_adapter(previous)
                previous = user
                warm_from = warm.get(user)
                report, art = gate_and_publish(gate_model, tokenizer, cfg, user=user, cset=sets[user],
                                               adapter_dir=adapter_dir, run_dir=run_dir, base=base, registry=registry,
                                               candidate=user, lineage={"grouped_run": str(group_dir),
                                                                        "warm_start_from": warm_from.name if warm_from else None},
                                               memo=base_replies)
                live = registry.live_version(user)
                results.append(RefreshResult(user, sets[user].version, str(run_dir), report["passed"],
                                             art.name if art else None, f"{user}@v{live}" if live else None,
                                             list(report["reasons"]), None, report))
        barrier()
    return results


def results_table(results: list[RefreshResult], title: str):
    from rich.table import Table
    t = Table(title=title)
    for col in ("user", "set", "gate", "published", "live", "why not"):
        t.add_column(col)
    for r in results:
        gate_word = "passed" if r.passed else ("-" if r.passed is None else "refused")
        t.add_row(r.user, f"v{r.set_version}" if r.set_version else "-", gate_word, r.published or "-",
                  r.live or "-", "; ".join(r.reasons)[:120])
    return t


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k:<32} {t}: {h}" for k, t, h in describe(RefreshConfig))
    p = argparse.ArgumentParser(prog="cogcore refresh", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="refresh users' LoRA adapters on their consolidated experience, gate, publish",
                                epilog="config keys (key=value):\n" + keys)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="refresh this user's adapter")
    who.add_argument("--all-due", action="store_true",
                     help="every user whose latest set is newer than their LIVE adapter (grouped when possible)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torch.distributed.run)")
    p.add_argument("--dist", default="ddp", help="accelerate config name or file for --nproc (ddp, fsdp2, zero2...)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (see below)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.user:
        overrides.insert(0, f"user={args.user}")
    cfg = load_config(RefreshConfig, args.config, overrides)  # validate before anything runs
    if args.nproc > 1:  # the same command in N processes (torch.distributed.run)
        from cogcore.train.distributed import launch
        who = ["--user", args.user] if args.user else ["--all-due"]
        child = ["refresh", *who] + (["--config", args.config] if args.config else []) + args.overrides
        return launch(child, args.nproc, args.dist)
    from cogcore.train.distributed import teardown
    if args.user:
        run(cfg)  # a refusal by the gate is an outcome, not an error: the summary says why
        teardown()  # a no-op in one process; under torchrun every rank leaves the group cleanly
        return 0
    di = setup()
    due = broadcast_object(due_users(cfg) if di.is_main else None)  # every rank trains the same users
    if di.is_main:
        for user, why in due.items():
            print(f"due: {user} ({why})")
        if not due:
            print("no user is due: every latest set is already behind a LIVE adapter (or was refused by the gate)")
    results = refresh_users(cfg, list(due)) if due else []
    if di.is_main and results:
        from rich.console import Console
        Console().print(results_table(results, "refresh --all-due"))
    teardown()
    return 0
