"""`cogcore sleep` over a real experience log: consolidate -> refresh -> gate -> publish for the due
users, nothing on a cycle without news, and a user another sleeper holds is left alone."""

import time

import pytest
from lora_helpers import episode_events

from cogcore.lora.registry import AdapterRegistry
from cogcore.lora.sleep import SleepConfig, consolidation_due, cycle, seconds
from cogcore.memory.log import ExperienceLog
from cogcore.train.config import ConfigError, load_config

FAST = ["refresh.model.source=tiny-llama", "refresh.lora.r=4", "refresh.data.seq_len=256", "refresh.train.lr=1e-3",
        "refresh.train.max_steps=15", "refresh.train.progress=false", "refresh.train.tensorboard=false",
        "refresh.gate.probes=2", "refresh.gate.probe_max_new_tokens=4", "refresh.gate.max_new_tokens=8",
        "refresh.gate.general_documents=16", "refresh.gate.leak_episodes=1"]


def log_episodes(user, n: int, start: int = 0, t0: float | None = None) -> None:
    t0 = t0 or time.time() - 3600
    log = ExperienceLog.open()
    try:
        for i in range(start, start + n):
            log.append(episode_events(user.id, user.episodes[i], i, t0, user.check.pattern))
    finally:
        log.close()


def test_sleep_cycle_consolidates_refreshes_and_publishes(fresh_home, demo_users, one_thread):
    users = {u.id: u for u in demo_users.users}
    log_episodes(users["alice"], 12)
    log_episodes(users["bob"], 12)
    log_episodes(users["carol"], 3)  # not enough news yet
    cfg = load_config(SleepConfig, None, ["min_new_events=20", *FAST])
    rows = {r.user: r for r in cycle(cfg)}

    reg = AdapterRegistry()
    assert rows["alice"].consolidated == "v1" and rows["bob"].consolidated == "v1"
    assert rows["carol"].consolidated == "-" and rows["carol"].note == "15 new events < 20"
    for name in ("alice", "bob"):
        res = rows[name].refresh
        assert res is not None and res.set_version == 1
        assert res.passed == (res.published == f"{name}@v1") and res.live == (f"{name}@v1" if res.passed else None)
    assert reg.live_version("alice") == 1  # a fresh adapter on the random tiny base passes its gate

    # nothing new: nothing consolidated, nothing refreshed
    rows = {r.user: r for r in cycle(cfg)}
    assert all(r.consolidated == "-" and r.refresh is None for r in rows.values())
    assert rows["alice"].note == "no new events"

    # another sleeper holding alice: this one leaves her alone and says so
    log_episodes(users["alice"], 5, start=12, t0=time.time() - 60)
    with reg.lock("alice", "sleep"):
        rows = {r.user: r for r in cycle(load_config(SleepConfig, None, ["min_new_events=1", "users=alice", *FAST]))}
    assert rows["alice"].consolidated == "-" and rows["alice"].note.startswith("sleep of alice is already running")


def test_due_rules_and_durations(fresh_home, demo_users):
    alice = next(u for u in demo_users.users if u.id == "alice")
    log_episodes(alice, 2)
    log = ExperienceLog.open()
    try:
        now = time.time()
        due, new, why = consolidation_due(log, "alice", load_config(SleepConfig, None, ["min_new_events=10"]), now)
        assert (due, new) == (True, 10) and why == "10 new events"
        due, _, why = consolidation_due(log, "alice", load_config(SleepConfig, None, ["min_new_events=50",
                                                                                       "max_age=1h"]), now)
        assert due and why == "never consolidated"
        assert not consolidation_due(log, "alice", load_config(SleepConfig, None, ["min_new_events=50"]), now)[0]
    finally:
        log.close()
    assert seconds("90", "x") == 90 and seconds("15m", "x") == 900 and seconds("1.5h", "x") == 5400
    assert seconds("2d", "x") == 172800
    with pytest.raises(ConfigError, match="every: '5 minutes' is not a duration"):
        load_config(SleepConfig, None, ["every=5 minutes"])
    with pytest.raises(ConfigError, match="refresh.user is chosen per user by sleep"):
        load_config(SleepConfig, None, ["refresh.user=alice"])


def test_every_runs_the_given_number_of_cycles(fresh_home):
    from cogcore.lora.sleep import run as sleep_run
    t0 = time.time()
    cycles = sleep_run(load_config(SleepConfig, None, ["every=0.5s", "cycles=3"]))
    assert len(cycles) == 3 and all(c == [] for c in cycles)  # nobody in the log yet
    assert time.time() - t0 >= 1.0  # waited between cycles
