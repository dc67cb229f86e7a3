"""The real `cogcore sft` CLI on a tiny model: trains, saves, and survives kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogcore.train.model import base_hash

ROOT = Path(__file__).resolve().parents[2]

ARGS = ["sft", "--config", "configs/sft/tiny.yaml", "train.max_steps=40", "train.save_every=5",
        "train.progress=false", "data.builtin_size=400"]


def test_sft_trains_and_writes_a_loadable_model(cli, cogcore_home):
    proc = cli(*ARGS, "name=plain", check=True)
    run = cogcore_home / "runs" / "plain"
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0] * 0.6, losses
    assert summary["steps"] == 40 and summary["output_hash"] == base_hash(run / "model")
    assert summary["output_hash"] != summary["base_hash"]
    assert (run / "config.yaml").is_file() and "final loss" in proc.stdout
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "model")


def test_kill_9_then_rerun_resumes_to_the_same_final_loss(cli, cogcore_home, tmp_path):
    ref = cli(*ARGS, "name=uninterrupted", check=True)
    assert ref.returncode == 0
    want = json.loads((cogcore_home / "runs" / "uninterrupted" / "summary.json").read_text())["final_loss"]

    run = cogcore_home / "runs" / "killed"
    child = subprocess.Popen([sys.executable, "-m", "cogcore.cli", *ARGS, "name=killed", "train.max_steps=40"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:  # wait for a checkpoint, then kill mid-run
        if (run / "checkpoints").is_dir() and list((run / "checkpoints").glob("step-*[0-9]")):
            break
        time.sleep(0.05)
    assert child.poll() is None, f"the run ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"

    resumed = cli(*ARGS, "name=killed", check=True)
    assert "resuming from" in resumed.stdout
    got = json.loads((run / "summary.json").read_text())
    assert got["resumed_from"] is not None and got["resumed_from"] < 40
    assert got["final_loss"] == pytest.approx(want, abs=1e-4)


def test_rerun_with_a_changed_config_is_refused_before_training(cli, cogcore_home):
    args = ["sft", "--config", "configs/sft/tiny.yaml", "train.max_steps=4", "train.save_every=2",
            "train.progress=false", "data.builtin_size=200", "name=changed"]
    cli(*args, check=True)
    proc = cli(*args, "train.lr=0.5", "data.seq_len=64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.seq_len 128 -> 64, train.lr 0.003 -> 0.5" in proc.stderr and "train.resume=force" in proc.stderr
    config = (cogcore_home / "runs" / "changed" / "config.yaml").read_text()
    assert "lr: 0.003" in config and "seq_len: 128" in config  # the run's record still tells the truth
    longer = cli(*args, "train.max_steps=6", "train.log_every=2", check=True)  # extending a run is allowed
    assert "resuming from" in longer.stdout
