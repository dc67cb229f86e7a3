"""Multi-LoRA serving on the embedded model: cogcore's mixed batching vs PEFT, adapter switch
cost, an HTTP load test at 4x the sustainable rate, and a 4-bit (nf4) base's agreement.

Side by side in one run, same machine, same model (SmolLM2-135M-Instruct, fp32), same 16
random rank-16 adapters on all linear layers, same requests (real-world probe questions in the
chat template), greedy, exactly `--new-tokens` tokens each (ignore_eos):

  throughput  R concurrent requests over A adapters, generated tokens/s (median of repeats):
              cogcore engine (one forward per step for all rows, gathered LoRA) vs PEFT
              `set_adapter` + `generate` per request one by one (the issue's baseline) vs PEFT's
              own mixed batch (`generate(adapter_names=...)`) vs the same requests on the core
              (no adapter) in the cogcore engine and in transformers' batched generate.
              Greedy tokens are compared with PEFT one-by-one's (agreement).
  switch      p50 latency of one request whose adapter is on the device vs only in the CPU
              tier (a slot write) vs only on disk (registry read + checks), 2 device slots.
  load        a real `cogcore serve` subprocess on loopback, open-loop arrivals at 4x the
              sustainable request rate (from `throughput`) for `--load-seconds`: accepted vs
              429, p50/p99 latency of accepted requests, server RSS over time, still healthy.
  nf4         the core loaded 4-bit (bitsandbytes CPU backend) with the adapters on top: model
              memory, greedy agreement with fp32 on the probe questions, probe accuracy, speed.

    python bench/bench_serve.py [--requests 32] [--adapters 16]
        [--new-tokens 32] [--repeats 3] [--load-seconds 60] [--parts throughput,switch,load,nf4]
        [--out bench/results/serve_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"  # --model changes it (tiny-llama: a quick shakedown of the script)


def machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


# ---------------------------------------------------------------------------- setup


def make_registry(base, n: int, rank: int, root: Path):
    """n random rank-`rank` PEFT adapters on all linear layers, published like refresh would."""
    from peft import LoraConfig, get_peft_model

    from cogcore.lora.registry import AdapterRegistry
    reg = AdapterRegistry(root / "adapters")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out = root / f"src-{i}"
        peft_model.save_pretrained(out)
        reg.publish(f"user{i:02d}", out, base_hash=base.base_hash)
        shutil.rmtree(out)
    return reg


def prompts(tok, n: int) -> list[str]:
    from cogcore.eval.probes import load_probes
    from cogcore.memory.formats import render_prompt
    qs = [p.question for p in load_probes()]
    return [render_prompt(tok, [{"role": "user", "content": qs[i % len(qs)]}]) for i in range(n)]


# ---------------------------------------------------------------------------- throughput


def run_engine_batch(eng, ids: list[list[int]], models: list[str], new_tokens: int):
    from cogcore.serve.engine import GenerationRequest
    targets = [eng.resolve(m) for m in models]
    with eng.hold():
        handles = [eng.submit(GenerationRequest(i, t, max_tokens=new_tokens, ignore_eos=True))
                   for i, t in zip(ids, targets)]
        t0 = time.perf_counter()
    res = [h.result(600) for h in handles]
    return time.perf_counter() - t0, [r.token_ids for r in res]


def throughput(args, eng, base_spec, reg, tok, result: dict) -> None:
    from peft import PeftModel

    from cogcore.train.model import load_model
    n, A, T = args.requests, args.adapters, args.new_tokens
    texts = prompts(tok, n)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    users = [f"user{i % A:02d}" for i in range(n)]
    models = [f"{u}@v1" for u in users]
    eng.cache.preload([eng.resolve(m).adapter for m in set(models)])
    run_engine_batch(eng, ids, models, 4)  # warm-up: adapters into their slots, allocator warm

    # PEFT: all adapters loaded into one PeftModel (a second copy of the base)
    base = load_model(base_spec)
    base.eval()
    t0 = time.perf_counter()
    pm = PeftModel.from_pretrained(base, str(reg.get(users[0]).path), adapter_name=users[0])
    for u in sorted(set(users) - {users[0]}):
        pm.load_adapter(str(reg.get(u).path), adapter_name=u)
    pm.eval()
    peft_load_s = time.perf_counter() - t0
    gen = dict(max_new_tokens=T, min_new_tokens=T, do_sample=False, pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def peft_mixed():
        pm.generate(**enc, adapter_names=users, **gen)

    def hf_core():
        with pm.disable_adapter():
            pm.generate(**enc, **gen)

    # the batched systems in turns within each repeat: a busy machine's drift hits them alike
    runs = {"cogcore_mixed": [], "cogcore_core": [], "peft_mixed_batch": [], "transformers_core_batch": []}
    tokens = {}
    with torch.no_grad():
        for r in range(args.repeats):
            dt, tokens["cogcore_mixed"] = run_engine_batch(eng, ids, models, T)
            runs["cogcore_mixed"].append(n * T / dt)
            dt, _ = run_engine_batch(eng, ids, ["core"] * n, T)
            runs["cogcore_core"].append(n * T / dt)
            for name, fn in (("peft_mixed_batch", peft_mixed), ("transformers_core_batch", hf_core)):
                t0 = time.perf_counter()
                fn()
                runs[name].append(n * T / (time.perf_counter() - t0))
            log(f"  repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " tok/s")
        stats = eng.stats()
        one_by_one, peft_tokens = [], []
        for _ in range(args.peft_repeats):  # the slow baseline: once is enough to see the ratio
            t0 = time.perf_counter()
            toks = []
            for i, u in zip(ids, users):
                pm.set_adapter(u)
                x = torch.tensor([i])
                out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen)
                toks.append(out[0, x.shape[1]:].tolist())
            one_by_one.append(n * T / (time.perf_counter() - t0))
            peft_tokens = toks
            log(f"  PEFT one by one: {one_by_one[-1]:.1f} tok/s")
    # HF's min_new_tokens masks EOS, ignore_eos does not: compare up to cogcore's first EOS
    stops = set(eng.stop_token_ids)
    cut = [next((k for k, t in enumerate(a) if t in stops), len(a)) for a in tokens["cogcore_mixed"]]
    pairs = [(a[:c], b[:c]) for a, b, c in zip(tokens["cogcore_mixed"], peft_tokens, cut)]
    same = [a == b for a, b in pairs]
    prefix = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / max(1, len(a)) for a, b in pairs]
    med = {k: statistics.median(v) for k, v in runs.items()}
    med["peft_one_by_one"] = statistics.median(one_by_one)
    result["throughput"] = {
        "requests": n, "adapters": A, "new_tokens": T, "rank": args.rank, "repeats": args.repeats,
        "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "runs": {k: [round(x, 1) for x in v] for k, v in {**runs, "peft_one_by_one": one_by_one}.items()},
        "paired_ratio_mixed_over_core_per_repeat": [round(a / b, 3) for a, b in
                                                    zip(runs["cogcore_mixed"], runs["cogcore_core"])],
        "ratios": {"cogcore_mixed_vs_peft_one_by_one": round(med["cogcore_mixed"] / med["peft_one_by_one"], 2),
                   "cogcore_mixed_vs_cogcore_core": round(med["cogcore_mixed"] / med["cogcore_core"], 3),
                   "cogcore_mixed_vs_peft_mixed_batch": round(med["cogcore_mixed"] / med["peft_mixed_batch"], 2),
                   "cogcore_core_vs_transformers_core_batch":
                       round(med["cogcore_core"] / med["transformers_core_batch"], 2)},
        "greedy_agreement_with_peft": {"identical_requests": f"{sum(same)}/{len(same)}",
                                       "compared_tokens": sum(cut),
                                       "mean_matching_prefix": round(statistics.mean(prefix), 3)},
        "engine_mean_batch": round(stats["mean_batch"], 1), "peft_load_16_adapters_s": round(peft_load_s, 2),
    }


# ---------------------------------------------------------------------------- switch cost


def switch_cost(args, base_spec, reg, tok, result: dict) -> None:
    from cogcore.serve.engine import Engine, EngineConfig
    n_tok = 8
    eng = Engine(EngineConfig(model=base_spec, adapters_on_device=2, cpu_adapters=args.adapters, max_rank=args.rank),
                 reg)
    text = prompts(tok, 1)[0]
    users = [f"user{i:02d}" for i in range(args.adapters)]
    lat: dict[str, list[float]] = {"disk": [], "cpu": [], "device": []}
    with eng:
        eng.generate(text, "core", max_tokens=2)  # warm-up
        for u in users:  # first request of each adapter: read from the registry on disk
            lat["disk"].append(eng.generate(text, f"{u}@v1", max_tokens=n_tok).total_s)
        for _ in range(2):  # all in the CPU tier now; round robin over > 2 adapters: every request writes a slot
            for u in users:
                lat["cpu"].append(eng.generate(text, f"{u}@v1", max_tokens=n_tok).total_s)
        for _ in range(len(lat["cpu"])):  # the same adapter again and again: always on the device
            lat["device"].append(eng.generate(text, f"{users[-1]}@v1", max_tokens=n_tok).total_s)
        st = eng.cache.state()
    p50 = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    result["switch"] = {
        "new_tokens": n_tok, "device_slots": 2, "samples": {k: len(v) for k, v in lat.items()},
        "p50_ms": {k: round(v, 1) for k, v in p50.items()},
        "p99_ms": {k: round(pct(v, 99) * 1000, 1) for k, v in lat.items()},
        "cpu_tier_over_device_ms": round(p50["cpu"] - p50["device"], 1),
        "disk_over_device_ms": round(p50["disk"] - p50["device"], 1),
        "mean_disk_load_ms": round(st["load_seconds"] / max(1, st["cpu_misses"]) * 1000, 1),
        "mean_slot_write_ms": round(st["slot_write_seconds"] / max(1, st["device_misses"]) * 1000, 2),
        "cache": {k: st[k] for k in ("device_hits", "device_misses", "device_evictions", "cpu_hits", "cpu_misses")},
    }
    log(f"  switch p50 ms: {result['switch']['p50_ms']}")


# ---------------------------------------------------------------------------- load test


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def _load(url: str, rate: float, seconds: float, users: list[str], text: str, new_tokens: int, pid: int):
    import httpx
    rng = random.Random(0)
    lat, statuses, rss = [], [], []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one(model):
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": new_tokens,
                                                               "temperature": 0, "ignore_eos": True})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
            except Exception as e:  # a refused connection would be a failure of the server
                statuses.append(type(e).__name__)

        async def sample_rss():
            while True:
                rss.append(round(rss_mb(pid), 1))
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample_rss())
        tasks = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:  # open loop: Poisson arrivals, whatever the answers do
            tasks.append(asyncio.create_task(one(f"core:{rng.choice(users)}")))
            await asyncio.sleep(rng.expovariate(rate))
        sent_s = seconds
        await asyncio.gather(*tasks)
        sampler.cancel()
        health = (await client.get("/health")).json()
    return lat, statuses, rss, sent_s, health


def load_test(args, reg, tok, result: dict, home: Path) -> None:
    from cogcore.serve.cli import spawn_server
    tp = result.get("throughput", {}).get("tokens_per_s", {}).get("cogcore_mixed")
    sustainable = (tp or args.assume_tokens_per_s) / args.new_tokens  # requests/s the engine can finish
    rate = 4 * sustainable
    users = [f"user{i:02d}" for i in range(args.adapters)]
    srv = spawn_server(["--model", args.model, "--port", "0", "--adapters", str(reg.root), "--max-batch",
                        str(args.requests), "--max-queue", str(args.requests), "--adapters-on-device",
                        str(args.adapters), "--max-rank", str(args.rank), "--timeout", "300"],
                       timeout=300, home=str(home))
    try:
        rss0 = rss_mb(srv.pid)
        lat, statuses, rss, sent_s, health = asyncio.run(
            _load(srv.url, rate, args.load_seconds, users, prompts(tok, 1)[0], args.new_tokens, srv.pid))
        alive = srv.proc.poll() is None
    finally:
        rc = srv.stop()
    ok = statuses.count(200)
    n429 = statuses.count(429)
    other = [s for s in statuses if s not in (200, 429)]
    half = len(rss) // 2
    result["load"] = {
        "sustainable_requests_per_s": round(sustainable, 2), "offered_requests_per_s": round(rate, 2),
        "seconds": sent_s, "sent": len(statuses), "accepted_200": ok, "rejected_429": n429,
        "other": {str(s): other.count(s) for s in set(other)},
        "served_requests_per_s": round(ok / sent_s, 2),
        "latency_accepted_s": {"p50": round(pct(lat, 50), 2), "p90": round(pct(lat, 90), 2),
                               "p99": round(pct(lat, 99), 2), "max": round(max(lat), 2) if lat else None},
        "server_rss_mb": {"before": round(rss0, 1), "first_half_max": max(rss[:half] or [0]),
                          "second_half_max": max(rss[half:] or [0]), "end": rss[-1] if rss else None},
        "server_alive_after": alive, "health_after": {k: health.get(k) for k in ("status", "running", "waiting")},
        "server_exit_code": rc,
    }
    log(f"  load: {result['load']}")


# ---------------------------------------------------------------------------- nf4


def nf4(args, reg, tok, result: dict) -> None:
    from cogcore.eval.probes import load_probes, mentions
    from cogcore.serve.engine import Engine, EngineConfig
    from cogcore.train.model import ModelSpec
    probes = load_probes()[: args.nf4_probes]
    texts = prompts(tok, len(probes))
    models = ["core", "user00@v1", "user01@v1"]
    out: dict = {"probes": len(probes), "new_tokens": args.nf4_tokens, "models": models}
    answers = {}
    for quant in ("none", "nf4"):
        spec = ModelSpec(args.model, quantize=quant)
        eng = Engine(EngineConfig(model=spec, adapters_on_device=4, max_rank=args.rank, max_batch=len(probes)), reg)
        mem = sum(t.numel() * t.element_size() for t in list(eng.model.parameters()) + list(eng.model.buffers()))
        lora = sum(L.lora_A.numel() * L.lora_A.element_size() + L.lora_B.numel() * L.lora_B.element_size()
                   for L in eng.patch.layers.values())
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        with eng:
            t0 = time.perf_counter()
            answers[quant] = {m: run_engine_batch(eng, ids, [m] * len(ids), args.nf4_tokens)[1] for m in models}
            dt = time.perf_counter() - t0
        out[quant] = {"model_mb": round((mem - lora) / 2**20, 1), "adapter_slots_mb": round(lora / 2**20, 1),
                      "tokens_per_s": round(len(models) * len(ids) * args.nf4_tokens / dt, 1),
                      "probe_accuracy": {m: round(statistics.mean(
                          mentions(tok.decode(a, skip_special_tokens=True), p.answers, p.case_sensitive)
                          for a, p in zip(answers[quant][m], probes)), 3) for m in models}}
        log(f"  {quant}: {out[quant]}")
        del eng
    agree = {}
    for m in models:
        a, b = answers["none"][m], answers["nf4"][m]
        agree[m] = {"identical": f"{sum(x == y for x, y in zip(a, b))}/{len(a)}",
                    "first_token_same": round(statistics.mean(x[0] == y[0] for x, y in zip(a, b)), 3),
                    "token_agreement": round(statistics.mean(
                        sum(p == q for p, q in zip(x, y)) / len(x) for x, y in zip(a, b)), 3)}
    out["greedy_agreement_nf4_vs_fp32"] = agree
    result["nf4"] = out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peft-repeats", type=int, default=1)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--assume-tokens-per-s", type=float, default=200.0, help="load part without throughput part")
    ap.add_argument("--nf4-probes", type=int, default=48)
    ap.add_argument("--nf4-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--parts", default="throughput,switch,load,nf4")
    ap.add_argument("--out", default="bench/results/serve_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    from cogcore.serve.engine import Engine, EngineConfig
    from cogcore.train.model import ModelSpec, load_model, load_tokenizer, resolve

    spec = ModelSpec(args.model)
    resolve(spec)  # convert the embedded GGUF once, outside any timing
    tok = load_tokenizer(spec)
    result: dict = {"machine": machine(), "model": args.model, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every part: a later failure keeps what was measured
        out.write_text(json.dumps(result, indent=1))

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        t0 = time.perf_counter()
        base = load_model(spec)
        reg = make_registry(base, args.adapters, args.rank, work)
        del base
        log(f"published {args.adapters} adapters in {time.perf_counter() - t0:.1f} s")
        if "throughput" in parts:
            eng = Engine(EngineConfig(model=spec, adapters_on_device=args.adapters, max_batch=args.requests,
                                      max_rank=args.rank), reg)
            with eng:
                throughput(args, eng, spec, reg, tok, result)
            del eng
            save()
        if "switch" in parts:
            if args.adapters < 3:
                raise SystemExit("the switch part needs --adapters >= 3 (2 device slots + adapters that miss them)")
            switch_cost(args, spec, reg, tok, result)
            save()
        if "load" in parts:
            from cogcore.train.workspace import get_workspace
            load_test(args, reg, tok, result, get_workspace().root)
            save()
        if "nf4" in parts:
            nf4(args, reg, tok, result)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "args")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
