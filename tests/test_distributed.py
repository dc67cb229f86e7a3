"""Two gloo processes on CPU: DDP and FSDP2 agree with a single process on the same global batch."""

import json

import pytest

pytestmark = pytest.mark.multiproc

ARGS = ["sft", "--config", "configs/sft/tiny.yaml", "train.max_steps=6", "train.progress=false",
        "train.save_every=3", "data.builtin_size=400", "train.micro_batch=4"]


def _summary(home, name):
    return json.loads((home / "runs" / name / "summary.json").read_text())


def _losses(home, name):
    rows = [json.loads(x) for x in (home / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(cli, cogcore_home):
    # one process accumulating 2 micro-batches == two processes with one each
    cli(*ARGS, "name=one", "train.grad_accum=2", check=True)
    want = _losses(cogcore_home, "one")
    for strategy in ("ddp", "fsdp2"):
        proc = cli(*ARGS, f"name={strategy}", "--nproc", "2", "--dist", strategy, check=True)
        got = _summary(cogcore_home, strategy)
        assert got["world_size"] == 2 and got["strategy"] == strategy, proc.stdout
        assert _losses(cogcore_home, strategy) == pytest.approx(want, abs=1e-4), strategy
        assert got["output_hash"] == _summary(cogcore_home, "one")["output_hash"] or \
            abs(got["final_loss"] - _summary(cogcore_home, "one")["final_loss"]) < 1e-4
