"""Minitron-style structured pruning: a smaller student cut out of a teacher.

Three axes, each ranked by activation statistics gathered with forward hooks in **one**
no-grad pass of the unpruned teacher over a few calibration batches:

* depth — Block Influence of layer i, ``BI_i = mean_tokens(1 - cos(h_in, h_out))`` (ShortGPT,
  Minitron): a layer that barely turns its input is cheap to remove. The lowest-BI layers go,
  except layer 0, which is always kept: it is the only layer that reads raw token embeddings,
  and removing it is what hurts most in the ShortGPT / Minitron ablations. ``layer_method=last``
  drops the last layers instead (the simple baseline).
* MLP width — channel c of a layer scores ``mean_tokens |act(gate_c) * up_c|`` (the input of
  ``down_proj``); every kept layer keeps its top ``mlp_ratio`` share of channels.
* attention width — a *KV group* is one KV head plus the query heads that read it; it scores
  ``mean_tokens ||group's attention output before o_proj||_2``. Whole groups go, so GQA stays
  intact (num_attention_heads / num_key_value_heads is unchanged).

Order: all three statistics come from the same pass of the *unpruned* teacher, and depth and
width are then cut together (a kept layer's width choice uses its own statistics from that
pass). Minitron likewise estimates every axis on the full model; re-measuring width after the
depth cut would cost a second pass for rankings that barely move, since a layer's internal
activations do not depend on the layers after it and only weakly on a removed earlier one.

Width cuts are uniform across layers (HF configs hold one ``intermediate_size`` and one head
count), but *which* channels and groups survive is chosen per layer. The student is a fresh
instance of the teacher's class built from an updated config (``head_dim`` written out, since
hidden_size / num_attention_heads no longer gives it) and loaded with sliced tensors, so it
saves and reloads like any HF model. With nothing pruned it is the teacher, logit for logit.

Supported: decoders with Llama-style blocks (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``): Llama, Qwen2 (q/k/v biases are sliced too), Mistral, SmolLM.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..train.config import CogcoreError, field, to_dict
from ..train.lm import decoder_hidden
from ..train.model import ModelSpec, count_params, load_model, load_tokenizer, save_model

REPORT_FILE = "prune_report.json"
PLOT_FILE = "prune_report.png"


@dataclass
class PruneConfig:
    layers: int = field(0, help="decoder layers to keep (0 = keep all)")
    layer_method: Literal["block_influence", "last"] = field(
        "block_influence", help="which layers go: lowest Block Influence 1 - cos(h_in, h_out) (layer 0 always "
                                "stays), or simply the last ones")
    mlp_ratio: float = field(1.0, help="fraction of MLP intermediate channels each layer keeps, ranked by "
                                       "mean |act(gate) * up| over calibration tokens")
    kv_groups: int = field(0, help="KV head groups to keep per layer (0 = all); a group is one KV head and its "
                                   "query heads, ranked by the mean L2 norm of its attention output")
    calibration_documents: int = field(64, help="documents from the data source used to measure importance")
    calibration_batch_size: int = field(8, help="packed rows per calibration forward pass")

    def __post_init__(self):
        if self.layers < 0:
            raise ValueError(f"prune.layers={self.layers} must be >= 0 (0 keeps every layer)")
        if not 0.0 < self.mlp_ratio <= 1.0:
            raise ValueError(f"prune.mlp_ratio={self.mlp_ratio} must be in (0, 1] (1 keeps every MLP channel)")
        if self.kv_groups < 0:
            raise ValueError(f"prune.kv_groups={self.kv_groups} must be >= 0 (0 keeps every KV head group)")
        if self.calibration_documents < 1:
            raise ValueError(f"prune.calibration_documents={self.calibration_documents} must be >= 1")
        if self.calibration_batch_size < 1:
            raise ValueError(f"prune.calibration_batch_size={self.calibration_batch_size} must be >= 1")


# ----------------------------------------------------------------------------- model anatomy

# Linear weights are (out_features, in_features): what a cut removes is a slice of dim 0
# (outputs: q/k/v, gate/up) or of dim 1 (inputs: o_proj, down_proj). Biases follow dim 0 only.
_CUTS = {
    "self_attn.q_proj": (0, "q"), "self_attn.k_proj": (0, "kv"), "self_attn.v_proj": (0, "kv"),
    "self_attn.o_proj": (1, "q"),
    "mlp.gate_proj": (0, "mlp"), "mlp.up_proj": (0, "mlp"), "mlp.down_proj": (1, "mlp"),
}


@dataclass
class _Shape:
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def rep(self) -> int:  # query heads per KV head
        return self.heads // self.kv_heads


def _anatomy(model: nn.Module) -> tuple[nn.ModuleList, str, _Shape]:
    """The decoder layers, their state_dict prefix, and the sizes pruning changes."""
    if getattr(model, "hf_quantizer", None) is not None:
        raise CogcoreError("pruning needs an unquantized teacher: load it with model.quantize=none")
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise CogcoreError(f"{type(model).__name__} has no decoder.layers list; pruning supports Llama-style "
                           "decoders (Llama, Qwen2, Mistral, SmolLM)")
    names = {n for n, _ in layers[0].named_modules()}
    missing = [m for m in _CUTS if m not in names]
    if missing:
        raise CogcoreError(f"{type(model).__name__} layers lack {', '.join(missing)}; pruning supports "
                           "Llama-style decoders (Llama, Qwen2, Mistral, SmolLM)")
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return layers, prefix, _Shape(len(layers), c.intermediate_size, c.num_attention_heads, kv, head_dim)


# ----------------------------------------------------------------------------- importance

def _real_tokens(batch: dict) -> torch.Tensor:
    """(B, T) bool: positions inside a document, i.e. not the padding that ends a packed row.

    ``pack`` pads only after a row's last document, padding has position id 0, and every
    document has >= 2 tokens: a row's last real position is its last non-zero position id.
    (The mask cannot tell: padding slots share doc id -1, so they attend to each other.)
    """
    pos_ids = batch.get("position_ids")
    if pos_ids is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    pos = torch.arange(pos_ids.shape[-1], device=pos_ids.device).expand_as(pos_ids)
    last = torch.where(pos_ids > 0, pos, torch.full_like(pos, -1)).max(-1).values  # (B,)
    return pos <= last[:, None]


@dataclass
class Importance:
    """Mean statistics per original layer, measured on the unpruned model."""

    layer: torch.Tensor  # (L,)   Block Influence 1 - cos(h_in, h_out)
    mlp: torch.Tensor    # (L, C) |act(gate) * up| per intermediate channel
    kv: torch.Tensor     # (L, G) L2 norm of each KV group's attention output
    tokens: int


@torch.no_grad()
def measure_importance(model: nn.Module, calib_batches: list[dict]) -> Importance:
    """One forward pass over ``calib_batches`` with hooks that accumulate every statistic."""
    layers, _, shape = _anatomy(model)
    if not calib_batches:
        raise CogcoreError("pruning needs at least one calibration batch; raise prune.calibration_documents "
                           "or point data.source at a non-empty dataset")
    device = next(model.parameters()).device
    L, C, G = shape.layers, shape.intermediate, shape.kv_heads
    layer_sum = torch.zeros(L, dtype=torch.float64, device=device)
    mlp_sum = torch.zeros(L, C, dtype=torch.float64, device=device)
    kv_sum = torch.zeros(L, G, dtype=torch.float64, device=device)
    real: dict[str, torch.Tensor] = {}  # the current batch's token mask, read by the hooks

    def on_layer(i):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in[real["m"]].float(), h_out[real["m"]].float(), dim=-1)  # (N,)
            layer_sum[i] += (1.0 - cos).sum()
        return hook

    def on_down_proj(i):
        def hook(module, args):
            x = args[0][real["m"]]  # (N, C) = act(gate) * up
            mlp_sum[i] += x.float().abs().sum(0)
        return hook

    def on_o_proj(i):
        def hook(module, args):
            x = args[0][real["m"]]  # (N, heads * head_dim), query heads of one KV head are adjacent
            groups = x.float().view(x.shape[0], G, shape.rep * shape.head_dim)  # (N, G, rep·hd)
            kv_sum[i] += groups.norm(dim=-1).sum(0)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        from tqdm.auto import tqdm
        # disable=False: the bar shows in logs too (a non-terminal run was silent for minutes)
        for batch in tqdm(calib_batches, desc="prune: calibrate (importance of layers, channels, heads)",
                          unit="batch", disable=False):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            real["m"] = _real_tokens(batch)
            tokens += int(real["m"].sum())
            decoder_hidden(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = max(tokens, 1)
    return Importance((layer_sum / n).float().cpu(), (mlp_sum / n).float().cpu(), (kv_sum / n).float().cpu(), tokens)


# ----------------------------------------------------------------------------- choosing

def choose_layers(importance: torch.Tensor, keep: int, method: str) -> list[int]:
    """Indices of the layers to keep, in order. Layer 0 is never dropped by block_influence."""
    L = len(importance)
    if keep == L:
        return list(range(L))
    if method == "last":
        return list(range(keep))
    # stable sort: on a tie the earlier layer goes first
    candidates = sorted(range(1, L), key=lambda i: float(importance[i]))
    dropped = set(candidates[: L - keep])
    return [i for i in range(L) if i not in dropped]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, in their original order (so keeping all is the identity)."""
    if k >= len(scores):
        return list(range(len(scores)))
    return sorted(torch.topk(scores, k).indices.tolist())


