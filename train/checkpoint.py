"""Checkpoints: one format, written atomically, resumed exactly.

A checkpoint is a directory ``<run>/checkpoints/step-00000100/`` holding
  * ``trainable.pt``  — the trainable parameters (all of them for full fine-tuning, the
    adapter for LoRA; frozen weights come back from the base model, whose hash is checked),
  * ``optimizer.pt``, ``scheduler.pt``,
  * ``rng-rank{r}.pt`` — every rank's python / numpy / torch RNG states,
  * ``state.json``    — step, tokens seen, elapsed time, base_hash, the run's config (and a
    hash of its keys that change the result).
It is built in a temp sibling and renamed into place, so a process killed mid-write leaves
the previous checkpoint as the latest complete one. The data position is the step itself
(see :class:`~cogcore.train.data.BatchPlan`).

A resume compares the new config with the checkpoint's: a key that changes what a step
computes (lr, seq_len, data, loss...) must be the same, or the resume is refused with the
differing keys listed (``train.resume=force`` overrides; a new run name starts fresh). Keys
in :data:`MAY_CHANGE_ON_RESUME` (how long the run goes, what it logs) may change.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import CogcoreError
from .distributed import DistInfo, barrier

STATE = "state.json"

# Keys that may differ between a run and its resume: they say how long the run goes, how often
# it logs / saves / evaluates and where it lives, not what any step computes.
MAY_CHANGE_ON_RESUME = frozenset({
    "train.max_steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
    "train.progress", "train.tensorboard", "train.resume", "name", "out", "cache.build_if_missing",
    "cache.shard_rows",
})


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
    # a frozen weight tied to another name (lm_head = embed_tokens) slips through ignore_frozen_params:
    # for a LoRA on SmolLM2 that is 113 MB of base weights in every checkpoint
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k not in frozen}
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


def _unreadable(path: Path, e: Exception) -> CogcoreError:
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return CogcoreError(f"checkpoint file {path} is unreadable ({type(e).__name__}{': ' + msg if msg else ''}); "
                        f"delete the folder {path.parent} to resume from an older checkpoint, or start over with "
                        "train.resume=never")


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json``; a torn or edited file is one clear error, not a traceback."""
    f = Path(path) / STATE
    try:
        state = json.loads(f.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step' in it")
    except (OSError, ValueError) as e:
        raise _unreadable(f, e) from None
    return state


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, values as JSON would store them."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_config(train_cfg: dict, run_config: dict | None) -> dict:
    """The flat config a checkpoint records: the recipe's config, and the loop's under ``train.``."""
    flat = flat_config(json.loads(json.dumps(run_config or {}, default=str)))
    flat.update(flat_config(json.loads(json.dumps({"train": train_cfg}, default=str))))
    return flat


def config_hash(flat: dict) -> str:
    """Hash of the keys that change the result (everything but :data:`MAY_CHANGE_ON_RESUME`)."""
    keep = {k: v for k, v in sorted(flat.items()) if k not in MAY_CHANGE_ON_RESUME}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def config_changes(state: dict, new_flat: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint value, new value) for every result-changing key that differs.

    Keys only one side has are skipped: a checkpoint from an older cogcore lacks keys added
    since, and a removed key no longer does anything."""
    old_flat = resume_config(state.get("train") or {}, state.get("config") or {})
    if not state.get("train"):  # a checkpoint without its loop config: nothing of train.* to compare
        old_flat = {k: v for k, v in old_flat.items() if not k.startswith("train.")}
    return [(k, old_flat[k], new_flat[k]) for k in sorted(old_flat.keys() & new_flat.keys())
            if k not in MAY_CHANGE_ON_RESUME and old_flat[k] != new_flat[k]]


def check_config(path: Path, state: dict, new_flat: dict, force: bool) -> list[tuple[str, object, object]]:
    """Refuse to resume ``path`` under a config that changes the result, unless ``force``."""
    changes = config_changes(state, new_flat)
    if changes and not force:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes[:8])
        more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
        run = Path(path).parent.parent
        raise CogcoreError(
            f"the run in {run} was started with another config ({listed}{more}); resuming would mix the two. "
            "Rerun with the run's own values, give the run a new name (name=... or --out DIR), start it over "
            "with train.resume=never, or continue anyway with train.resume=force")
    return changes


def check_resume(run_dir: Path, train_cfg, run_config: dict | None) -> None:
    """The resume check of :func:`~cogcore.train.loop.train`, for a recipe to run before its
    expensive part (pruning, a teacher cache), so a refused resume costs nothing."""
    from dataclasses import asdict
    ckpt = latest_checkpoint(run_dir) if train_cfg.resume != "never" else None
    if ckpt is not None:
        check_config(ckpt, read_state(ckpt), resume_config(asdict(train_cfg), run_config),
                     force=train_cfg.resume == "force")


def load(path: Path, module, optimizer, scheduler, di: DistInfo, base_hash: str | None, engine=None) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    state = read_state(path)
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
            raise CogcoreError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                               "delete that folder to resume from an older one") from None
        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        set_model_state_dict(module, model_sd, options=opts)
        set_optimizer_state_dict(module, optimizer, optim_sd, options=opts)
    try:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    except Exception as e:
        raise _unreadable(path / "scheduler.pt", e) from None
    rng_file = path / f"rng-rank{di.rank}.pt"
    if rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=False))
        except Exception as e:
            raise _unreadable(rng_file, e) from None
    return state
