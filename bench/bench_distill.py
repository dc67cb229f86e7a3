"""Distillation throughput: cogcore distill (cached and live teacher) vs TRL's GKDTrainer.

Side by side in one run, same teacher (SmolLM2-135M-Instruct), same student (10 layers pruned
from it), same examples (chat: a fixed prompt + ~N-token assistant answer from standard-library
docs), same batch (4), sequence length (256), loss (generalized JSD beta=0.5, T=1, off-policy:
TRL lmbda=0), fp32, AdamW. Throughput = trained (assistant) tokens per second of optimizer
steps, median over steps after warm-up. The teacher cache is built before timing (its build
time is reported separately): with the cache, training never runs the teacher.

    python bench/bench_distill.py [--steps 8] [--warmup 2] [--out bench/results/distill_vs_trl.json]
    cogcore bench distill [same flags]
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
from pathlib import Path

import torch

TEACHER = "smollm2-135m"


def machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def make_data(tok, n: int, answer_tokens: int, path: Path) -> Path:
    from cogcore.train.data import builtin_records
    docs = [r["text"] for r in builtin_records("stdlib-docs", 10_000, 0)]
    recs = []
    for d in docs:
        ids = tok(d, add_special_tokens=False).input_ids
        if len(ids) < answer_tokens:
            continue
        recs.append({"messages": [{"role": "user", "content": "Explain this part of the Python documentation."},
                                  {"role": "assistant", "content": tok.decode(ids[:answer_tokens])}]})
        if len(recs) == n:
            break
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def run_trl(student_dir: Path, teacher_dir: Path, data: Path, steps: int, batch: int, seq_len: int, out: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(student_dir)
    ds = load_dataset("json", data_files=str(data), split="train")
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
                     lmbda=0.0, beta=0.5, temperature=1.0, max_length=seq_len, logging_steps=10_000,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
                     dataloader_num_workers=0, gradient_accumulation_steps=1, warmup_steps=0)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32),
                         args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features):
        b = collate(features)
        tokens.append(int((b["labels"] != -100).sum()))
        return b

    trainer.data_collator = counting
    trainer.train()
    # the collator may run ahead of the steps (prefetch): pair the first len(times) batches
    per_step = [tok_n / t for tok_n, t in zip(tokens, times)]
    return {"step_s": times, "tokens_per_step": tokens[: len(times)], "tokens_per_s_steps": per_step}


def run_cogcore(mode: str, student_dir: Path, data: Path, steps: int, batch: int, seq_len: int, out: Path) -> dict:
    from cogcore.distill import recipe
    from cogcore.train.config import load_config
    cfg = load_config(recipe.DistillConfig, None, [
        f"teacher.source={TEACHER}", "student.init=model", f"student.source={student_dir}",
        f"teacher_mode={mode}", f"data.source={data}", f"data.seq_len={seq_len}", "data.packing=false",
        "data.eval_documents=0", f"train.micro_batch={batch}", f"train.max_steps={steps}", "train.lr=1e-4",
        "train.warmup_steps=0", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "loss.kind=jsd", "loss.beta=0.5", "loss.temperature=1.0", "cache.k=64", "loss.topk_tail=bucket",
        f"out={out}"])
    t0 = time.perf_counter()
    if mode == "cache":
        recipe.run_cache(cfg)
    build_s = time.perf_counter() - t0
    recipe.run(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"tokens_per_s_steps": [r["tokens_per_s"] for r in rows],
            "step_s": [r["tokens"] / r["tokens_per_s"] if i == 0 else (r["tokens"] - rows[i - 1]["tokens"]) / r["tokens_per_s"]
                       for i, r in enumerate(rows)],
            "cache_build_s": build_s if mode == "cache" else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=200)
    ap.add_argument("--layers", type=int, default=10, help="student layers (pruned from the teacher)")
    ap.add_argument("--out", default="bench/results/distill_vs_trl.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cogcore-bench-"))
    os.environ.setdefault("COGCORE_HOME", str(work / "home"))
    from cogcore.distill.prune import PruneConfig, prune_to_dir
    from cogcore.train.data import DataConfig
    from cogcore.train.model import load_tokenizer, resolve
    teacher_dir = resolve(TEACHER)
    tok = load_tokenizer(TEACHER)
    n_examples = args.batch * (args.steps + 1)
    data = make_data(tok, n_examples, args.answer_tokens, work / "data.jsonl")
    student_dir = work / "student"
    prune_to_dir(TEACHER, student_dir, PruneConfig(layers=args.layers, calibration_documents=16),
                 DataConfig(source=str(data), seq_len=args.seq_len))

    results = {}
    for name, fn in [("trl_gkd", lambda o: run_trl(student_dir, teacher_dir, data, args.steps, args.batch, args.seq_len, o)),
                     ("cogcore_live", lambda o: run_cogcore("live", student_dir, data, args.steps, args.batch, args.seq_len, o)),
                     ("cogcore_cache", lambda o: run_cogcore("cache", student_dir, data, args.steps, args.batch, args.seq_len, o))]:
        print(f"== {name}", flush=True)
        r = fn(work / name)
        steady = r["tokens_per_s_steps"][args.warmup:] or r["tokens_per_s_steps"]
        r["median_tokens_per_s"] = statistics.median(steady)
        results[name] = r
        print(f"   median {r['median_tokens_per_s']:.1f} trained tokens/s", flush=True)

    base = results["trl_gkd"]["median_tokens_per_s"]
    summary = {
        "what": "trained tokens/s, SmolLM2-135M teacher -> pruned student, JSD beta=0.5, off-policy, fp32, CPU",
        "settings": vars(args), "machine": machine(),
        "median_tokens_per_s": {k: v["median_tokens_per_s"] for k, v in results.items()},
        "ratio_vs_trl": {k: v["median_tokens_per_s"] / base for k, v in results.items()},
        "cache_build_s": results["cogcore_cache"]["cache_build_s"],
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("median_tokens_per_s", "ratio_vs_trl", "cache_build_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
