"""Many LoRA adapters in one batch: row i of x goes through adapter idx[i].

    delta_i = scale[idx_i] * (x_i @ A[idx_i]) @ B[idx_i]        (zero row where idx_i = -1)

Shapes: x (N, d_in), A (n_adapters, d_in, r_max), B (n_adapters, r_max, d_out),
idx (N,) long, scale (n_adapters,). Adapters of different rank share the stack by zero
padding up to r_max: padded columns of A / rows of B get zero gradient and stay zero.

Implementations (registry op "gathered_lora"):
  loop / reference  a Python loop over the adapters present, like PEFT's mixed-batch forward.
  torch             SGMV-style: rows are sorted by adapter into segments, the segments padded
                    to the longest one and pushed through two batched matmuls (bmm), then
                    gathered back. One gather in, two bmm, one gather out, whatever the number
                    of adapters; the backward is written out (4 bmm, gathers instead of
                    autograd's zero-fill + scatter). A batch already grouped by adapter in equal
                    segments (how a server or a multi-user trainer lays it out) skips both
                    gathers; inference (no grad) builds no autograd node. Batches so unbalanced that padding would
                    more than quadruple the work fall back to one matmul pair per segment.
                    (A per-row gather of A[idx] (BGMV-style) was 5-20x slower on CPU: it copies
                    N*d_in*r weights; x @ all adapters at once does n_adapters x the flops.)
  triton            BGMV kernels (one row per program: shrink x @ A, expand u @ B) for the
                    forward and for dx, SGMV-style segment reductions for dA and dB.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import registry

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SegmentPlan:
    """How the rows of one batch split into per-adapter segments (shared by all layers)."""

    n_adapters: int
    max_rows: int  # m: rows in the largest segment (>= 1)
    src_row: Tensor  # (n*m,) row of x that each padded slot reads; padding slots read row 0
    slot: Tensor  # (N,) padded slot each row's output comes from; 0 for idx == -1
    valid: Tensor | None  # (N,) bool, None when every row has an adapter
    order: Tensor  # (N_valid,) rows sorted by adapter (stable)
    seg_start: Tensor  # (n+1,) segment a is order[seg_start[a]:seg_start[a+1]]
    slot_sorted: Tensor  # (N_valid,) padded slot of order[j]
    inverse_order: Tensor | None  # (N,) when the padded layout is exactly the sorted rows (no
    # padding, every row has an adapter): then every scatter below is a gather
    contiguous: bool = False  # rows already grouped by adapter in equal segments (a batch laid
    # out for SGMV): the padded layout IS x, so no gather at all

    @property
    def n_rows(self) -> int:
        return self.slot.shape[0]


def plan_segments(idx: Tensor, n_adapters: int) -> SegmentPlan:
    """Sort a batch's rows by adapter (reads idx on the host once: one sync on CUDA)."""
    if idx.dim() != 1:
        raise ValueError(f"adapter index must be 1-D (one entry per row), got shape {tuple(idx.shape)}")
    idx = idx.long()
    n_rows = idx.shape[0]
    if n_rows and (int(idx.max()) >= n_adapters or int(idx.min()) < -1):
        raise ValueError(f"adapter index out of range: values must be -1 (no adapter) or 0..{n_adapters - 1}")
    valid = idx >= 0
    key = torch.where(valid, idx, n_adapters)  # rows without adapter sort last
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=n_adapters + 1)
    starts = torch.cumsum(counts, 0) - counts  # (n+1,)
    n_valid = n_rows - int(counts[n_adapters])
    m = max(int(counts[:n_adapters].max()) if n_adapters else 0, 1)
    pos = torch.arange(n_rows, device=idx.device) - starts[sorted_key]
    slot_sorted = (sorted_key * m + pos)[:n_valid]
    order_valid = order[:n_valid]
    slot = torch.zeros(n_rows, dtype=torch.long, device=idx.device)
    slot[order_valid] = slot_sorted
    src_row = torch.zeros(n_adapters * m, dtype=torch.long, device=idx.device)
    src_row[slot_sorted] = order_valid
    seg_start = torch.cat([starts[:n_adapters], starts.new_tensor([n_valid])])
    dense = n_valid == n_rows == n_adapters * m
    contiguous = dense and bool(torch.equal(order_valid, torch.arange(n_rows, device=idx.device)))
    return SegmentPlan(
        n_adapters,
        m,
        src_row,
        slot,
        None if n_valid == n_rows else valid,
        order_valid,
        seg_start,
        slot_sorted,
        torch.argsort(order_valid) if dense else None,
        contiguous,
    )


