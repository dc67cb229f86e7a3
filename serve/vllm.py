"""The vLLM bridge: serve the registry's adapters with vLLM's LoRA support (large fleets, GPU).

The registry's versions are plain PEFT directories, which vLLM loads unchanged. The bridge
builds the `vllm serve` command line:

    vllm serve <base HF dir> --served-model-name core --enable-lora
        --lora-modules '{"name": "core:alice", "path": ".../alice/v3", "base_model_name": "core"}' ...
        --max-loras <adapters on device> --max-cpu-loras <cpu adapters> --max-lora-rank <rank>

so the model names match cogcore's own server (`core`, `core:<user>` = LIVE at launch,
`<user>@vN`). Adapters made for another base (base_hash) are left out with a warning. With
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 set here, adapters published later can be added through
vLLM's /v1/load_lora_adapter without a restart. vLLM checks one API key at most, so per-user
isolation (cogcore keys) needs cogcore's own server: the bridge refuses user keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cogcore.lora.registry import AdapterRegistry
from cogcore.train.config import CogcoreError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # values vLLM's --max-lora-rank accepts


@dataclass
class LoraModule:
    name: str
    path: Path
    rank: int


def lora_modules(registry: AdapterRegistry, base_hash: str | None) -> tuple[list[LoraModule], list[str]]:
    """(modules, warnings): `core:<user>` for each LIVE version and `<user>@vN` for every version."""
    from .engine import _peft_config
    mods, warnings = [], []
    for user in registry.users():
        live = registry.live_version(user)
        for art in registry.versions(user):
            if base_hash is not None and art.base_hash != base_hash:
                warnings.append(f"skipping {art.name}: trained for base {art.base_hash[:12]}, vLLM serves "
                                f"{base_hash[:12]}")
                continue
            rank = int(_peft_config(art).get("r") or 0)
            if art.version == live:
                mods.append(LoraModule(f"core:{user}", Path(art.path).resolve(), rank))
            mods.append(LoraModule(art.name, Path(art.path).resolve(), rank))
    return mods, warnings


def vllm_rank(rank: int) -> int:
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise CogcoreError(f"adapter rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def vllm_command(cfg, registry: AdapterRegistry, *, base_dir: str | Path | None = None,
                 base_hash: str | None = None, api_key: str | None = None) -> tuple[list[str], list[str]]:
    """(argv, warnings) of `vllm serve` for a ServeConfig; resolves the base model like cogcore does."""
    from cogcore.train.model import base_hash as compute_hash
    from cogcore.train.model import resolve
    eng = cfg.engine
    if base_dir is None:
        base_dir = resolve(eng.model)
    base_dir = Path(base_dir).resolve()
    if base_hash is None:
        base_hash = compute_hash(base_dir)
    mods, warnings = lora_modules(registry, base_hash)
    rank = max([m.rank for m in mods] + [eng.max_rank, 8])
    cmd = ["vllm", "serve", str(base_dir), "--served-model-name", "core", "--host", cfg.host, "--port", str(cfg.port),
           "--max-num-seqs", str(eng.max_batch), "--enable-lora", "--max-loras", str(eng.adapters_on_device),
           "--max-cpu-loras", str(max(eng.cpu_adapters, eng.adapters_on_device)),
           "--max-lora-rank", str(vllm_rank(rank))]
    if eng.model.dtype in ("bfloat16", "float16"):
        cmd += ["--dtype", eng.model.dtype]
    if eng.model.quantize in ("nf4", "fp4", "int8"):
        cmd += ["--quantization", "bitsandbytes"]
    if mods:
        cmd += ["--lora-modules", *[json.dumps({"name": m.name, "path": str(m.path), "base_model_name": "core"})
                                    for m in mods]]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd, warnings


def _single_key(cfg) -> str | None:
    """vLLM takes one --api-key: allowed when it is the only key and an admin's (no per-user isolation to lose)."""
    from .app import KeyRing
    ring = KeyRing.load(cfg.keys or None, os.environ.get("COGCORE_API_KEYS"))
    if ring.open:
        return None
    if ring.sole_admin_key is None:
        raise CogcoreError("vLLM checks a single API key, so per-user keys cannot be enforced there: serve with "
                           "cogcore's own engine for per-user isolation, or configure exactly one admin key")
    return ring.sole_admin_key


def run_vllm(cfg, registry: AdapterRegistry, *, print_only: bool = False) -> int:
    """Print the command; unless `print_only`, run vLLM in the foreground until it exits."""
    api_key = _single_key(cfg)
    cmd, warnings = vllm_command(cfg, registry, api_key=api_key)
    for w in warnings:
        print(f"cogcore serve: {w}", file=sys.stderr)
    shown = [("<key>" if i > 0 and cmd[i - 1] == "--api-key" else a) for i, a in enumerate(cmd)]
    print(" ".join(_quote(a) for a in shown), flush=True)
    if print_only:
        return 0
    exe = shutil.which("vllm")
    if exe is None and importlib.util.find_spec("vllm") is None:
        raise CogcoreError("vLLM is not installed: `pip install vllm` on a machine with a CUDA GPU (it is not part of "
                           "any cogcore extra), or drop --engine vllm to use cogcore's own server")
    argv = [exe, *cmd[1:]] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main", *cmd[1:]]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def _quote(a: str) -> str:
    import shlex
    return shlex.quote(a)


__all__ = ["LoraModule", "VLLM_LORA_RANKS", "lora_modules", "run_vllm", "vllm_command", "vllm_rank"]
