"""The one training loop. Every recipe (sft, distill, adapter refresh) runs through ``train``.

A recipe hands over
  * a ``module`` whose ``forward(batch)`` returns ``{"loss_sum": Σ w_i·loss_i, "weight": Σ w_i}``
    (per-token loss weights are the one mechanism for masks, answer up-weighting and
    knowledge shedding), and
  * packed rows (:class:`~cogcore.train.data.PackedRows`).
The loop owns everything else: distributed wrapping, AdamW with warmup + cosine, gradient
accumulation normalised by the true token weight across micro-batches and ranks, autocast,
clipping, checkpoints with exact resume, metrics (JSONL, TensorBoard), a progress bar and
the end-of-run summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from . import checkpoint
from .config import CogcoreError, field
from .data import BatchPlan, PackedRows, make_batch
from .distributed import DistInfo, all_reduce_sum, barrier, deepspeed_config


@dataclass
class TrainConfig:
    max_steps: int = field(100, help="optimizer steps to run")
    micro_batch: int = field(4, help="rows per forward pass on each process")
    grad_accum: int = field(1, help="micro-batches accumulated per optimizer step")
    lr: float = field(3e-4, help="peak learning rate")
    min_lr_ratio: float = field(0.1, help="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = field(10, help="linear warmup steps")
    weight_decay: float = field(0.0, help="AdamW weight decay (matrices only, not norms/biases)")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.95, help="AdamW beta2")
    adam_eps: float = field(1e-8, help="AdamW epsilon: a larger one damps the steps of weights whose gradients are "
                                       "tiny (Adam otherwise moves every weight by about lr per step)")
    optimizer: Literal["adamw", "adamw8bit"] = field("adamw", help="adamw8bit needs bitsandbytes")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0 = off)")
    precision: Literal["auto", "fp32", "bf16"] = field(
        "auto", help="bf16 autocast or fp32; auto = bf16 on a GPU that supports it, else fp32")
    seed: int = field(0, help="seed for data order and initialisation")
    log_every: int = field(1, help="write metrics every N steps")
    save_every: int = field(0, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    eval_every: int = field(0, help="run the held-out evaluation every N steps (0 = only at the end)")
    resume: Literal["auto", "never", "force"] = field(
        "auto", help="auto = continue from the run's latest checkpoint (refused if a key that changes the result "
                     "differs from the run's config); never = start over; force = continue even so")
    tensorboard: bool = field(True, help="also log to TensorBoard when it is installed")
    progress: bool = field(True, help="show a progress bar")

    def __post_init__(self):
        for name in ("max_steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.adam_eps <= 0:
            raise ValueError(f"train.adam_eps must be > 0 (torch's default is 1e-8), got {self.adam_eps}")


@dataclass
class TrainResult:
    steps: int
    tokens_seen: float         # input tokens the model read (padding excluded), over the whole run
    final_loss: float
    losses: list[float]
    eval_loss: float | None
    elapsed_s: float
    tokens_per_s: float        # input tokens per second of this process's training steps
    resumed_from: int | None
    run_dir: str
    trained_tokens: float = 0.0   # positions that carried loss (weight > 0)
    loss_weight_sum: float = 0.0  # sum of their loss weights: what the loss is normalised by


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = min(cfg.warmup_steps, cfg.max_steps // 2)  # a short run still gets to decay

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, cfg.max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise CogcoreError("train.optimizer=adamw8bit needs bitsandbytes (pip install 'cogcore[gpu]')") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def wrap(module: nn.Module, di: DistInfo) -> nn.Module:
    if di.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[di.local_rank] if di.device.type == "cuda" else None)
    if di.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        # Shard each decoder layer, then the root (embeddings, final norm, lm_head, loss).
        lm = getattr(module, "model", module)
        layers = getattr(lm.get_decoder(), "layers", []) if hasattr(lm, "get_decoder") else []
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    return module


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (the process was killed mid-write) is
    dropped; a broken line before it is an error naming the file and the line."""
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    rows = []
    for n, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines):  # torn by a kill mid-write: the checkpoint has the state anyway
                break
            raise CogcoreError(f"{path} line {n} is not a metrics row ({str(e)[:80]}); delete that line (or the "
                               "file, losing the logged curve) and rerun") from None
        rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed: JSONL is enough
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def evaluate(module: nn.Module, rows: PackedRows, micro_batch: int, di: DistInfo,
             prepare_batch: Callable[[dict, int | None], dict] | None = None, amp: torch.dtype | None = None) -> float:
    """Token-weighted mean loss over held-out rows (rows split across ranks)."""
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    weight = torch.zeros((), dtype=torch.float64)
    idx = torch.arange(len(rows))[di.rank::di.world_size]
    for s in range(0, len(idx), micro_batch):
        batch = _to(make_batch(rows, idx[s:s + micro_batch]), di.device)
        if prepare_batch is not None:
            batch = prepare_batch(batch, None)
        with torch.autocast(di.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = module(batch)
        loss_sum += out["loss_sum"].double().cpu()
        weight += out["weight"].double().cpu()
    module.train(was_training)
    loss_sum, weight = all_reduce_sum(loss_sum), all_reduce_sum(weight)
    return float(loss_sum / weight.clamp_min(1e-9))


def check_rows_fit(n_rows: int, cfg: TrainConfig, world_size: int = 1) -> None:
    """One optimizer step needs micro_batch x grad_accum x processes rows; say so before any work."""
    need = cfg.micro_batch * cfg.grad_accum * world_size
    if n_rows < need:
        raise CogcoreError(f"the dataset packs into {n_rows} rows but one step needs {need} "
                           f"(micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum} x {world_size} processes); "
                           "add data, shorten data.seq_len or lower the batch size")


def train(
    module: nn.Module,
    rows: PackedRows,
    cfg: TrainConfig,
    run_dir: str | Path,
    di: DistInfo,
    *,
    eval_rows: PackedRows | None = None,
    prepare_batch: Callable[[dict, int | None], dict] | None = None,
    base_hash: str | None = None,
    run_config: dict | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``module`` on ``rows``; resumable, multi-process aware. See the module docstring.

    ``prepare_batch(batch, step)`` runs on every micro-batch before the forward pass (e.g. to
    attach a teacher's outputs); ``step`` is None during evaluation. ``stop_after`` ends the run early after that many steps (tests).
    """
    run_dir = Path(run_dir)
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    torch.manual_seed(cfg.seed)
    plan = BatchPlan(len(rows), cfg.micro_batch, cfg.grad_accum, di.world_size, cfg.seed)
    check_rows_fit(len(rows), cfg, di.world_size)
    module.to(di.device)
    if not any(p.requires_grad for p in module.parameters()):
        raise CogcoreError("the model has no trainable parameters")
    amp = autocast_dtype(cfg, di.device)

    engine = None
    if di.strategy.startswith("zero"):
        import deepspeed
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        ds_cfg = deepspeed_config(di.strategy, cfg.micro_batch, cfg.grad_accum, cfg.grad_clip, amp is not None)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_cfg)
        model = engine
    else:
        model = wrap(module, di)
        # after wrapping: FSDP2 swaps parameters for sharded DTensor ones
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    start_step, tokens_seen, elapsed_before, resumed_from = 0, 0.0, 0.0, None
    trained_tokens, weight_seen = 0.0, 0.0
    ckpt = checkpoint.latest_checkpoint(run_dir) if cfg.resume != "never" else None
    resume_flat = checkpoint.resume_config(asdict(cfg), run_config)
    if ckpt is not None:
        changes = checkpoint.check_config(ckpt, checkpoint.read_state(ckpt), resume_flat, force=cfg.resume == "force")
        if changes and di.is_main:
            print(f"train.resume=force: resuming {ckpt} although "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes), flush=True)
        state = checkpoint.load(ckpt, model if engine is None else module, optimizer, scheduler, di, base_hash, engine)
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        # checkpoints from before these were counted apart hold the weight sum in tokens_seen
        trained_tokens = state.get("trained_tokens", 0.0)
        weight_seen = state.get("loss_weight_sum", state["tokens_seen"] if "trained_tokens" not in state else 0.0)
        resumed_from = start_step
        if di.is_main:
            print(f"resuming from {ckpt} (step {start_step})", flush=True)

    log = MetricsLog(run_dir, start_step, di.is_main, cfg.tensorboard)
    bar = None
    if di.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def ckpt_state(step: int) -> dict:
        return {"step": step, "tokens_seen": tokens_seen, "trained_tokens": trained_tokens,
                "loss_weight_sum": weight_seen, "elapsed_s": elapsed_before + time.time() - t0,
                "base_hash": base_hash, "config": run_config or {}, "train": asdict(cfg),
                "config_hash": checkpoint.config_hash(resume_flat)}

    losses: list[float] = []
    eval_loss = None
    t0 = time.time()
    run_tokens, run_time = 0.0, 0.0
    last_step = min(cfg.max_steps, start_step + stop_after) if stop_after else cfg.max_steps
    model.train()
    for step in range(start_step, last_step):
        t_step = time.time()
        micro = [_to(make_batch(rows, idx), di.device) for idx in plan.micro_batches(step, di.rank)]
        if prepare_batch is not None:  # e.g. attach teacher outputs, or swap in on-policy samples
            micro = [prepare_batch(b, step) for b in micro]
        # Normalise by the step's true token weight over every micro-batch on every rank, so
        # a long document counts as much under accumulation / sharding as in one big batch.
        local = torch.tensor([[float(b["target_weights"].sum()), _real_tokens(b),
                               float((b["target_weights"] > 0).sum())] for b in micro], dtype=torch.float64).sum(0)
        total_w, step_tokens, step_trained = all_reduce_sum(local).tolist()
        if total_w <= 0:
            raise CogcoreError(f"step {step}: every target token has weight 0; check the data's loss masks")
        scale = di.world_size / total_w  # DDP/FSDP/ZeRO average gradients over ranks: undo that
        step_loss = torch.zeros((), dtype=torch.float64)
        extra: dict[str, float] = {}
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = model.no_sync() if (di.strategy == "ddp" and not sync) else _null()
            if di.strategy == "fsdp2":
                model.set_requires_gradient_sync(sync)
            with ctx:
                with torch.autocast(di.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out = model(batch)
                loss = out["loss_sum"].float() * scale
                if engine is not None:
                    # DeepSpeed divides by grad_accum itself; our scale already normalises.
                    engine.backward(loss * cfg.grad_accum)
                    engine.step()
                else:
                    loss.backward()
            step_loss += out["loss_sum"].detach().double().cpu()
            for k, v in out.items():
                if k not in ("loss_sum", "weight") and torch.is_tensor(v):
                    extra[k] = extra.get(k, 0.0) + float(v.detach())
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            if cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            else:
                gn = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss = float(all_reduce_sum(step_loss)) / total_w
        losses.append(step_loss)
        tokens_seen += step_tokens
        trained_tokens += step_trained
        weight_seen += total_w
        dt = time.time() - t_step
        run_tokens += step_tokens
        run_time += dt
        done = step + 1
        if di.is_main and (done % cfg.log_every == 0 or done == cfg.max_steps):
            row = {"step": done, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens": tokens_seen, "tokens_per_s": step_tokens / max(dt, 1e-9),
                   "trained_tokens": trained_tokens, "loss_weight_sum": weight_seen,
                   "epoch": plan.epoch_of(done), "elapsed_s": elapsed_before + time.time() - t0}
            row.update({k: v / total_w * di.world_size for k, v in extra.items()})
            log.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{run_tokens / max(run_time, 1e-9):,.0f}")
        if eval_rows is not None and len(eval_rows) and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            ev = evaluate(model, eval_rows, cfg.micro_batch, di, prepare_batch, amp)
            if di.is_main:
                log.write({"step": done, "eval_loss": ev})
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            checkpoint.save(run_dir, done, model if engine is None else module, optimizer, scheduler, di,
                            ckpt_state(done), cfg.keep_checkpoints, engine)
    if bar is not None:
        bar.close()
    if eval_rows is not None and len(eval_rows):
        eval_loss = evaluate(model, eval_rows, cfg.micro_batch, di, prepare_batch, amp)
        if di.is_main:
            log.write({"step": last_step, "eval_loss": eval_loss})
    log.close()
    final_loss = losses[-1] if losses else float("nan")
    if not losses and resumed_from is not None:
        final_loss = _last_logged_loss(run_dir)
    elapsed = elapsed_before + time.time() - t0
    return TrainResult(steps=last_step, tokens_seen=tokens_seen, final_loss=final_loss, losses=losses,
                       eval_loss=eval_loss, elapsed_s=elapsed, tokens_per_s=run_tokens / max(run_time, 1e-9),
                       resumed_from=resumed_from, run_dir=str(run_dir), trained_tokens=trained_tokens,
                       loss_weight_sum=weight_seen)


def _real_tokens(batch: dict) -> float:
    """Input tokens of a batch that are not padding (every token when the batch does not say)."""
    if "doc_ids" in batch:
        return float((batch["doc_ids"] >= 0).sum())
    return float(batch["input_ids"].numel())


def _last_logged_loss(run_dir: Path) -> float:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan")
    rows = [r for r in read_metrics(path) if "loss" in r]
    return rows[-1]["loss"] if rows else float("nan")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def print_summary(title: str, rows: dict[str, object]) -> None:
    """A short end-of-run table."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        table.add_row(k, f"{v:,.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
