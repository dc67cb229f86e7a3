"""Multi-process training: launch, strategy (DDP / FSDP2 / DeepSpeed ZeRO-2/3) and collectives.

Processes are started by ``torch.distributed.run`` (``cogcore <recipe> --nproc N``) or by
``accelerate launch --config_file configs/accelerate/<name>.yaml -m cogcore.cli <recipe>``.
Either way the strategy is read from the same place: the accelerate config file (its
``distributed_type``, ``fsdp_config.fsdp_version``, ``deepspeed_config.zero_stage``), which
``--nproc`` passes down as ``COGCORE_STRATEGY`` and accelerate as its own env variables.
On CPU the backend is gloo; on CUDA it is nccl.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .config import CogcoreError

STRATEGIES = ("single", "ddp", "fsdp2", "zero2", "zero3")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strategy_from_accelerate_file(path: str | Path) -> str:
    """Map an accelerate config file to one of :data:`STRATEGIES`."""
    path = Path(path)
    if not path.is_file():
        from ..configs import CONFIG_DIR
        shipped = CONFIG_DIR / "accelerate" / f"{path.stem}.yaml"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "accelerate").glob("*.yaml")))
            raise CogcoreError(f"distributed config '{path}' not found; use a file or one of the shipped names: {names}")
        path = shipped
    cfg = yaml.safe_load(path.read_text()) or {}
    kind = str(cfg.get("distributed_type", "NO")).upper()
    if kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        return "ddp"
    if kind == "FSDP":
        version = int((cfg.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != 2:
            raise CogcoreError(f"{path}: only FSDP2 is supported (set fsdp_config.fsdp_version: 2)")
        return "fsdp2"
    if kind == "DEEPSPEED":
        stage = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 2))
        if stage not in (2, 3):
            raise CogcoreError(f"{path}: DeepSpeed zero_stage must be 2 or 3, got {stage}")
        return f"zero{stage}"
    raise CogcoreError(f"{path}: distributed_type {kind} is not supported; use MULTI_GPU, FSDP or DEEPSPEED")


def _strategy_from_env(world_size: int) -> str:
    if os.environ.get("COGCORE_STRATEGY"):
        s = os.environ["COGCORE_STRATEGY"]
        if s not in STRATEGIES:
            raise CogcoreError(f"COGCORE_STRATEGY={s} is not one of {', '.join(STRATEGIES)}")
        return s
    # Started by `accelerate launch`: it exports these for its own plugins.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp2"
    return "ddp" if world_size > 1 else "single"


def setup() -> DistInfo:
    """Initialise the process group when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    strategy = _strategy_from_env(world)
    if world > 1 and not dist.is_initialized():
        # CPU tensors (loss sums, token counts) go through gloo next to NCCL on a GPU
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
        # Without an explicit destroy, gloo's threads can abort the process at interpreter exit
        # ("terminate called without an active exception") after the run itself succeeded.
        atexit.register(teardown)
    return DistInfo(rank, world, local, strategy if world > 1 or strategy.startswith("zero") else "single", device)


def teardown() -> None:
    """Leave the process group (every rank, once its work is done)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int, dist_config: str = "ddp", env: dict | None = None) -> int:
    """Re-run ``cogcore <argv>`` in ``nproc`` processes with torch.distributed.run."""
    strategy = strategy_from_accelerate_file(dist_config)
    child_env = dict(os.environ, **(env or {}))
    child_env["COGCORE_STRATEGY"] = strategy
    # Each process gets its share of the cores (2 processes on a 2-core box: 1 thread each).
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "cogcore.cli", *argv]
    return subprocess.call(cmd, env=child_env)


def deepspeed_config(strategy: str, micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": int(strategy[-1])},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