class _PlanCache:
    """Last few plans keyed by the identity (and version) of the index tensor they came from.

    Every LoRA layer of a model sees the same index tensor in a step, so the sort runs once.
    A weak reference guards against a new tensor reusing a dead one's id.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: list[tuple[weakref.ref, int, int, SegmentPlan]] = []

    def get(self, idx: Tensor, n_adapters: int) -> SegmentPlan:
        for ref, version, n, plan in self.entries:
            if ref() is idx and version == idx._version and n == n_adapters:
                return plan
        plan = plan_segments(idx, n_adapters)
        self.entries = [(weakref.ref(idx), idx._version, n_adapters, plan), *self.entries[: self.size - 1]]
        return plan


_PLANS = _PlanCache()


def _lora_loop(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, scale: Tensor) -> Tensor:
    out = x.new_zeros(x.shape[0], B.shape[2])
    for a in idx.unique().tolist():
        if a < 0:
            continue
        rows = (idx == a).nonzero().squeeze(1)
        out.index_add_(0, rows, (x[rows] @ A[a]) @ B[a] * scale[a].to(x.dtype))
    return out


def _segment_forward(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, plan: SegmentPlan):
    """(out, X, Us): the SGMV forward, plus what the backward needs."""
    n, d_in, _ = A.shape
    m = plan.max_rows
    if plan.contiguous:  # already in segment layout: views, no copies
        X = x.contiguous().view(n, m, d_in)
    else:
        X = x.index_select(0, plan.src_row).view(n, m, d_in)  # (n, m, d_in), padding = copies of row 0
    Us = torch.bmm(X, A).mul_(scale.to(x.dtype).view(n, 1, 1))  # (n, m, r), scaled
    Y = torch.bmm(Us, B).view(n * m, B.shape[2])
    out = Y if plan.contiguous else Y.index_select(0, plan.slot)  # (N, d_out)
    if plan.valid is not None:
        out.masked_fill_(~plan.valid.unsqueeze(1), 0.0)
    return out, X, Us


class _SegmentLoRA(torch.autograd.Function):
    """SGMV-style forward/backward with explicit gathers: autograd's own backward of the
    index ops would zero-fill and scatter (N, d) buffers, which dominated on CPU."""

    @staticmethod
    def forward(ctx, x, A, B, scale, plan: SegmentPlan):
        out, X, Us = _segment_forward(x, A, B, scale, plan)
        ctx.save_for_backward(X, Us, A, B, scale)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, dout):
        X, Us, A, B, scale = ctx.saved_tensors
        plan = ctx.plan
        n, m, d_in = X.shape
        if plan.contiguous:
            dY = dout.contiguous()
        elif plan.inverse_order is not None:  # padded layout == rows sorted by adapter
            dY = dout.index_select(0, plan.order)
        else:  # padding slots must stay zero: they read row 0 and would leak into dA / dB
            dY = dout.new_zeros(n * m, dout.shape[1]).index_copy_(
                0, plan.slot_sorted, dout.index_select(0, plan.order)
            )
        dY = dY.view(n, m, -1)
        dB = torch.bmm(Us.transpose(1, 2), dY) if ctx.needs_input_grad[2] else None
        dU = torch.bmm(dY, B.transpose(1, 2)).mul_(scale.to(dY.dtype).view(n, 1, 1))  # (n, m, r)
        dA = torch.bmm(X.transpose(1, 2), dU) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dX = torch.bmm(dU, A.transpose(1, 2)).view(n * m, d_in)
            if plan.contiguous:
                dx = dX
            elif plan.inverse_order is not None:
                dx = dX.index_select(0, plan.inverse_order)
            else:
                dx = dX.new_zeros(plan.n_rows, d_in).index_copy_(
                    0, plan.order, dX.index_select(0, plan.slot_sorted)
                )
        return dx, dA, dB, None, None


def _lora_torch(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, scale: Tensor) -> Tensor:
    n = A.shape[0]
    plan = _PLANS.get(idx, n)
    if n * plan.max_rows > 4 * x.shape[0] + 64:  # padding would dominate: a matmul pair per segment
        starts = plan.seg_start.tolist()
        xs = x.index_select(0, plan.order)
        ys = [
            (xs[starts[a] : starts[a + 1]] @ A[a]) @ B[a] * scale[a].to(x.dtype)
            for a in range(n)
            if starts[a + 1] > starts[a]
        ]
        return x.new_zeros(x.shape[0], B.shape[2]).index_copy(0, plan.order, torch.cat(ys))
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _SegmentLoRA.apply(x, A, B, scale, plan)
    return _segment_forward(x, A, B, scale, plan)[0]  # inference (serving): no autograd node


def _lora_triton(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, scale: Tensor) -> Tensor:
    from .triton_lora import gathered_lora_triton

    return gathered_lora_triton(x, A, B, idx, scale, _PLANS.get(idx, A.shape[0]))


registry.register("gathered_lora", "reference", _lora_loop)
registry.register("gathered_lora", "loop", _lora_loop)
registry.register("gathered_lora", "torch", _lora_torch)
registry.register("gathered_lora", "triton", _lora_triton, requires=("triton",))
registry.register_auto(
    "gathered_lora",
    lambda device, size: (
        ("triton", "torch") if device is not None and torch.device(device).type == "cuda" else ("torch",)
    ),
)


def gathered_lora(
    x: Tensor, A: Tensor, B: Tensor, idx: Tensor, scale: Tensor, *, impl: str = "auto"
) -> Tensor:
    """delta (N, d_out): row i is scale[idx_i] * (x_i @ A[idx_i]) @ B[idx_i], 0 where idx_i = -1.

    Differentiable in x, A and B. impl: "auto", "loop" (= "reference"), "torch", "triton".
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
        raise ValueError(
            f"A must be (n_adapters, d_in, r_max) and B (n_adapters, r_max, d_out); got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if x.dim() != 2 or x.shape[1] != A.shape[1]:
        raise ValueError(f"x must be (N, d_in={A.shape[1]}), got {tuple(x.shape)}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"idx must be ({x.shape[0]},) like x's rows, got {tuple(idx.shape)}")
    if scale.shape != (A.shape[0],):
        raise ValueError(f"scale must be ({A.shape[0]},), one per adapter, got {tuple(scale.shape)}")
    if not (x.dtype == A.dtype == B.dtype):
        raise ValueError(f"x, A and B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    fn = registry.get_kernel("gathered_lora", impl, device=x.device, size=x.shape[0])
    if x.shape[0] == 0:
        return x.new_zeros(0, B.shape[2])
    return fn(x, A, B, idx, scale)


# ---------------------------------------------------------------- module + opt-in patch


class MultiLoRALinear(nn.Module):
    """A linear layer (any module with in_features/out_features, e.g. nn.Linear or a
    bitsandbytes Linear4bit) plus a stack of LoRA adapters chosen per row.

    y = base(x) + gathered_lora(x, A, B, adapter_index, scale). `adapter_index` is None (base
    only), one entry per row of x flattened to (-1, d_in), or one per sequence when x is
    (batch, seq, d_in). A is initialised like PEFT's lora_A (Kaiming-uniform), B to zero, so a
    fresh adapter changes nothing. No dropout.
    """

    def __init__(
        self,
        base: nn.Module,
        n_adapters: int,
        rank: int | Sequence[int],
        alpha: float | Sequence[float] | None = None,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        ranks = [rank] * n_adapters if isinstance(rank, int) else list(rank)
        alphas = (
            ranks
            if alpha is None
            else ([alpha] * n_adapters if isinstance(alpha, (int, float)) else list(alpha))
        )
        if len(ranks) != n_adapters or len(alphas) != n_adapters or min(ranks, default=1) < 1:
            raise ValueError(f"need {n_adapters} ranks >= 1 and alphas, got ranks={ranks} alphas={alphas}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.ranks = ranks
        self.impl = impl
        r_max = max(ranks)
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        device = weight.device if weight is not None else None
        self.lora_A = nn.Parameter(
            torch.zeros(n_adapters, self.in_features, r_max, dtype=dtype, device=device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(n_adapters, r_max, self.out_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "scale", torch.tensor([a / r for a, r in zip(alphas, ranks)], dtype=torch.float32, device=device)
        )
        with torch.no_grad():
            for a, r in enumerate(ranks):
                bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, d_in)
                self.lora_A[a, :, :r].uniform_(-bound, bound)
        self.adapter_index: Tensor | None = None

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    def set_adapter_weights(self, adapter: int, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
        """Load one adapter from PEFT's layout: lora_A (r, d_in), lora_B (d_out, r), scale = alpha / r."""
        r = lora_A.shape[0]
        if (
            r > self.lora_A.shape[2]
            or lora_A.shape[1] != self.in_features
            or lora_B.shape != (self.out_features, r)
        ):
            raise ValueError(
                f"adapter weights A {tuple(lora_A.shape)} / B {tuple(lora_B.shape)} do not fit this layer "
                f"(d_in={self.in_features}, d_out={self.out_features}, r_max={self.lora_A.shape[2]})"
            )
        with torch.no_grad():
            self.lora_A[adapter].zero_()
            self.lora_B[adapter].zero_()
            self.lora_A[adapter, :, :r] = lora_A.T
            self.lora_B[adapter, :r, :] = lora_B.T
            self.scale[adapter] = scale
        self.ranks[adapter] = r

    def _row_index(self, x: Tensor) -> Tensor:
        idx = self.adapter_index
        n_rows = x.numel() // self.in_features
        if idx.numel() == n_rows:  # the same tensor object each call: the plan cache is keyed on it
            return idx if idx.dim() == 1 else idx.reshape(-1)
        if x.dim() == 3 and idx.numel() == x.shape[0]:  # one adapter per sequence
            return _EXPANDED.get(idx, x.shape[1])
        raise ValueError(
            f"adapter_index has {idx.numel()} entries; x {tuple(x.shape)} needs one per row ({n_rows}) "
            f"or one per sequence ({x.shape[0]})"
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.adapter_index is None:
            return y
        x2 = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        # The adapters' own dtype, also under autocast: autocast would run the segment matmuls in
        # bf16 while their hand-written backward (outside autocast) meets fp32 weights.
        with torch.autocast(x.device.type, enabled=False):
            delta = gathered_lora(x2, self.lora_A, self.lora_B, self._row_index(x), self.scale, impl=self.impl)
        return y + delta.view(*y.shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"n_adapters={self.n_adapters}, ranks={self.ranks}, impl={self.impl!r}"


class _ExpandCache:
    """Per-sequence index -> per-row index, once per (index tensor, seq_len) for all layers."""

    def __init__(self):
        self.entry = None

    def get(self, idx: Tensor, seq_len: int) -> Tensor:
        if self.entry is not None:
            ref, version, t, rows = self.entry
            if ref() is idx and version == idx._version and t == seq_len:
                return rows
        rows = idx.reshape(-1).repeat_interleave(seq_len)
        self.entry = (weakref.ref(idx), idx._version, seq_len, rows)
        return rows


_EXPANDED = _ExpandCache()


class MultiLoRAPatch:
    """Returned by `apply_multi_lora`: call it to put the original layers back."""

    def __init__(self, model: nn.Module, layers: dict[str, MultiLoRALinear], originals: dict[str, nn.Module]):
        self.model = model
        self.layers = layers
        self._originals = originals

    def set_adapter_index(self, idx: Tensor | None) -> None:
        """Route rows (or sequences) to adapters in every wrapped layer; None = base model only."""
        for layer in self.layers.values():
            layer.adapter_index = idx

    def __call__(self) -> None:
        for name, original in self._originals.items():
            _set_submodule(self.model, name, original)
        self._originals = {}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# A decoder layer's index in a module name: model.layers.17.mlp.up_proj, transformer.h.3.attn.c_attn
# (the layer-list names PEFT's layers_to_transform looks for by default).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The decoder layer a module sits in (``model.layers.17.mlp.up_proj`` -> 17), or None."""
    m = _LAYER_INDEX.search(module_name)
    return int(m.group(1)) if m else None


def resolve_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Decoder-layer indices as PEFT's ``layers_to_transform`` takes them: sorted, each in
    range; negative ones count from the last layer (-1). Empty or None selects every layer ([])."""
    if not layers:
        return []
    n = 1 + max((i for name, _ in model.named_modules() if (i := layer_index(name)) is not None), default=-1)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no numbered decoder layers (model.layers.<i>...): "
                         "adapt every layer (leave the layer list empty)")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the model has {n} decoder layers "
                         f"(0..{n - 1}, or -{n}..-1 from the last)")
    return sorted({i % n for i in layers})


def targeted_linears(model: nn.Module, target_modules: Sequence[str],
                     layers: Sequence[int] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linear layers an adapter goes on, in model order: named in
    `target_modules` (last name component, PEFT's `target_modules`) and inside `layers`
    (decoder-layer indices, PEFT's `layers_to_transform`; None = all). Already-wrapped ones are skipped."""
    targets = set(target_modules)
    keep = set(resolve_layers(model, layers))
    return [(name, module) for name, module in model.named_modules()
            if name.rpartition(".")[2] in targets and hasattr(module, "in_features")
            and hasattr(module, "out_features") and not isinstance(module, MultiLoRALinear)
            and (not keep or layer_index(name) in keep)]


def apply_multi_lora(
    model: nn.Module,
    n_adapters: int,
    rank: int | Sequence[int],
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    alpha: float | Sequence[float] | None = None,
    *,
    layers: Sequence[int] | None = None,
    impl: str = "auto",
) -> MultiLoRAPatch:
    """Wrap this model's linear layers named in `target_modules` (last name component) in
    `MultiLoRALinear`s with `n_adapters` adapters of `rank` (alpha defaults to rank: scale 1).
    `layers` keeps only those decoder layers (indices; negative from the last; None = all),
    like PEFT's `layers_to_transform`.

    Only this instance changes. The base weights are left as they are (freeze them yourself if
    you train adapters). Returns a `MultiLoRAPatch`: `.set_adapter_index(idx)` routes rows,
    `.layers` holds the wrappers, calling it restores the original modules (the adapters go).
    """
    found = targeted_linears(model, target_modules, layers)
    if not found:
        where = f" in layers {list(layers)}" if layers else ""
        raise ValueError(f"no linear layer named any of {sorted(target_modules)}{where} in {type(model).__name__}")
    wrappers, originals = {}, {}
    for name, module in found:
        wrapped = MultiLoRALinear(module, n_adapters, rank, alpha, impl=impl)
        _set_submodule(model, name, wrapped)
        wrappers[name], originals[name] = wrapped, module
    return MultiLoRAPatch(model, wrappers, originals)


__all__ = [
    "DEFAULT_TARGETS",
    "MultiLoRALinear",
    "MultiLoRAPatch",
    "SegmentPlan",
    "apply_multi_lora",
    "gathered_lora",
    "layer_index",
    "plan_segments",
    "resolve_layers",
    "targeted_linears",
]
