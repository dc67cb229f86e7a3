"""Recipe: supervised fine-tuning / continued pretraining with a per-token loss mask.

    cogcore sft --config configs/sft/tiny.yaml
    cogcore sft model.source=smollm2-135m data.source=chats.jsonl lora.r=16

Reads top to bottom: load model and data → (optional LoRA) → the one training loop →
save an HF directory (or a PEFT adapter) with base_hash, metrics and a summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import check_resume
from .config import field
from .data import DataConfig, load_documents, pack
from .distributed import DistInfo, barrier, setup
from .lm import CausalLMLoss
from .loop import TrainConfig, TrainResult, print_summary, train
from .model import ModelSpec, count_params, load_model, load_tokenizer, save_model
from .workspace import run_dir as workspace_run_dir


@dataclass
class LoraConfig:
    r: int = field(0, help="LoRA rank; 0 trains every weight (full fine-tuning)")
    alpha: float = field(16.0, help="LoRA alpha (scale = alpha / r)")
    dropout: float = field(0.0, help="LoRA dropout")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="names of the linear layers that get adapters")

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r}")


@dataclass
class SFTConfig:
    name: str = field("sft", help="run name: the run lives in <home>/runs/<name> unless out is set")
    out: str = field("", help="run directory (default <home>/runs/<name>)")
    model: ModelSpec = field(default_factory=ModelSpec, help="the model to train")
    data: DataConfig = field(default_factory=DataConfig, help="training data")
    train: TrainConfig = field(default_factory=TrainConfig, help="the training loop")
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA adapter (r=0: full fine-tuning)")

    def __post_init__(self):
        if self.train.eval_every and not self.data.eval_documents:
            raise ValueError(f"train.eval_every={self.train.eval_every} needs held-out documents: set "
                             "data.eval_documents (or train.eval_every=0)")


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def run(cfg: SFTConfig, di: DistInfo | None = None, stop_after: int | None = None) -> TrainResult:
    di = di or setup()
    run_dir = workspace_run_dir(cfg.name, cfg.out)
    check_resume(run_dir, cfg.train, asdict(cfg))  # before loading anything
    torch.manual_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    base = model.base_hash
    if cfg.lora.r > 0:
        model = add_lora(model, cfg.lora)

    train_docs, eval_docs = load_documents(cfg.data, tokenizer)
    rows = pack(train_docs, cfg.data.seq_len, tokenizer.pad_token_id, cfg.data.packing)
    eval_rows = pack(eval_docs, cfg.data.seq_len, tokenizer.pad_token_id, cfg.data.packing) if eval_docs else None
    if di.is_main:
        print(f"data: {len(train_docs)} documents -> {len(rows)} rows of {cfg.data.seq_len} tokens, "
              f"padding {rows.padding_fraction:.1%}; model {count_params(model):,} params, base {base[:12]}", flush=True)

    result = train(CausalLMLoss(model), rows, cfg.train, run_dir, di, eval_rows=eval_rows,
                   base_hash=base, run_config=asdict(cfg), stop_after=stop_after)

    if result.steps >= cfg.train.max_steps:
        _save_outputs(model, tokenizer, cfg, run_dir, di, result, base, rows.padding_fraction)
    return result


def _save_outputs(model, tokenizer, cfg: SFTConfig, run_dir: Path, di: DistInfo, result: TrainResult,
                  base: str, padding: float) -> None:
    """Final model (HF dir, or PEFT adapter + base_hash), config and summary; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if di.is_main:
        from .config import save_config
        save_config(cfg, run_dir / "config.yaml")
        if cfg.lora.r > 0:
            model.save_pretrained(run_dir / "adapter")
            (run_dir / "adapter" / "cogcore.json").write_text(json.dumps({"base_hash": base}))
            out_hash = base
        else:
            out_hash = save_model(model, tokenizer, run_dir / "model", state_dict=full)
        summary = {"steps": result.steps, "tokens_seen": result.tokens_seen, "trained_tokens": result.trained_tokens,
                   "loss_weight_sum": result.loss_weight_sum, "final_loss": result.final_loss,
                   "eval_loss": result.eval_loss, "elapsed_s": result.elapsed_s, "tokens_per_s": result.tokens_per_s,
                   "padding_fraction": padding, "base_hash": base, "output_hash": out_hash,
                   "params": count_params(model), "world_size": di.world_size, "strategy": di.strategy,
                   "device": str(di.device),
                   "resumed_from": result.resumed_from, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(f"sft {cfg.name}", {"run": str(run_dir), "steps": result.steps, "final loss": result.final_loss,
                                          "eval loss": result.eval_loss if result.eval_loss is not None else "-",
                                          "tokens/s": result.tokens_per_s, "padding": f"{padding:.1%}",
                                          "output": str(run_dir / ("adapter" if cfg.lora.r > 0 else "model"))})
    barrier()
