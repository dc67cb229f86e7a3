"""Smoke run of `python -m cogcore.bench.bench_refresh --quick` on a tiny preset."""

import json

from cogcore.bench.bench_refresh import main


def test_bench_refresh_quick(tmp_path, one_thread):
    out = tmp_path / "refresh.json"
    assert main(["--quick", "--model", "tiny-llama", "--users", "3", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    a, b = res["grouped_vs_sequential"], res["single_vs_trl"]
    assert a["ratio_wall"] > 0 and a["ratio_from_medians"] > 0
    run = a["runs"][0]
    assert len(a["runs"]) == 2
    assert len(run["grouped"]["step_s"]) == 2 and [len(s) for s in run["sequential"]["step_s"]] == [2, 2, 2]
    arms = {"trl_sft_peft", "cogcore_loop_peft", "cogcore_grouped_k1"}
    assert set(b["median_tokens_per_s"]) == arms
    # rounds of all three arms, the order rotated, each round's ratio against its own TRL arm
    assert [r["order"][0] for r in b["rounds"]] == ["trl_sft_peft", "cogcore_loop_peft"]
    assert all(set(r["runs"]) == arms and r["ratio_vs_trl"]["trl_sft_peft"] == 1.0 for r in b["rounds"])
    assert all(len(v) == 2 for v in b["ratio_vs_trl_per_round"].values())
    # the same data and batch: every arm trains the same real tokens per step
    counts = {k: r["tokens_per_step"] for k, r in b["rounds"][0]["runs"].items()}
    assert counts["trl_sft_peft"] == counts["cogcore_loop_peft"] == counts["cogcore_grouped_k1"], counts
    for part in (a, b):
        assert part["machine"]["cpu_count"] >= 1 and part["machine"]["torch_threads"] == 1
