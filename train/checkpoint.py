"""Checkpoints: one format, written atomically, resumed exactly.

A checkpoint is a directory ``<run>/checkpoints/step-00000100/`` holding
  * ``trainable.pt``  — the trainable parameters (all of them for full fine-tuning, the
    adapter for LoRA; frozen weights come back from the base model, whose hash is checked),
  * ``optimizer.pt``, ``scheduler.pt``,
  * ``rng-rank{r}.pt`` — every rank's python / numpy / torch RNG states,
  * ``state.json``    — step, tokens seen, elapsed time, base_hash, the run's config.
It is built in a temp sibling and renamed into place, so a process killed mid-write leaves
the previous checkpoint as the latest complete one. The data position is the step itself
(see :class:`~cogcore.train.data.BatchPlan`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import CogcoreError
from .distributed import DistInfo, barrier

STATE = "state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _full_state(module, optimizer, di: DistInfo):
    """Full (unsharded) trainable state and optimizer state, on CPU; collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd = get_model_state_dict(module, options=opts)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    return model_sd, optim_sd


def save(run_dir: Path, step: int, module, optimizer, scheduler, di: DistInfo, state: dict,
         keep: int = 2, engine=None) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if di.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if engine is not None:  # DeepSpeed writes its own sharded model + optimizer files
        engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
    else:
        model_sd, optim_sd = _full_state(module, optimizer, di)
        if di.is_main:
            torch.save(model_sd, tmp / "trainable.pt")
            torch.save(optim_sd, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / f"rng-rank{di.rank}.pt")
    barrier()
    if di.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        older = sorted(p for p in root.glob("step-*") if (p / STATE).is_file() and p != final)
        for p in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load(path: Path, module, optimizer, scheduler, di: DistInfo, base_hash: str | None, engine=None) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    state = json.loads((path / STATE).read_text())
    if base_hash and state.get("base_hash") and state["base_hash"] != base_hash:
        raise CogcoreError(
            f"checkpoint {path} was made for base model {state['base_hash'][:12]}, but this run's model is "
            f"{base_hash[:12]}: resume with the original model, or start a fresh run (train.resume=never or a new --out).")
    if engine is not None:
        engine.load_checkpoint(str(path), tag="deepspeed")
    else:
        try:
            model_sd = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
            optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        except Exception as e:
            raise CogcoreError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); delete that folder to resume from an older one") from None
        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        set_model_state_dict(module, model_sd, options=opts)
        set_optimizer_state_dict(module, optimizer, optim_sd, options=opts)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-rank{di.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
