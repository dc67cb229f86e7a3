"""Adapter refresh throughput, side by side in one run (issue #11 targets).

(a) K users, same data sizes: all K adapters in one grouped pass (lora.grouped) vs K
    sequential single-user runs (each the same one loop with a PEFT LoRA on one user's rows).
    Wall time of each arm (setup + training + weights out; the base is loaded once for both),
    median over repeats, and the ratio.
(b) One user's refresh, trained tokens/s (real tokens: targets with loss weight > 0, not
    weight sums) vs TRL ``SFTTrainer`` + PEFT on the same model, data and LoRA config
    (r16, alpha 32, all linear layers, 4 rows x 256 tokens, fp32, AdamW): cogcore as the
    single-user loop with PEFT, and as the grouped path with K=1. Median over steps after
    warm-up; with --repeats, rounds of the three arms in a rotated order, and the median over
    rounds of each round's ratio (a drift of the host's speed falls on all arms alike).

    python -m cogcore.bench.bench_refresh                     # smollm2-135m, both parts
    python -m cogcore.bench.bench_refresh --only b --repeats 3 --steps 4 --threads 1
    python -m cogcore.bench.bench_refresh --quick --out OUT.json     # tiny preset smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cogcore.lora.grouped import LoraShape, pack_user_rows, train_adapters_grouped
from cogcore.train.distributed import DistInfo
from cogcore.train.lm import CausalLMLoss
from cogcore.train.loop import TrainConfig, train


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


# ----------------------------------------------------------------------------- the single-user baseline

def train_single_peft(model, tokenizer, records, lora, cfg: TrainConfig, run_dir, *, seq_len: int = 256,
                      init: dict | None = None, user: str = "user") -> tuple[dict, object]:
    """One user's adapter the plain way: PEFT LoRA on the model, the one loop on that user's
    rows (packed as the grouped run packs them). Returns (PEFT state dict, TrainResult); the
    model comes back unwrapped."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    lora = LoraShape.of(lora)
    rows = pack_user_rows(tokenizer, records, seq_len, user)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(**lora.peft_config()))
    try:
        if init is not None:
            missing = set_peft_model_state_dict(peft_model, init).unexpected_keys
            assert not missing, f"unexpected keys {missing[:3]}"
        result = train(CausalLMLoss(peft_model), rows, cfg, run_dir, DistInfo(), base_hash=getattr(model, "base_hash", None))
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    finally:
        peft_model.unload()  # the LoRA layers go, the base stays as it came
        if hasattr(model, "peft_config"):
            del model.peft_config
    return state, result


# ----------------------------------------------------------------------------- data

def user_data(tokenizer, n_users: int, docs_per_user: int, doc_tokens: int) -> dict[str, list[dict]]:
    """Real English text (standard-library docstrings), cut to ``doc_tokens`` tokens so one
    document fills one row; users get disjoint documents of the same sizes."""
    from cogcore.train.data import builtin_records
    texts = []
    for r in builtin_records("stdlib-docs", 100_000, 0):
        ids = tokenizer(r["text"], add_special_tokens=False).input_ids
        if len(ids) >= doc_tokens:
            texts.append(tokenizer.decode(ids[:doc_tokens]))
        if len(texts) == n_users * docs_per_user:
            break
    if len(texts) < n_users * docs_per_user:  # a tiny tokenizer: recycle documents
        texts = [texts[i % len(texts)] for i in range(n_users * docs_per_user)]
    return {f"user{u:02d}": [{"text": t} for t in texts[u * docs_per_user:(u + 1) * docs_per_user]]
            for u in range(n_users)}


# ----------------------------------------------------------------------------- timing from the loop's metrics

