"""`cogcore bench kernels --quick` end to end: every part runs, writes its JSON and PNG, and the
vectorised ops agree with the loop they are compared against (a benchmark of wrong results is void)."""

import json

import pytest


@pytest.mark.slow
def test_bench_kernels_quick_writes_results(cli, tmp_path):
    out = tmp_path / "kernels.json"
    proc = cli("bench", "kernels", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out), check=True)
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    lin = result["linear_jsd"]["variants"]
    assert {"naive", "chunked"} <= set(lin) and all("peak_mib" in lin[k] for k in ("naive", "chunked"))
    lora = result["gathered_lora"]["impls"]["torch"]
    assert max(lora["max_rel_diff_vs_loop"].values()) < 1e-5 and lora["forward_ms"] > 0
    ce = result["linear_ce_frozen_head"]["ratios"]["ce_chunked_vs_naive"]  # same loss, same gradient
    assert ce["loss_rel_diff"] < 1e-5 and ce["grad_hidden_norm_rel_diff"] < 1e-5 and ce["memory"] > 0
    decode = result["lora_decode"]["impls"]
    assert decode["base"]["ms"] > 0 and decode["torch"]["max_rel_diff_vs_loop"] < 1e-5
    assert "(d) LoRA decode" in proc.stdout and "overhead" in proc.stdout
    assert result["malloc"].startswith(("glibc", "unchanged"))


def test_bench_kernels_runs_only_the_parts_asked(cli, tmp_path):
    out = tmp_path / "lora.json"
    cli("bench", "kernels", "--quick", "--device", "cpu", "--threads", "1", "--parts", "lora", "--out", str(out),
        check=True)
    result = json.loads(out.read_text())
    assert "gathered_lora" in result and "linear_jsd" not in result and "lora_decode" not in result
    grouped = result["gathered_lora"]["grouped"]["torch"]
    assert grouped["speedup_vs_loop"]["forward"] > 0 and max(grouped["max_rel_diff_vs_loop"].values()) < 1e-5
    assert out.with_suffix(".png").stat().st_size > 0
