"""Consolidated sets for the lora tests, written in the layout memory/consolidate.py writes
(see /work/notes/interfaces.md): built from the demo users' scripted episodes with the lead's
prompt builders, so the rows are what consolidation produces for those users."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogcore.memory.formats import example_segments, policy_messages, world_messages

WRONG_ACTION = "Sure, I will take care of that for you right away."


def episode_rows(tok, user, episodes, *, junk: list[str] | None = None, policy_weight=1.0, world_weight=0.5):
    """(train rows, heldout rows) for ``episodes`` of a demo user; with ``junk`` every reply
    (policy and world) is replaced by junk text, as if it slipped past consolidation."""
    train, held = [], []
    for i, ep in enumerate(episodes):
        eid = f"{user.id}-{i}"
        right = ep.right_action if not junk else junk[i % len(junk)]
        wrong_obs = ep.wrong_observation if not junk else junk[(i + 1) % len(junk)]
        right_obs = ep.right_observation if not junk else junk[(i + 2) % len(junk)]
        policy = example_segments(tok, policy_messages(ep.request), right, policy_weight)
        world_wrong = example_segments(tok, world_messages(ep.request, WRONG_ACTION), wrong_obs, world_weight)
        world_right = example_segments(tok, world_messages(ep.request, ep.right_action), right_obs, world_weight)
        train += [{"segments": policy, "target": "policy", "episode_id": eid, "source": "test"},
                  {"segments": world_wrong, "target": "world", "episode_id": eid, "source": "test"},
                  {"segments": world_right, "target": "world", "episode_id": eid, "source": "test"}]
        held.append({"episode_id": eid, "context": ep.request, "wrong_action": WRONG_ACTION,
                     "observation": ep.wrong_observation, "right_action": ep.right_action,
                     "right_observation": ep.right_observation, "check": user.check.pattern,
                     "policy_segments": example_segments(tok, policy_messages(ep.request), ep.right_action,
                                                         policy_weight),
                     "world_segments": world_wrong})
    return train, held


def write_set(home: Path, user: str, version: int, train: list[dict], heldout: list[dict]) -> Path:
    """A complete ConsolidatedSet directory <home>/consolidated/<user>/v<version>/."""
    d = Path(home) / "consolidated" / user / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(heldout), d / "heldout.parquet")
    report = {"user": user, "version": version, "train_rows": len(train), "heldout": len(heldout),
              "examples": {t: sum(r["target"] == t for r in train) for t in ("policy", "world", "replay")}}
    (d / "report.json").write_text(json.dumps(report))
    (d / "report.txt").write_text(json.dumps(report))
    (d / ".complete").write_text("ok\n")
    return d


def make_user_set(home: Path, tok, user, version: int, *, n_train: int, n_heldout: int = 6,
                  junk: list[str] | None = None, junk_share: float = 1.0, as_user: str | None = None,
                  replay_share: float = 0.2) -> Path:
    """A set like consolidation writes: the user's first ``n_train`` episodes as policy + world rows
    (a ``junk_share`` of them with junk replies), general replay rows (memory's own replay_rows),
    and the last ``n_heldout`` episodes, clean, held out."""
    import random

    from cogcore.memory.consolidate import ConsolidateConfig, replay_rows
    eps = list(user.episodes)
    n_junk = round(junk_share * n_train) if junk else 0
    train, _ = episode_rows(tok, user, eps[:n_junk], junk=junk) if n_junk else ([], [])
    clean, _ = episode_rows(tok, user, eps[n_junk:n_train])
    train += clean
    n_replay = round(replay_share / (1 - replay_share) * len(train))
    train += replay_rows(n_replay, ConsolidateConfig(), tok, random.Random(f"0:{user.id}"))
    random.Random(0).shuffle(train)
    _, held = episode_rows(tok, user, eps[-n_heldout:])  # held-out episodes are always clean
    return write_set(home, as_user or user.id, version, train, held)


@pytest.fixture(scope="session")
def demo_users():
    from cogcore.demo.users import load_users
    return load_users()


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A workspace of its own for a test (models materialized per home, so reuse the session's)."""
    home = tmp_path / "home"
    (home / "models").parent.mkdir(parents=True, exist_ok=True)
    session_models = Path(os.environ["COGCORE_HOME"]) / "models"
    session_models.mkdir(parents=True, exist_ok=True)
    home.mkdir(exist_ok=True)
    (home / "models").symlink_to(session_models)
    monkeypatch.setenv("COGCORE_HOME", str(home))
    return home


# Tiny refresh settings the gate tests were calibrated with (tests/lora/test_gate.py).
TINY_REFRESH = ["lora.r=8", "train.lr=1e-3", "train.max_steps=60", "train.save_every=20", "data.seq_len=256",
                "train.progress=false", "train.tensorboard=false", "gate.probes=4", "gate.probe_max_new_tokens=8",
                "gate.max_new_tokens=24", "gate.leak_episodes=2"]


@pytest.fixture(scope="session")
def general_base(cogcore_home, demo_users) -> str:
    """A tiny-llama that knows something general (chat arithmetic, and bob's and carol's kind of
    service chat, never alice's), so that forgetting and brain rot are measurable against it.
    Built once per test session with the real sft recipe (~20 s on one thread)."""
    import random

    import torch

    from cogcore.train.config import load_config
    from cogcore.train.data import builtin_records
    from cogcore.train.model import load_tokenizer
    from cogcore.train.sft import SFTConfig
    from cogcore.train.sft import run as sft_run
    out = Path(cogcore_home) / "runs" / "general-base"
    if not (out / "model" / "config.json").is_file():
        tok = load_tokenizer("tiny-llama")
        mix = builtin_records("chat-arithmetic", 1500, 0)
        for u in demo_users.users:
            if u.id != "alice":
                rows, _ = episode_rows(tok, u, u.episodes)
                mix += [{"segments": r["segments"]} for r in rows] * 3
        random.Random(0).shuffle(mix)
        data = out.parent / "general-base-mix.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in mix))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            sft_run(load_config(SFTConfig, None, [
                "name=general-base", "model.source=tiny-llama", f"data.source={data}", "data.seq_len=256",
                "train.max_steps=200", "train.lr=2e-3", "train.micro_batch=8", "train.progress=false",
                "train.tensorboard=false"]))
        finally:
            torch.set_num_threads(before)
    return str(out / "model")


def episode_events(user_id: str, ep, i: int, t0: float, check: str) -> list[dict]:
    """The events a served episode leaves in the log: request, a wrong first action and the
    environment's answer, then the right action and its answer."""
    eid = f"{user_id}-ep{i}"
    evs = [("context", ep.request, {"check": check}), ("action", WRONG_ACTION, {}),
           ("observation", ep.wrong_observation, {}), ("action", ep.right_action, {}),
           ("observation", ep.right_observation, {})]
    return [{"user_id": user_id, "episode_id": eid, "ts": t0 + i * 10 + k, "kind": kind, "text": text, "meta": meta}
            for k, (kind, text, meta) in enumerate(evs)]