def _steps_from_metrics(run_dir: Path) -> dict:
    """Per-step seconds and trained tokens from the loop's metrics: dt = the step's input tokens /
    its tokens_per_s; trained tokens (loss weight > 0) are logged cumulatively."""
    from cogcore.train.loop import read_metrics
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    step_s, trained, prev = [], [], {"tokens": 0.0, "trained_tokens": 0.0}
    for r in rows:
        step_s.append((r["tokens"] - prev["tokens"]) / r["tokens_per_s"])
        trained.append(r["trained_tokens"] - prev["trained_tokens"])
        prev = r
    return {"step_s": step_s, "tokens_per_step": trained, "tokens_per_s_steps": [n / t for n, t in zip(trained, step_s)]}


# ----------------------------------------------------------------------------- (a) grouped vs sequential

def bench_grouped_vs_sequential(model, tok, data: dict, lora: LoraShape, cfg: TrainConfig, seq_len: int,
                                tokens_per_forward: int, work: Path, repeat: int) -> dict:
    """Both arms once (order alternates with ``repeat``): wall seconds, and each run's step
    times and fixed cost (wall minus its steps: PEFT wrapping, optimizer, checkpoint, weights out)."""
    def grouped() -> dict:
        out = work / f"grouped{repeat}"
        t0 = time.perf_counter()
        train_adapters_grouped(model, tok, data, lora, cfg, out, seq_len=seq_len, tokens_per_forward=tokens_per_forward)
        wall = time.perf_counter() - t0
        steps = _steps_from_metrics(out)["step_s"]
        return {"wall_s": wall, "step_s": steps, "fixed_s": wall - sum(steps)}

    def sequential() -> dict:
        walls, steps, fixed = [], [], []
        for u, recs in data.items():
            out = work / f"seq{repeat}-{u}"
            t0 = time.perf_counter()
            train_single_peft(model, tok, recs, lora, cfg, out, seq_len=seq_len, user=u)
            walls.append(time.perf_counter() - t0)
            steps.append(_steps_from_metrics(out)["step_s"])
            fixed.append(walls[-1] - sum(steps[-1]))
        return {"wall_s": sum(walls), "per_user_wall_s": walls, "step_s": steps, "fixed_s": fixed}

    if repeat % 2 == 0:  # alternate which arm goes first
        g, s = grouped(), sequential()
    else:
        s, g = sequential(), grouped()
    return {"grouped": g, "sequential": s, "ratio": s["wall_s"] / g["wall_s"]}


def summarize_a(runs: list[dict], n_users: int, n_steps: int) -> dict:
    """Wall-time medians, and a load-robust estimate from medians of steps and of fixed costs
    (other jobs on a shared box stretch single steps; a median ignores those)."""
    g_wall = statistics.median(r["grouped"]["wall_s"] for r in runs)
    s_wall = statistics.median(r["sequential"]["wall_s"] for r in runs)
    g_step = statistics.median(t for r in runs for t in r["grouped"]["step_s"])
    s_step = statistics.median(t for r in runs for ts in r["sequential"]["step_s"] for t in ts)
    g_fixed = statistics.median(r["grouped"]["fixed_s"] for r in runs)
    s_fixed = statistics.median(f for r in runs for f in r["sequential"]["fixed_s"])
    g_est = n_steps * g_step + g_fixed
    s_est = n_users * (n_steps * s_step + s_fixed)
    return {"median_grouped_wall_s": g_wall, "median_sequential_wall_s": s_wall, "ratio_wall": s_wall / g_wall,
            "median_step_s": {"grouped_all_users": g_step, "single_user": s_step,
                              "single_user_x_users": n_users * s_step},
            "median_fixed_s": {"grouped": g_fixed, "single_user": s_fixed},
            "estimate_from_medians_s": {"grouped": g_est, "sequential": s_est}, "ratio_from_medians": s_est / g_est}


# ----------------------------------------------------------------------------- (b) single user vs TRL

def run_cogcore_single(model, tok, records, lora, cfg: TrainConfig, seq_len: int, out: Path) -> dict:
    train_single_peft(model, tok, records, lora, cfg, out, seq_len=seq_len)
    return _steps_from_metrics(out)


