"""Shared fixtures: every test session gets its own workspace and caches inside pytest's tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def cogcore_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("cogcore-home")
    cache = tmp_path_factory.mktemp("cache")
    os.environ["COGCORE_HOME"] = str(home)
    for var, sub in [("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg"), ("TORCH_EXTENSIONS_DIR", "torch_ext"),
                     ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")]:
        os.environ[var] = str(cache / sub)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture
def one_thread():
    """Tiny matmuls on 2 threads of a shared 2-core machine are many times slower than on one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `cogcore` CLI in a subprocess (the workspace env comes with it)."""
    proc = subprocess.run([sys.executable, "-m", "cogcore.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"cogcore {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli
