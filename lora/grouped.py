"""Many users' LoRA adapters trained in ONE pass over one frozen base (`cogcore refresh --all-due`).

    adapters = train_adapters_grouped(model, tokenizer, {"alice": recs_a, "bob": recs_b},
                                      LoraShape(r=16, alpha=32), TrainConfig(max_steps=30), run_dir)
    adapters["alice"]  # PEFT-layout state dict: ...q_proj.lora_A.weight (r, d_in), lora_B.weight (d_out, r)
    write_adapter_dir(out, adapters["alice"], LoraShape(r=16, alpha=32).peft_config())  # lora/registry.py

How it works, and why each user's result equals (within float noise) a single-user run:

* Data. Each user's documents are packed into that user's own rows (rows never mix users;
  rows with no trained token are dropped). User u's rows of step s are exactly the rows a
  single run on u's data would draw: ``BatchPlan(n_u, micro_batch, grad_accum, 1, seed)``,
  so every user gets ``micro_batch * grad_accum`` rows per step and a user with fewer rows
  simply cycles through more epochs (balanced batches: equal steps for every user).
* Routing. The base is frozen and wrapped by ``apply_multi_lora`` with K adapters (A
  Kaiming-uniform like PEFT, B zero; rsLoRA scale alpha/sqrt(r) when asked). A forward pass
  holds several users' rows, grouped by user, and ``adapter_index`` sends each row through
  its user's adapter, so the base runs once for all of them.
* The one loop. ``train.loop.train`` draws rows by its own random ``BatchPlan``; to give it
  the balanced per-user schedule without a second loop, it is handed one placeholder row per
  forward pass and ``prepare_batch`` swaps in the real rows of that (step, micro-batch).
* Loss normalisation. The loop divides by the step's total token weight, which would give a
  user with more tokens a larger share. Each user's weights are divided by that user's own
  weight in the step (so every user sums to 1 and the step total is K); the gradient of
  user u's adapter is then (1/K) x its single-run gradient. A hook that runs after the
  step's last backward multiplies each user's slice back by K and clips it on that user's
  own norm (the loop's global clip is switched off): AdamW is per-parameter and the adapters
  are disjoint, so each adapter takes the very steps of its single run.
* Processes. With ``di.world_size > 1`` (``--nproc N`` / accelerate) users are split
  round-robin over the ranks; each rank holds only its users' adapters (no gradient is
  exchanged) and the loop's all-reduce of the step weight makes the normalisation global.
  Every rank returns all users' weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..kernels import (
    DEFAULT_TARGETS,
    MultiLoRALinear,
    TeacherDense,
    apply_multi_lora,
    linear_distill_loss,
    resolve_layers,
    targeted_linears,
)
from ..train import checkpoint
from ..train.config import CogcoreError
from ..train.data import BatchPlan, Document, PackedRows, make_batch, pack, tokenize_record
from ..train.distributed import DistInfo
from ..train.lm import causal_ce_sum, decoder_hidden, output_weight
from ..train.loop import TrainConfig, train

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM (get_peft_model_state_dict)


@dataclass(frozen=True)
class LoraShape:
    """The LoRA every user of a grouped run gets, read from any spec: refresh's LoraShape
    (r, alpha, targets, rslora, layers), train.sft.LoraConfig, or a dict of peft.LoraConfig fields.
    ``layers``: the decoder layers that get adapters (PEFT's layers_to_transform; () = all)."""

    r: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.r < 1:
            raise CogcoreError(f"lora.r must be >= 1 for adapter training, got {self.r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def of(cls, lora) -> LoraShape:
        if isinstance(lora, cls):
            return lora
        get = lora.get if isinstance(lora, Mapping) else lambda k, d=None: getattr(lora, k, d)
        if float(get("dropout", get("lora_dropout", 0.0)) or 0.0) > 0:
            raise CogcoreError("grouped adapter training has no LoRA dropout: set lora.dropout=0")
        return cls(r=int(get("r")), alpha=float(get("alpha", get("lora_alpha", get("r")))),
                   target_modules=tuple(get("target_modules", None) or get("targets", None) or DEFAULT_TARGETS),
                   use_rslora=bool(get("use_rslora", get("rslora", False))),
                   layers=_as_layers(get("layers", None) or get("layers_to_transform", None)))

    def for_model(self, model: nn.Module) -> LoraShape:
        """This shape with its layer indices checked against ``model`` (negative ones counted from the last)."""
        return replace(self, layers=tuple(model_layers(model, self.layers)))

    def peft_config(self) -> dict:
        """peft.LoraConfig fields (adapter_config.json; ``peft.LoraConfig(**shape.peft_config())``)."""
        return {"r": self.r, "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "lora_dropout": 0.0, "use_rslora": self.use_rslora, "task_type": "CAUSAL_LM",
                **layers_to_transform(self.layers)}


def _as_layers(value) -> tuple[int, ...]:
    """A layer list as PEFT may write it: None, one index, or a list of indices."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(i) for i in value)


def model_layers(model: nn.Module, layers) -> list[int]:
    """``lora.layers`` checked against ``model``: indices from 0, sorted ([] = every layer)."""
    try:
        return resolve_layers(model, layers)
    except ValueError as e:
        raise CogcoreError(f"lora.layers: {e}") from None


def layers_to_transform(layers) -> dict:
    """The peft.LoraConfig field for a layer selection: none for every layer."""
    if not layers:
        return {}
    if min(layers) < 0:
        raise CogcoreError(f"lora.layers {list(layers)} holds indices from the last layer: resolve them against "
                           "the model first (for_model)")
    return {"layers_to_transform": list(layers)}


# ----------------------------------------------------------------------------- data

def pack_user_rows(tokenizer, records: Sequence[dict], seq_len: int, user: str = "user",
                   train_on: str = "completion", packing: bool = True) -> PackedRows:
    """One user's records -> that user's packed rows (rows without a trained token dropped).

    A single-user run that packs with this function draws the same rows as the grouped run.
    """
    return pack_user_rows_kl(tokenizer, records, seq_len, user, train_on, packing)[0]


def pack_user_rows_kl(tokenizer, records: Sequence[dict], seq_len: int, user: str = "user",
                      train_on: str = "completion", packing: bool = True,
                      kl_target: str | None = None, apart: bool = True) -> tuple[PackedRows, Tensor]:
    """Like :func:`pack_user_rows`, plus an (N, T) bool: True on the tokens of the records whose
    ``target`` is ``kl_target`` (e.g. "replay"), which are trained by KL to the base's
    next-token distribution (:func:`replay_kl_sum`) instead of cross-entropy. With ``apart``
    those records are packed into rows of their own, after the others (whole rows flagged);
    otherwise they are packed among the others. ``kl_target=None``: the plain packing, no flag."""
    docs, flags = [], []
    for i, r in enumerate(records):
        d = tokenize_record(r, tokenizer, train_on, where=f"user {user} record {i}")
        if len(d.input_ids) >= 2 and sum(d.weights) > 0:
            docs.append(d)
            flags.append(kl_target is not None and r.get("target") == kl_target)
    if not docs:
        raise CogcoreError(f"user {user}: none of its {len(records)} records has a token to train on; "
                           "leave the user out of this refresh or add data")
    pairs = list(zip(docs, flags))
    groups = [[x for x in pairs if not x[1]], [x for x in pairs if x[1]]] if apart else [pairs]
    groups = [g for g in groups if g]
    rows = _cat_rows([pack([d for d, _ in g], seq_len, tokenizer.pad_token_id, packing) for g in groups])
    # the flags: the same packing of same-length stand-ins whose every token is its document's flag
    kl = _cat_rows([pack([Document([int(f)] * len(d.input_ids), d.weights) for d, f in g], seq_len, 0, packing)
                    for g in groups]).input_ids.bool()
    keep = (rows.target_weights > 0).any(dim=1)  # a row split off a long prompt may train nothing
    if bool(keep.all()):
        return rows, kl
    return PackedRows(rows.input_ids[keep], rows.position_ids[keep], rows.doc_ids[keep], rows.target_ids[keep],
                      rows.target_weights[keep], rows.padding_fraction), kl[keep]


def _cat_rows(parts: list[PackedRows]) -> PackedRows:
    if len(parts) == 1:
        return parts[0]
    n = sum(len(p) for p in parts)
    return PackedRows(*(torch.cat([getattr(p, k) for p in parts]) for k in
                        ("input_ids", "position_ids", "doc_ids", "target_ids", "target_weights")),
                      sum(p.padding_fraction * len(p) for p in parts) / n)


def replay_kl_sum(hidden: Tensor, base_hidden: Tensor, weight: Tensor, target_weights: Tensor,
                  chunk_size: int = 1024, target_ids: Tensor | None = None, ce_weight: float = 0.0) -> Tensor:
    """sum_i w_i * (KL(base_i || adapter_i) + ce_weight * CE_i) over the tokens with w_i > 0: the
    adapter's next-token distribution held to the base's whole distribution there (not only to
    its top answer), plus, with ``ce_weight``, cross-entropy on the row's own answer tokens.
    ``hidden`` / ``base_hidden`` (N, H) final hidden states with and without the adapter."""
    w = target_weights.reshape(-1)
    keep = w > 0
    if not bool(keep.any()):
        return hidden.new_zeros((), dtype=torch.float32) + 0 * hidden.sum()
    H = hidden.shape[-1]
    teacher = TeacherDense(base_hidden.reshape(-1, H)[keep], weight)
    targets = target_ids.reshape(-1)[keep] if ce_weight else None
    return linear_distill_loss(hidden.reshape(-1, H)[keep], weight, teacher, w[keep], loss="forward_kl",
                               ce_weight=ce_weight, targets=targets, chunk_size=chunk_size)


def base_hidden_for_kl(model: nn.Module, batch: dict, adapter_off=contextlib.nullcontext) -> Tensor | None:
    """The base's final hidden states (no adapter, no grad) of the batch's rows that hold a KL
    token (``batch["kl_token"]``), in order; None when there is none. ``adapter_off()`` is the
    context in which ``model`` runs as the plain base (a PEFT model's ``disable_adapter``; a
    MultiLoRA patch with no adapter index set is the base already)."""
    kl_token = batch.get("kl_token")
    if kl_token is None or not bool(kl_token.any()):
        return None
    has = kl_token.any(dim=1)
    with torch.no_grad(), adapter_off():
        return decoder_hidden(model, {k: batch[k][has] for k in ("input_ids", "position_ids")})


def rows_loss_sum(hidden: Tensor, base_hidden: Tensor | None, kl_tok: Tensor | None, weight: Tensor,
                  batch: dict, rows: slice = slice(None), chunk_size: int = 1024, kl_ce_weight: float = 0.0) -> Tensor:
    """The loss of ``rows`` of a batch: cross-entropy on ordinary tokens, :func:`replay_kl_sum` (with
    ``kl_ce_weight`` x cross-entropy) on the tokens flagged in ``kl_tok`` (B, T) (``base_hidden``
    holds the base's hidden states of the batch's rows that have a flagged token, in order)."""
    h, tid, tw = hidden[rows], batch["target_ids"][rows], batch["target_weights"][rows]
    if kl_tok is None or not bool(kl_tok.any()):
        return causal_ce_sum(h, weight, tid, tw, chunk_size)
    flag = kl_tok[rows]
    where = torch.cumsum(kl_tok.any(dim=1).long(), 0) - 1  # row of the batch -> its row in base_hidden
    r, t = flag.nonzero(as_tuple=True)
    return (causal_ce_sum(h[~flag], weight, tid[~flag], tw[~flag], chunk_size)
            + replay_kl_sum(h[r, t], base_hidden[where[rows][r], t], weight, tw[r, t], chunk_size, tid[r, t],
                            kl_ce_weight))


class _Schedule:
    """Which rows of which users each (step, micro-batch) holds, and their loss weights.

    The micro-batches of a step are (a, chunk) for a in range(grad_accum) and each chunk of
    users that fits in ``tokens_per_forward``; slot a*n_chunks + chunk is the loop's placeholder row.
    """

    def __init__(self, users: list[str], rows: dict[str, PackedRows], slot_of: dict[str, int], cfg: TrainConfig,
                 seed: int, seq_len: int, tokens_per_forward: int, device: torch.device,
                 kl_tokens: dict[str, Tensor] | None = None):
        self.users, self.rows, self.slot_of, self.device = users, rows, slot_of, device
        self.kl_tokens = kl_tokens  # per user, (N, T) bool: tokens trained by KL to the base (None: none are)
        self.plans = {u: BatchPlan(len(rows[u]), cfg.micro_batch, cfg.grad_accum, 1, seed) for u in users}
        per = max(1, tokens_per_forward // (cfg.micro_batch * seq_len))  # users per forward pass
        self.chunks = [users[i:i + per] for i in range(0, len(users), per)]
        self.n_micro = cfg.grad_accum * len(self.chunks)

    def placeholders(self) -> PackedRows:
        n = self.n_micro  # one length-1 row per micro-batch: the loop only draws their indices
        z = torch.zeros(n, 1, dtype=torch.long)
        return PackedRows(z, z.clone(), z.clone(), z.clone(), torch.ones(n, 1), 0.0)

    def batch(self, placeholder: dict, step: int | None) -> dict:
        if step is None:
            raise CogcoreError("grouped adapter training has no in-loop evaluation; evaluate the adapters afterwards")
        a, c = divmod(int(placeholder["row_index"][0]), len(self.chunks))
        parts, spans, start = [], [], 0
        for u in self.chunks[c]:
            step_idx = self.plans[u].micro_batches(step, 0)
            idx = step_idx[a]
            b = make_batch(self.rows[u], idx)
            # u's weight over the whole step (all its micro-batches): each user sums to 1
            b["target_weights"] = b["target_weights"] / self.rows[u].target_weights[torch.cat(step_idx)].sum()
            b["adapter_index"] = torch.full((len(idx),), self.slot_of[u], dtype=torch.long)
            if self.kl_tokens is not None:
                b["kl_token"] = self.kl_tokens[u][idx]
            parts.append(b)
            spans.append((u, start, start + len(idx)))
            start += len(idx)
        out = {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0] if k != "row_index"}
        out["user_spans"] = spans  # rows of each user, contiguous (the segment layout gathered_lora likes)
        return out


# ----------------------------------------------------------------------------- model side

class GroupedLoss(nn.Module):
    """forward(batch) -> the loop's {"loss_sum", "weight"}; each row through its user's adapter.

    Also reports each user's mean loss as "loss/<user>", pre-multiplied by K because the loop
    divides extra outputs by the step's loss weight (K here).
    """

    def __init__(self, model: nn.Module, patch, n_users: int, chunk_size: int = 1024, kl_ce_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.kl_ce_weight = kl_ce_weight
        self.patch = patch
        self.n_users = n_users
        self.chunk_size = chunk_size

    def forward(self, batch: dict) -> dict:
        kl_token = batch.get("kl_token")
        base_hidden = base_hidden_for_kl(self.model, batch)  # before routing: no adapter index = the base
        self.patch.set_adapter_index(batch["adapter_index"])  # one adapter per row (sequence)
        try:
            hidden = decoder_hidden(self.model, batch)  # (B, T, H)
        finally:
            self.patch.set_adapter_index(None)
        W = output_weight(self.model)
        out: dict[str, Tensor] = {}
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        for user, s, e in batch["user_spans"]:  # per user: the same tokens its single run's loss sees
            lu = rows_loss_sum(hidden, base_hidden, kl_token, W, batch, slice(s, e), self.chunk_size, self.kl_ce_weight)
            loss_sum = loss_sum + lu
            out[f"loss/{user}"] = lu.detach() * self.n_users
        out["loss_sum"] = loss_sum
        out["weight"] = batch["target_weights"].sum()
        return out


class _PerUserGradients:
    """After the step's last backward: user u's gradient slice x K, clipped on u's own norm.

    Runs as a post-accumulate-grad hook on every adapter stack and fires on the last of the
    step's ``n_params * n_micro`` calls, i.e. before the loop's (disabled) clip and AdamW.
    Matches ``clip_grad_norm_`` of a single run: coef = max_norm / (norm + 1e-6), at most 1.
    """

    def __init__(self, layers: Sequence[MultiLoRALinear], n_micro: int, scale: float, max_norm: float):
        self.params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
        self.expected, self.seen = len(self.params) * n_micro, 0
        self.scale, self.max_norm = scale, max_norm
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    @torch.no_grad()
    def _hook(self, _param) -> None:
        self.seen += 1
        if self.seen < self.expected:
            return
        self.seen = 0
        grads = [p.grad for p in self.params]
        sq = sum(g.float().pow(2).sum(dim=(1, 2)) for g in grads)  # (K,) squared norm per user
        coef = torch.full_like(sq, self.scale)
        if self.max_norm > 0:
            coef *= (self.max_norm / (sq.sqrt() * self.scale + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype).view(-1, 1, 1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _user_seed(seed: int, user: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(user.encode())) % (2**63)


def target_layers(model: nn.Module, lora: LoraShape) -> list[tuple[str, int, int]]:
    """(module name, d_in, d_out) of the layers that get adapters, in model order (the
    selection rule of ``apply_multi_lora`` and of PEFT's ``target_modules`` by last name, and
    ``layers_to_transform`` by decoder-layer index)."""
    found = [(n, m.in_features, m.out_features)
             for n, m in targeted_linears(model, lora.target_modules, lora.for_model(model).layers)]
    if not found:
        raise CogcoreError(f"no linear layer named any of {sorted(lora.target_modules)} in {type(model).__name__}; "
                           "check lora.target_modules")
    return found


def initial_adapter_weights(model: nn.Module, lora, user: str, seed: int = 0) -> dict[str, Tensor]:
    """A fresh adapter in PEFT layout: A Kaiming-uniform (PEFT's bound 1/sqrt(d_in)) from a
    generator seeded by (seed, user) -- the same whichever other users train alongside -- B zero."""
    lora = LoraShape.of(lora)
    g = torch.Generator().manual_seed(_user_seed(seed, user))
    sd = {}
    for name, d_in, d_out in target_layers(model, lora):
        bound = 1 / math.sqrt(d_in)
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (torch.rand(lora.r, d_in, generator=g) * 2 - 1) * bound
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(d_out, lora.r)
    return sd


def _load_adapter(patch, slot: int, sd: Mapping[str, Tensor], lora: LoraShape, user: str) -> None:
    for name, layer in patch.layers.items():
        try:
            A, B = sd[f"{PEFT_PREFIX}{name}.lora_A.weight"], sd[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        except KeyError as e:
            raise CogcoreError(f"starting weights for user {user} lack {e.args[0]}: they were made for another "
                               "model or target_modules; start that user from scratch") from None
        if A.shape[0] != lora.r:
            raise CogcoreError(f"starting weights for user {user} have rank {A.shape[0]}, this run trains rank "
                               f"{lora.r}; start that user from scratch or keep lora.r={A.shape[0]}")
        layer.set_adapter_weights(slot, A.to(layer.lora_A.dtype), B.to(layer.lora_B.dtype), lora.scale)


def adapter_state_dict(patch, slot: int, r: int) -> dict[str, Tensor]:
    """Adapter ``slot`` of a MultiLoRA patch in PEFT layout (what get_peft_model_state_dict gives)."""
    sd = {}
    for name, layer in patch.layers.items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[slot, :, :r].detach().T.contiguous().cpu()  # (r, d_in)
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[slot, :r, :].detach().T.contiguous().cpu()  # (d_out, r)
    return sd


# ----------------------------------------------------------------------------- the recipe step

def train_adapters_grouped(
    model: nn.Module,
    tokenizer,
    user_records: Mapping[str, Sequence[dict]],
    lora,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    di: DistInfo | None = None,
    *,
    seq_len: int = 256,
    seed: int | None = None,
    init: Mapping[str, Mapping[str, Tensor]] | None = None,
    tokens_per_forward: int = 2048,
    packing: bool = True,
    train_on: str = "completion",
    kl_target: str | None = None,
    kl_ce_weight: float = 0.0,
    kl_apart: bool = True,
    stop_after: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Train one LoRA adapter per user in one pass over the frozen ``model``; returns
    ``{user: PEFT-layout state dict}`` (keys ``base_model.model.<module>.lora_A.weight`` (r, d_in)
    and ``.lora_B.weight`` (d_out, r)), for every user, on every rank.

    ``train_cfg`` reads per user: ``micro_batch`` rows of each user per forward pass and
    ``grad_accum`` of those per step, as a single-user run with that config would take;
    ``grad_clip`` clips each user's gradient on its own. ``seed`` (default ``train_cfg.seed``)
    sets the row order and fresh adapters' init. ``init`` holds starting weights per user
    (PEFT layout: warm start); other users start fresh (:func:`initial_adapter_weights`).
    ``tokens_per_forward`` caps one forward pass (whole users' ``micro_batch`` x ``seq_len``
    slices, at least one user): activation memory grows with it, and on a CPU a bigger pass
    is not faster (the base is compute-bound); raise it on a GPU. The step still covers every user.
    ``kl_target`` (e.g. "replay"): the records with that ``target`` are trained by KL to the
    base's own next-token distribution on their answer tokens instead of cross-entropy (their rows
    go through the base once more, without grad); ``kl_ce_weight`` adds that much cross-entropy on
    their answers. Resumes from ``run_dir`` like every recipe.
    The model is restored as it came (original layers, requires_grad flags) on return.
    """
    lora = LoraShape.of(lora).for_model(model)
    di = di or DistInfo()
    seed = train_cfg.seed if seed is None else seed
    users = sorted(user_records)
    if not users:
        raise CogcoreError("no users to train")
    if len(users) < di.world_size:
        raise CogcoreError(f"{len(users)} users cannot be split over {di.world_size} processes; use --nproc <= {len(users)}")
    mine = users[di.rank::di.world_size]  # round-robin: every rank gets whole users
    run_dir = Path(run_dir) / f"rank{di.rank}" if di.world_size > 1 else Path(run_dir)
    # Each rank runs the loop as if alone (no DDP: its adapters are its own); the loop's
    # all-reduce of the step weight still spans the ranks and makes the normalisation global.
    local = DistInfo(rank=0, world_size=1, local_rank=di.local_rank, strategy="single", device=di.device)
    _check_resume(run_dir, train_cfg, mine)

    packed = {u: pack_user_rows_kl(tokenizer, user_records[u], seq_len, u, train_on, packing, kl_target, kl_apart)
              for u in mine}
    rows = {u: packed[u][0] for u in mine}
    slot_of = {u: i for i, u in enumerate(mine)}
    sched = _Schedule(mine, rows, slot_of, train_cfg, seed, seq_len, tokens_per_forward, di.device,
                      {u: packed[u][1] for u in mine} if kl_target else None)

    starts = {u: (init or {}).get(u) or initial_adapter_weights(model, lora, u, seed) for u in mine}
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    patch = apply_multi_lora(model, len(mine), lora.r, lora.target_modules, alpha=lora.scale * lora.r,
                             layers=lora.layers)
    hooks = None
    try:
        for u in mine:
            _load_adapter(patch, slot_of[u], starts[u], lora, u)
        hooks = _PerUserGradients(list(patch.layers.values()), sched.n_micro, float(len(users)), train_cfg.grad_clip)
        loop_cfg = replace(train_cfg, micro_batch=1, grad_accum=sched.n_micro, grad_clip=0.0, seed=seed,
                           progress=train_cfg.progress and di.is_main)
        t0 = time.time()
        result = train(GroupedLoss(model, patch, len(users), kl_ce_weight=kl_ce_weight), sched.placeholders(), loop_cfg, run_dir, local,
                       prepare_batch=sched.batch, base_hash=getattr(model, "base_hash", None),
                       run_config={"grouped": {"users": mine, "lora": asdict(lora), "seq_len": seq_len,
                                               "packing": packing, "train_on": train_on, "kl_target": kl_target,
                                               "kl_ce_weight": kl_ce_weight, "kl_apart": kl_apart,
                                               # the per-user values the loop's own config no longer shows
                                               "micro_batch": train_cfg.micro_batch,
                                               "grad_accum": train_cfg.grad_accum,
                                               "grad_clip": train_cfg.grad_clip}},
                       stop_after=stop_after)
        adapters = {u: adapter_state_dict(patch, slot_of[u], lora.r) for u in mine}
        _write_summary(run_dir, mine, rows, train_cfg, result, time.time() - t0)
    finally:
        if hooks is not None:
            hooks.remove()
        patch()  # the original layers go back; the adapters leave with the patch
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, p.requires_grad))
    if di.world_size > 1:
        import torch.distributed as dist
        gathered: list = [None] * di.world_size
        dist.all_gather_object(gathered, adapters)
        adapters = {u: sd for part in gathered for u, sd in part.items()}
    return {u: adapters[u] for u in users}


def _check_resume(run_dir: Path, cfg: TrainConfig, users: list[str]) -> None:
    ckpt = checkpoint.latest_checkpoint(run_dir) if cfg.resume != "never" else None
    if ckpt is None:
        return
    before = (checkpoint.read_state(ckpt).get("config") or {}).get("grouped", {}).get("users")
    if before != users:  # not even train.resume=force can help: the adapter stacks differ in shape
        raise CogcoreError(f"{run_dir} holds a grouped run for users {before}, not {users}: use a new run "
                           "directory or train.resume=never")


def _write_summary(run_dir: Path, users: list[str], rows: dict[str, PackedRows], cfg: TrainConfig, result,
                   elapsed: float) -> None:
    per_step = cfg.micro_batch * cfg.grad_accum
    summary = {
        "users": {u: {"rows": len(rows[u]), "trained_tokens": rows[u].trained_tokens,
                      "epochs": result.steps * per_step / len(rows[u])} for u in users},
        "steps": result.steps, "rows_per_user_per_step": per_step, "final_loss_mean": result.final_loss,
        "elapsed_s": elapsed, "resumed_from": result.resumed_from,
    }
    (run_dir / "grouped.json").write_text(json.dumps(summary, indent=1))


__all__ = [
    "GroupedLoss",
    "LoraShape",
    "adapter_state_dict",
    "base_hidden_for_kl",
    "initial_adapter_weights",
    "pack_user_rows",
    "pack_user_rows_kl",
    "replay_kl_sum",
    "rows_loss_sum",
    "target_layers",
    "train_adapters_grouped",
]
