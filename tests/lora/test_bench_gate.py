"""Smoke run of `python -m cogcore.bench.bench_gate --quick` on a tiny preset."""

import json

from cogcore.bench.bench_gate import main


def test_bench_gate_quick(tmp_path, cogcore_home, one_thread):
    out = tmp_path / "gate.json"
    assert main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["kinds"]) == {"held-out requests", "probes", "general questions"}
    for kind in res["kinds"].values():   # both arms ran on the same prompts, and agree (a greedy near-tie
        # may flip at fp32 rounding, hence not all)
        assert kind["peft_s"] > 0 and kind["merged_s"] > 0 and len(kind["runs_s"]["peft"]) == 1
        assert kind["prompts"] > 0 and kind["identical_replies"] >= 0.9 * kind["prompts"]
    assert res["kinds"]["probes"]["prompts"] == 40 and res["kinds"]["general questions"]["prompts"] == 64
    assert res["machine"]["torch_threads"] == 1
