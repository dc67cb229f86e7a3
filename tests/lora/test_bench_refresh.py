"""Smoke run of `python -m cogcore.bench.bench_refresh --quick` on a tiny preset."""

import json

from cogcore.bench.bench_refresh import main


def test_bench_refresh_quick(tmp_path, one_thread):
    out = tmp_path / "refresh.json"
    assert main(["--quick", "--model", "tiny-llama", "--users", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    a, b = res["grouped_vs_sequential"], res["single_vs_trl"]
    assert a["ratio_wall"] > 0 and a["ratio_from_medians"] > 0
    run = a["runs"][0]
    assert len(run["grouped"]["step_s"]) == 2 and [len(s) for s in run["sequential"]["step_s"]] == [2, 2, 2]
    assert set(b["median_tokens_per_s"]) == {"trl_sft_peft", "cogcore_loop_peft", "cogcore_grouped_k1"}
    # the same data and batch: every arm trains the same real tokens per step
    counts = {k: r["tokens_per_step"] for k, r in b["runs"].items()}
    assert counts["trl_sft_peft"] == counts["cogcore_loop_peft"] == counts["cogcore_grouped_k1"], counts
    for part in (a, b):
        assert part["machine"]["cpu_count"] >= 1 and part["machine"]["torch_threads"] == 1