def run_cogcore_grouped1(model, tok, records, lora, cfg: TrainConfig, seq_len: int, out: Path) -> dict:
    train_adapters_grouped(model, tok, {"user": records}, lora, cfg, out, seq_len=seq_len)
    return _steps_from_metrics(out)


def run_trl(model_dir: str, tok, records, lora: LoraShape, cfg: TrainConfig, seq_len: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=cfg.micro_batch, max_steps=cfg.max_steps,
                     learning_rate=cfg.lr, max_length=seq_len, packing=False, logging_steps=10_000,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=cfg.seed,
                     dataloader_num_workers=0, gradient_accumulation_steps=cfg.grad_accum, warmup_steps=0,
                     dataset_text_field="text")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(list(records)), processing_class=tok,
                         peft_config=LoraConfig(**lora.peft_config()), callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        b = collate(features)
        tokens.append(int((b["labels"][:, 1:] != -100).sum()))  # predicted (trained) tokens
        return b

    trainer.data_collator = counting
    trainer.train()
    return {"step_s": times, "tokens_per_step": tokens[: len(times)],
            "tokens_per_s_steps": [n / t for n, t in zip(tokens, times)]}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few steps: a smoke run (seconds)")
    ap.add_argument("--model", default=None, help="model preset or HF dir (default smollm2-135m; tiny-llama-wide with --quick)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--group-rows", type=int, default=2, help="(a) rows per user per step")
    ap.add_argument("--group-steps", type=int, default=3, help="(a) optimizer steps per adapter")
    ap.add_argument("--tokens-per-forward", type=int, default=2048, help="(a) grouped: tokens in one forward pass")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of every arm, interleaved (median): (a) rounds "
                                                           "of both arms, (b) rounds of the three")
    ap.add_argument("--steps", type=int, default=6, help="(b) optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="(b) steps left out of the median")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--only", choices=["a", "b"], default=None, help="run one part only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="bench/results/refresh.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.model = args.model or "tiny-llama-wide"
        args.users, args.group_steps, args.steps, args.seq_len = min(args.users, 4), 2, 3, 64
    model_name = args.model or "smollm2-135m"
    if args.threads:
        torch.set_num_threads(args.threads)

    from cogcore.bench.bench_kernels import keep_large_buffers
    malloc = keep_large_buffers()  # all arms alike: no page-faulting of multi-MiB temporaries per call
    work = Path(tempfile.mkdtemp(prefix="cogcore-bench-refresh-"))
    os.environ.setdefault("COGCORE_HOME", str(work / "home"))
    from cogcore.train.model import load_model, load_tokenizer, resolve
    tok = load_tokenizer(model_name)
    model = load_model(model_name)
    lora = LoraShape(r=16, alpha=32.0)
    base_cfg = TrainConfig(max_steps=args.steps, micro_batch=args.batch, lr=2e-4, warmup_steps=0, precision="fp32",
                           progress=False, tensorboard=False, seed=0)
    lora_desc = {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.target_modules)}
    out = Path(args.out)
    # --only: replace that part in an existing results file, keep the other
    summary: dict = json.loads(out.read_text()) if args.only and out.is_file() else {}
    summary["model"] = model_name

    def stamp(part: dict, started: dict) -> dict:  # each part records its settings and the machine's state
        import resource
        return part | {"settings": vars(args) | {"model": model_name, "lora": lora_desc},
                       "machine": started | {"malloc": malloc, "load_average_at_end": os.getloadavg(),
                                             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}

    if args.only in (None, "a"):
        started = machine()
        docs = args.group_rows * args.group_steps  # one document fills one row: an epoch per run
        data = user_data(tok, args.users, docs, args.seq_len - 2)
        cfg_a = replace(base_cfg, max_steps=args.group_steps, micro_batch=args.group_rows)
        # untimed warm-up of both paths (first-call costs: imports, allocator, kernels)
        warm = replace(cfg_a, max_steps=1)
        two = dict(list(data.items())[:2])
        train_adapters_grouped(model, tok, two, lora, warm, work / "warm-grouped", seq_len=args.seq_len)
        train_single_peft(model, tok, two[next(iter(two))], lora, warm, work / "warm-single", seq_len=args.seq_len)
        runs = []
        for rep in range(args.repeats):
            print(f"== (a) repeat {rep}: {args.users} users x {args.group_steps} steps x {args.group_rows} rows", flush=True)
            runs.append(bench_grouped_vs_sequential(model, tok, data, lora, cfg_a, args.seq_len,
                                                    args.tokens_per_forward, work, rep))
            print(f"   grouped {runs[-1]['grouped']['wall_s']:.1f} s, sequential {runs[-1]['sequential']['wall_s']:.1f} s",
                  flush=True)
        summary["grouped_vs_sequential"] = stamp({
            "what": f"{args.users} users, {args.group_steps} steps x {args.group_rows} rows x {args.seq_len} tokens "
                    "each; all adapters: grouped one pass vs sequential single-user runs (the one loop + PEFT)",
            **summarize_a(runs, args.users, args.group_steps), "target": 2.0, "runs": runs}, started)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))  # part (a) is kept even if (b) does not finish

    if args.only in (None, "b"):
        started = machine()
        data = user_data(tok, 1, args.batch * (args.steps + 1), args.seq_len - 2)["user00"]
        arms = [("trl_sft_peft", lambda o: run_trl(str(resolve(model_name)), tok, data, lora, base_cfg,
                                                   args.seq_len, o)),
                ("cogcore_loop_peft", lambda o: run_cogcore_single(model, tok, data, lora, base_cfg, args.seq_len, o)),
                ("cogcore_grouped_k1", lambda o: run_cogcore_grouped1(model, tok, data, lora, base_cfg,
                                                                      args.seq_len, o))]
        # Rounds: every arm once per round, the order rotated each round, so a drift of the host's
        # speed during the run falls on all arms alike; a round's ratios compare neighbours in time.
        rounds = []
        for rep in range(args.repeats):
            order = arms[rep % len(arms):] + arms[:rep % len(arms)]
            results = {}
            for name, fn in order:
                print(f"== (b) round {rep}: {name}", flush=True)
                r = fn(work / f"{name}-{rep}")
                steady = r["tokens_per_s_steps"][args.warmup:] or r["tokens_per_s_steps"]
                r["median_tokens_per_s"] = statistics.median(steady)
                results[name] = r
                print(f"   median {r['median_tokens_per_s']:.1f} trained tokens/s", flush=True)
            trl = results["trl_sft_peft"]["median_tokens_per_s"]
            rounds.append({"order": [name for name, _ in order], "runs": results,
                           "ratio_vs_trl": {k: v["median_tokens_per_s"] / trl for k, v in results.items()}})
        names = [name for name, _ in arms]
        summary["single_vs_trl"] = stamp({
            "what": f"one user, r16 all linear, {args.batch} x {args.seq_len}, fp32: trained tokens/s (median of "
                    f"steps {args.warmup + 1}..{args.steps}); {args.repeats} round(s), each arm once per round in a "
                    "rotated order; the ratio is the median over rounds of the round's own ratio",
            "median_tokens_per_s": {k: statistics.median(r["runs"][k]["median_tokens_per_s"] for r in rounds)
                                    for k in names},
            "ratio_vs_trl": {k: statistics.median(r["ratio_vs_trl"][k] for r in rounds) for k in names},
            "ratio_vs_trl_per_round": {k: [round(r["ratio_vs_trl"][k], 3) for r in rounds] for k in names},
            "target": 1.5, "rounds": rounds}, started)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    brief = {k: {kk: vv for kk, vv in v.items() if kk not in ("runs", "rounds", "what", "settings", "machine")}
             for k, v in summary.items() if k in ("grouped_vs_sequential", "single_vs_trl")}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
