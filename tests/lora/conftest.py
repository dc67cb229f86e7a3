"""Fixtures for the lora tests: consolidated sets in the layout memory/consolidate.py writes, built
from the demo users' scripted episodes (bench/bench_brainrot.py builds them the same way), a tiny
base that knows something general, and the events a served episode leaves in the log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lora_helpers import TINY_REFRESH, episode_events, make_user_set  # noqa: F401

from cogcore.bench.bench_brainrot import general_tiny_base


@pytest.fixture(scope="session")
def demo_users():
    from cogcore.demo.users import load_users
    return load_users()


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A workspace of its own for a test, sharing the session's materialized models."""
    home = tmp_path / "home"
    home.mkdir()
    session_models = Path(os.environ["COGCORE_HOME"]) / "models"
    session_models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(session_models)
    monkeypatch.setenv("COGCORE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def general_base(cogcore_home, demo_users) -> str:
    """A tiny-llama that knows chat arithmetic and bob's and carol's kind of service chat (never
    alice's), so that forgetting and brain rot are measurable against it; once per session (~20 s)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return general_tiny_base(Path(cogcore_home), demo_users.users)
    finally:
        torch.set_num_threads(before)
