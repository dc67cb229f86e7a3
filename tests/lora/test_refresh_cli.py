"""The real CLI: two refreshes of one user at once (one fails cleanly, one waits), `refresh --all-due`
(grouped, then nothing due), and `cogcore adapters list|show|rollback|gc`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lora_helpers import make_user_set

from cogcore.lora.registry import AdapterRegistry
from cogcore.train.checkpoint import latest_checkpoint
from cogcore.train.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.source=tiny-llama", "lora.r=4", "data.seq_len=256", "train.lr=1e-3", "train.progress=false",
        "train.tensorboard=false", "gate.probes=2", "gate.probe_max_new_tokens=4", "gate.max_new_tokens=8",
        "gate.general_documents=16", "gate.leak_episodes=1"]


@pytest.fixture
def cogcore(capsys, one_thread):
    """`cogcore ARGS` through the real dispatch (cli.main) in this process: (rc, stdout, stderr)."""
    from cogcore.cli import main

    def call(*args: str):
        capsys.readouterr()
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse --help
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return call


def test_two_refreshes_of_one_user(fresh_home, demo_users, cogcore):
    alice = next(u for u in demo_users.users if u.id == "alice")
    make_user_set(fresh_home, load_tokenizer("tiny-llama"), alice, 1, n_train=12)
    lock = fresh_home / "adapters" / ".locks" / "alice.refresh.lock"
    args = ["refresh", "--user", "alice", *FAST, "train.max_steps=60", "train.save_every=5", "gate.enabled=false"]
    first = subprocess.Popen([sys.executable, "-m", "cogcore.cli", *args], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not latest_checkpoint(
                fresh_home / "runs" / "refresh-alice-set1"):
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        assert f"pid {first.pid} since" in lock.read_text()

        # a second refresh that will not wait fails at once, with one line that says why
        rc, _, err = cogcore(*args)
        assert rc == 2
        assert err.strip().splitlines() == [
            f"cogcore refresh: error: refresh of alice is already running (pid {first.pid} since "
            f"{lock.read_text().split(' since ')[1]}); wait for it to finish or raise the lock timeout"]

        # one that waits gets the lock when the first dies (kill -9), resumes its checkpoint and finishes
        waiter = subprocess.Popen([sys.executable, "-m", "cogcore.cli", *args, "lock_timeout=120"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(3.0)
        assert waiter.poll() is None  # waiting for the lock
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err[-2000:]
    assert "resuming from" in out and AdapterRegistry().live_version("alice") == 1


def test_all_due_trains_users_together_then_nothing_is_due(fresh_home, demo_users, cogcore):
    tok = load_tokenizer("tiny-llama")
    users = {u.id: u for u in demo_users.users}
    for name in ("alice", "bob"):
        make_user_set(fresh_home, tok, users[name], 1, n_train=8)
    rc, out, err = cogcore("refresh", "--all-due", *FAST, "train.max_steps=20")
    assert rc == 0, err[-3000:]
    assert "due: alice (set v1, no live adapter for this base)" in out and "2 users in one pass (alice, bob)" in out
    reg = AdapterRegistry()
    for name in ("alice", "bob"):
        gate = json.loads((fresh_home / "runs" / f"refresh-{name}-set1" / "gate.json").read_text())
        assert gate["criteria"] and "passed" in gate
        if gate["passed"]:
            art = reg.get(name)
            assert art.lineage["set_version"] == 1 and "refresh-grouped-" in art.lineage["grouped_run"]
        else:
            assert reg.live_version(name) is None
    assert reg.live_version("alice") == 1, "a fresh adapter on the random tiny base should pass its gate"

    rc, out, _ = cogcore("refresh", "--all-due", *FAST, "train.max_steps=20")
    assert rc == 0 and "no user is due" in out, out[-2000:]

    # adapters CLI over what was published
    rows = json.loads(cogcore("adapters", "list", "--json")[1])
    assert {r["name"] for r in rows} >= {"alice@v1"} and all(r["live"] for r in rows)
    rc, out, _ = cogcore("adapters", "list")
    assert rc == 0 and "alice@v1" in out
    shown = json.loads(cogcore("adapters", "show", "alice@v1")[1])
    assert shown["lineage"]["set_version"] == 1 and shown["live"] and shown["gate"]["passed"]
    rc, _, err = cogcore("adapters", "rollback", "alice")
    assert rc == 2 and "alice has no version older than v1" in err
    rc, _, err = cogcore("adapters", "show", "alice@v9")
    assert rc == 2 and "alice@v9 does not exist" in err
    rc, out, _ = cogcore("adapters", "gc", "--keep", "1")
    assert rc == 0 and "gc: removed 0 entries" in out


def test_help_of_every_lora_command(cogcore):
    for cmd in ("refresh", "adapters", "sleep"):
        rc, out, err = cogcore(cmd, "--help")
        assert rc == 0 and f"usage: cogcore {cmd}" in out, err
    assert "gate.junk_margin_tolerance" in cogcore("refresh", "--help")[1]
