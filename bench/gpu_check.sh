#!/usr/bin/env bash
# GPU checks for cogcore.kernels on one CUDA card (sized for an H200, < 5 minutes). Installs nothing.
#
#   bash bench/gpu_check.sh [OUT_DIR]     # results go to $OUT, else OUT_DIR, else bench/results
#
# 1. pytest -m gpu tests/kernels tests/test_data.py   Triton + Liger vs the torch references at real
#    sizes; packed loss == unpacked loss with flash-attn (when installed), SDPA and eager on CUDA
# 2. pytest tests/kernels/triton_cases.py   the interpreter's odd tiny shapes, compiled for the GPU
# 3. python bench/bench_kernels.py --device cuda  linear JSD at V=128256 (naive / chunked / triton /
#    Liger x2), CE with a frozen lm_head (naive / chunked / Liger), gathered LoRA vs loop, LoRA decode
#    overhead over the base matmul, RMSNorm/SwiGLU/loss-chunk GB/s vs a measured copy peak
# 4. recipes on CUDA, tiny presets, about a minute in all: `distill` with a cached and with a live
#    teacher (held-out documents, so the held-out KL runs before the loop moves anything), `sft`
#    with LoRA, and `eval core` (must say "on cuda"); each summary must report device cuda.
# Writes (6 files): gpu_check.json (summary), kernels_gpu.json (+ .png), kernels_gpu_tests.txt,
# kernels_gpu_bench.txt, recipes_gpu.txt. Exit status: non-zero if a step failed or timed out.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-${1:-bench/results}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
export TRITON_CACHE_DIR="$SCRATCH/triton" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" \
    XDG_CACHE_HOME="$SCRATCH/cache" HF_HOME="$SCRATCH/hf" HF_HUB_OFFLINE=1 \
    TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# the repo root is the package: without an installed cogcore, point a `cogcore` link at it
if ! "$PY" -c "import cogcore.kernels" 2>/dev/null; then
    ln -s "$PWD" "$SCRATCH/cogcore"
    export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY" | tee "$OUT_DIR/kernels_gpu_tests.txt"
    echo '{"ok": false, "error": "no CUDA device"}' >"$OUT_DIR/gpu_check.json"
    exit 2
fi

start=$(date +%s)
step() {  # step NAME SECONDS LOGFILE CMD... : run with a time limit, keep the log, record rc
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $(($(date +%s) - start))s" | tee -a "$log"
    eval "rc_$name=$rc"
}

: >"$OUT_DIR/kernels_gpu_tests.txt"
: >"$OUT_DIR/kernels_gpu_bench.txt"
step gpu_tests 140 "$OUT_DIR/kernels_gpu_tests.txt" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_data.py
step triton_cases 40 "$OUT_DIR/kernels_gpu_tests.txt" \
    "$PY" -m pytest -q -p no:cacheprovider tests/kernels/triton_cases.py
step bench 110 "$OUT_DIR/kernels_gpu_bench.txt" \
    "$PY" bench/bench_kernels.py --device cuda --out "$OUT_DIR/kernels_gpu.json"

# 4. the recipes on CUDA (items 7-10 of issue 14): a fresh workspace, tiny presets
: >"$OUT_DIR/recipes_gpu.txt"
RUNS="$SCRATCH/runs"
recipes() {
    local cli=("$PY" -m cogcore.cli --home "$SCRATCH/ws")
    local common=(train.max_steps=20 train.progress=false train.tensorboard=false)
    "${cli[@]}" distill --config configs/distill/tiny.yaml out="$RUNS/distill-cache" "${common[@]}" || return 1
    "${cli[@]}" distill --config configs/distill/tiny.yaml out="$RUNS/distill-live" teacher_mode=live \
        "${common[@]}" || return 1
    "${cli[@]}" sft --config configs/sft/tiny.yaml out="$RUNS/sft-lora" lora.r=8 lora.alpha=16 "${common[@]}" \
        || return 1
    "${cli[@]}" eval core model.source=tiny-llama n_per_metric=8 max_new_tokens=8 out="$RUNS/eval" || return 1
}
export -f recipes
export PY SCRATCH RUNS
step recipes 150 "$OUT_DIR/recipes_gpu.txt" bash -c recipes

"$PY" - "$OUT_DIR" "$rc_gpu_tests" "$rc_triton_cases" "$rc_bench" "$(($(date +%s) - start))" "$rc_recipes" "$RUNS" <<'EOF'
import json, subprocess, sys
from pathlib import Path

out, rc_tests, rc_cases, rc_bench, wall = Path(sys.argv[1]), *map(int, sys.argv[2:6])
rc_recipes, runs = int(sys.argv[6]), Path(sys.argv[7])
recipes = {}
for name in ("distill-cache", "distill-live", "sft-lora"):
    f = runs / name / "summary.json"
    if f.is_file():
        s = json.loads(f.read_text())
        recipes[name] = {k: s.get(k) for k in ("device", "steps", "final_loss", "heldout_kl_start", "heldout_kl_end",
                                              "heldout_kl_kind", "eval_loss", "tokens_per_s")}
    else:
        recipes[name] = {"missing": str(f)}
eval_log = (out / "recipes_gpu.txt").read_text() if (out / "recipes_gpu.txt").is_file() else ""
recipes["eval_core_on_cuda"] = "eval core: loading tiny-llama on cuda" in eval_log
recipes_ok = rc_recipes == 0 and recipes["eval_core_on_cuda"] and all(
    (r.get("device") or "").startswith("cuda") for n, r in recipes.items() if n != "eval_core_on_cuda")
summary = {
    "ok": rc_tests == rc_cases == rc_bench == 0 and recipes_ok,
    "rc": {"gpu_tests": rc_tests, "triton_cases": rc_cases, "bench": rc_bench, "recipes": rc_recipes},
    "wall_s": wall,
    "recipes": recipes,
}
try:
    summary["gpu"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:  # nvidia-smi missing: keep going
    summary["gpu"] = f"nvidia-smi failed: {exc}"
tests_log = (out / "kernels_gpu_tests.txt").read_text().splitlines()
summary["test_result_lines"] = [ln for ln in tests_log if any(w in ln for w in (" passed", " failed", " error", " skipped"))]
bench = out / "kernels_gpu.json"
if bench.exists():
    result = json.loads(bench.read_text())
    summary["linear_jsd_ratios"] = result["linear_jsd"]["ratios"]
    summary["gathered_lora"] = {k: v.get("speedup_vs_loop") for k, v in result["gathered_lora"]["impls"].items()}
    summary["lora_decode"] = {k: v.get("overhead_vs_base") for k, v in result["lora_decode"]["impls"].items()}
    summary["bandwidth"] = result.get("bandwidth")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF

[ "$rc_gpu_tests" -eq 0 ] && [ "$rc_triton_cases" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_recipes" -eq 0 ]