# ----------------------------------------------------------------------------- pruning

def prune_model(model: nn.Module, calib_batches: list[dict], cfg: PruneConfig) -> tuple[nn.Module, dict]:
    """Return a new pruned causal LM (the teacher's class) and a report of what was kept.

    ``calib_batches`` are training batches (input_ids, position_ids, attention_mask, ...): the
    model sees them with their position ids and block-diagonal masks, as in training.
    """
    layers, prefix, s = _anatomy(model)
    if cfg.layers > s.layers:
        raise CogcoreError(f"prune.layers={cfg.layers} but the teacher has only {s.layers} layers; "
                           f"keep at most {s.layers} (0 keeps all)")
    if cfg.kv_groups > s.kv_heads:
        raise CogcoreError(f"prune.kv_groups={cfg.kv_groups} but the teacher has only {s.kv_heads} KV heads; "
                           f"keep at most {s.kv_heads} (0 keeps all)")
    keep_layers = cfg.layers or s.layers
    keep_mlp = max(1, round(cfg.mlp_ratio * s.intermediate))
    keep_kv = cfg.kv_groups or s.kv_heads

    imp = measure_importance(model, calib_batches)
    kept = choose_layers(imp.layer, keep_layers, cfg.layer_method)
    mlp_kept = {i: _top(imp.mlp[i], keep_mlp) for i in kept}
    kv_kept = {i: _top(imp.kv[i], keep_kv) for i in kept}

    # Channel indices of each cut, per kept layer: a KV group g owns query rows
    # [g·rep·hd, (g+1)·rep·hd) and key/value rows [g·hd, (g+1)·hd).
    def rows(groups: list[int], width: int) -> torch.Tensor:
        return torch.cat([torch.arange(g * width, (g + 1) * width) for g in groups])

    index = {i: {"mlp": torch.tensor(mlp_kept[i]), "q": rows(kv_kept[i], s.rep * s.head_dim),
                 "kv": rows(kv_kept[i], s.head_dim)} for i in kept}
    new_pos = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, t in model.state_dict().items():
        if not name.startswith(prefix):
            state[name] = t
            continue
        num, rest = name[len(prefix):].split(".", 1)
        if int(num) not in new_pos:
            continue
        module, kind = rest.rsplit(".", 1)  # e.g. "self_attn.q_proj", "weight"
        if module in _CUTS:
            dim, axis = _CUTS[module]
            if kind == "weight" or dim == 0:
                t = t.index_select(dim, index[int(num)][axis].to(t.device))
        state[f"{prefix}{new_pos[int(num)]}.{rest}"] = t

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    config.intermediate_size = keep_mlp
    config.num_attention_heads = keep_kv * s.rep
    config.num_key_value_heads = keep_kv
    config.head_dim = s.head_dim
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == s.layers:
        config.layer_types = [config.layer_types[i] for i in kept]  # Qwen2 sliding / full attention per layer
    device = next(model.parameters()).device
    with torch.device(device):
        student = type(model)._from_config(config, dtype=next(model.parameters()).dtype,
                                           attn_implementation=model.config._attn_implementation)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise CogcoreError(f"pruned weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if getattr(model, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(model.generation_config)
    student.train(model.training)

    report = {
        "layer_method": cfg.layer_method,
        "kept_layers": kept,
        "dropped_layers": [i for i in range(s.layers) if i not in new_pos],
        "layer_importance": [round(float(x), 6) for x in imp.layer],
        "mlp_channels": {"before": s.intermediate, "after": keep_mlp},
        "kv_groups": {"before": s.kv_heads, "after": keep_kv, "kept": [kv_kept[i] for i in kept]},
        "heads": {"before": s.heads, "after": keep_kv * s.rep, "head_dim": s.head_dim},
        "params_before": count_params(model),
        "params_after": count_params(student),
        "calibration_tokens": imp.tokens,
    }
    return student, report


# ----------------------------------------------------------------------------- recipe step

def calibration_batches(tokenizer, data_cfg, cfg: PruneConfig) -> list[dict]:
    """Packed batches of the first ``cfg.calibration_documents`` training documents."""
    from ..train.data import load_documents, make_batch, pack
    docs, _ = load_documents(data_cfg, tokenizer)
    rows = pack(docs[: cfg.calibration_documents], data_cfg.seq_len, tokenizer.pad_token_id, data_cfg.packing)
    n, bs = len(rows), cfg.calibration_batch_size
    return [make_batch(rows, torch.arange(i, min(i + bs, n))) for i in range(0, n, bs)]


def prune_to_dir(teacher_spec: ModelSpec | str, out_dir: str | Path, cfg: PruneConfig, data_cfg,
                 device: str | torch.device | None = None, key: str = "") -> dict:
    """Prune a teacher into an HF directory (weights, tokenizer, prune_report.json/.png); return the report."""
    start = time.perf_counter()
    spec = teacher_spec if isinstance(teacher_spec, ModelSpec) else ModelSpec(source=str(teacher_spec))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(spec)
    batches = calibration_batches(tokenizer, data_cfg, cfg)  # a data problem shows before the teacher loads
    print(f"pruning {spec.source}: loading it, then {len(batches)} calibration batches", flush=True)
    teacher = load_model(spec).to(device)
    student, report = prune_model(teacher, batches, cfg)
    out_dir = Path(out_dir)
    student_hash = save_model(student.to("cpu"), tokenizer, out_dir)
    report.update({
        "teacher": spec.source, "teacher_base_hash": teacher.base_hash, "base_hash": student_hash,
        "out_dir": str(out_dir), "config": to_dict(cfg), "data": to_dict(data_cfg),
        "seconds": round(time.perf_counter() - start, 2), "key": key,
    })
    plot_layer_importance(report, out_dir / PLOT_FILE)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))  # last: its presence means done
    from ..train.loop import print_summary
    print_summary(f"pruned {spec.source}", {
        "layers": f"{len(report['kept_layers']) + len(report['dropped_layers'])} → {len(report['kept_layers'])}",
        "dropped layers": ", ".join(map(str, report["dropped_layers"])) or "none",
        "MLP channels": f"{report['mlp_channels']['before']} → {report['mlp_channels']['after']}",
        "KV groups": f"{report['kv_groups']['before']} → {report['kv_groups']['after']}",
        "params": f"{report['params_before'] / 1e6:.1f}M → {report['params_after'] / 1e6:.1f}M",
        "seconds": report["seconds"], "saved to": str(out_dir),
    })
    return report


def plot_layer_importance(report: dict, path: str | Path) -> Path:
    """Bar chart of Block Influence per teacher layer, kept layers in blue, dropped in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    values = report["layer_importance"]
    dropped = set(report["dropped_layers"])
    fig = Figure(figsize=(max(4.0, 0.3 * len(values) + 2), 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(values)), values, color=["#c0504d" if i in dropped else "#4f81bd" for i in range(len(values))])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("block influence 1 - cos(h_in, h_out)")
    ax.set_title(f"layers kept {len(values) - len(dropped)}/{len(values)} (red = dropped)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
