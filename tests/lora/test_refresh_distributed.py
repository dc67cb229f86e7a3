"""`cogcore refresh --nproc 2` (two gloo processes): one user under DDP, and --all-due with the users
split over the ranks; rank 0 takes the locks, gates and publishes, and every rank exits 0."""

import os
import subprocess
import sys
from pathlib import Path

from lora_helpers import make_user_set

from cogcore.lora.registry import AdapterRegistry
from cogcore.train.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.source=tiny-llama", "lora.r=4", "train.max_steps=6", "data.seq_len=256", "train.progress=false",
        "train.tensorboard=false", "gate.probes=2", "gate.general_documents=8", "gate.max_new_tokens=8",
        "gate.probe_max_new_tokens=4"]


def test_refresh_in_two_processes(fresh_home, demo_users):
    tok = load_tokenizer("tiny-llama")
    users = {u.id: u for u in demo_users.users}
    for name in ("alice", "bob"):
        make_user_set(fresh_home, tok, users[name], 1, n_train=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    both = subprocess.run([sys.executable, "-m", "cogcore.cli", "refresh", "--all-due", "--nproc", "2", *FAST],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert both.returncode == 0, both.stderr[-3000:]
    assert "2 users in one pass (alice, bob)" in both.stdout and both.stdout.count("2 users in one pass") == 1
    reg = AdapterRegistry()
    assert reg.live_version("alice") == 1 and reg.live_version("bob") == 1

    make_user_set(fresh_home, tok, users["alice"], 2, n_train=10)
    one = subprocess.run([sys.executable, "-m", "cogcore.cli", "refresh", "--user", "alice", "--nproc", "2", *FAST],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]  # published or refused (recorded), a clean exit
    assert (fresh_home / "runs" / "refresh-alice-set2" / "gate.json").is_file()
    assert one.stdout.count("refresh alice: set v2") == 1  # rank 0 speaks for both
