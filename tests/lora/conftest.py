"""Fixtures for the lora tests: consolidated sets in the layout memory/consolidate.py writes, built
from the demo users' scripted episodes (bench/bench_brainrot.py builds them the same way), a tiny
base that knows something general, and the events a served episode leaves in the log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cogcore.bench.bench_brainrot import WRONG_ACTION, episode_rows, general_tiny_base, planted_set, write_set

__all__ = ["episode_rows", "write_set", "make_user_set", "episode_events", "TINY_REFRESH"]

make_user_set = planted_set

# Tiny refresh settings the gate tests were calibrated with (tests/lora/test_gate.py).
TINY_REFRESH = ["lora.r=8", "train.lr=1e-3", "train.max_steps=60", "train.save_every=20", "data.seq_len=256",
                "train.progress=false", "train.tensorboard=false", "gate.probes=4", "gate.probe_max_new_tokens=8",
                "gate.max_new_tokens=24", "gate.leak_episodes=2"]


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


def episode_events(user_id: str, ep, i: int, t0: float, check: str) -> list[dict]:
    """The events a served episode leaves in the log: request, a wrong first action and the
    environment's answer, then the right action and its answer."""
    eid = f"{user_id}-ep{i}"
    evs = [("context", ep.request, {"check": check}), ("action", WRONG_ACTION, {}),
           ("observation", ep.wrong_observation, {}), ("action", ep.right_action, {}),
           ("observation", ep.right_observation, {})]
    return [{"user_id": user_id, "episode_id": eid, "ts": t0 + i * 10 + k, "kind": kind, "text": text, "meta": meta}
            for k, (kind, text, meta) in enumerate(evs)]
