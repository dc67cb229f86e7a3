"""Names the lora tests import (a module of its own: `from conftest import` breaks when another
test folder's conftest is loaded first under the same module name)."""

from __future__ import annotations

from cogcore.bench.bench_brainrot import WRONG_ACTION, planted_set

make_user_set = planted_set

# Tiny refresh settings the gate tests were calibrated with (tests/lora/test_gate.py).
TINY_REFRESH = ["lora.r=8", "train.lr=1e-3", "train.max_steps=60", "train.save_every=20", "data.seq_len=256",
                "train.progress=false", "train.tensorboard=false", "gate.probes=4", "gate.probe_max_new_tokens=8",
                "gate.max_new_tokens=24", "gate.leak_episodes=2"]


def episode_events(user_id: str, ep, i: int, t0: float, check: str) -> list[dict]:
    """The events a served episode leaves in the log: request, a wrong first action and the
    environment's answer, then the right action and its answer."""
    eid = f"{user_id}-ep{i}"
    evs = [("context", ep.request, {"check": check}), ("action", WRONG_ACTION, {}),
           ("observation", ep.wrong_observation, {}), ("action", ep.right_action, {}),
           ("observation", ep.right_observation, {})]
    return [{"user_id": user_id, "episode_id": eid, "ts": t0 + i * 10 + k, "kind": kind, "text": text, "meta": meta}
            for k, (kind, text, meta) in enumerate(evs)]
