"""The gate's generation, side by side in one run: a candidate adapter as PEFT runs it (LoRA
beside each base linear: three matmuls a layer) vs merged into the base weights for the duration
(``lora.gate.using(merged=True)``: copy the adapted weights, merge, generate, put them back).

Same model, adapter, prompts and greedy settings for both arms; the gate's own three kinds of
prompts: 11 held-out / leakage requests (40 new tokens), 40 of its real-world probes (24; the
recorded results asked 40, when that was the gate's whole probe set) and its 64 general
questions (40). Arms alternate within each repeat (a drift of the host's speed falls on
both alike); the median per arm and the ratio are reported, with how many replies are identical.

    cogcore bench gate                                      # smollm2-135m, 3 repeats
    cogcore bench gate --quick --out OUT.json               # tiny preset smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cogcore.bench.bench_refresh import machine


def gate_prompts(tokenizer, n_requests: int) -> dict[str, tuple[list[list[int]], int]]:
    """The gate's prompts: (token ids, new tokens) per kind."""
    from cogcore.demo.users import load_users
    from cogcore.lora.gate import GateConfig, general_questions, probe_questions, prompt_ids
    from cogcore.memory.formats import policy_messages, render_prompt
    cfg = GateConfig(max_new_tokens=40, probes=40)
    requests = [e.request for u in load_users(None).users for e in u.episodes[-4:]][:n_requests]
    return {"held-out requests": ([prompt_ids(tokenizer, render_prompt(tokenizer, policy_messages(r)))
                                   for r in requests], cfg.max_new_tokens),
            "probes": (probe_questions(tokenizer, cfg)[1], cfg.probe_max_new_tokens),
            "general questions": (general_questions(tokenizer, cfg)[2], cfg.max_new_tokens)}


def main(argv: list[str] | None = None) -> int:
    from peft import LoraConfig, get_peft_model

    from cogcore.eval.core import generate
    from cogcore.lora.gate import mergeable, using
    from cogcore.lora.refresh import ALL_LINEAR
    from cogcore.train.model import ModelSpec, load_model, load_tokenizer
    p = argparse.ArgumentParser(prog="python -m cogcore.bench.bench_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 1 repeat: a smoke run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate_merge.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny-llama", 1
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = ModelSpec(source=args.model)
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    model = get_peft_model(load_model(spec), LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR),
                           adapter_name="candidate")
    for name, w in model.named_parameters():  # a trained adapter's B is not zero: neither is this one's
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.002)
    assert mergeable(model), "the model's adapted layers cannot be merged exactly (not fp32 nn.Linear)"
    kinds = gate_prompts(tokenizer, 11)

    times: dict[str, dict[str, list[float]]] = {k: {"peft": [], "merged": []} for k in kinds}
    same: dict[str, int] = {}
    for rep in range(args.repeats):
        for kind, (prompts, new_tokens) in kinds.items():
            got = {}
            for arm in (("peft", "merged") if rep % 2 == 0 else ("merged", "peft")):
                with torch.no_grad(), using(model, "candidate", merged=arm == "merged"):
                    t0 = time.perf_counter()
                    got[arm] = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=64)
                    times[kind][arm].append(time.perf_counter() - t0)
            same[kind] = sum(a == b for a, b in zip(got["peft"], got["merged"]))
            print(f"repeat {rep + 1}/{args.repeats} {kind:18s} ({len(prompts)} prompts x {new_tokens} tokens): "
                  f"peft {times[kind]['peft'][-1]:.1f} s, merged {times[kind]['merged'][-1]:.1f} s", flush=True)

    rows = {}
    for kind, t in times.items():
        peft_s, merged_s = statistics.median(t["peft"]), statistics.median(t["merged"])
        rows[kind] = {"prompts": len(kinds[kind][0]), "new_tokens": kinds[kind][1], "peft_s": round(peft_s, 2),
                      "merged_s": round(merged_s, 2), "speedup": round(peft_s / merged_s, 2),
                      "identical_replies": same[kind], "runs_s": t}
    total = {arm: sum(r[f"{arm}_s"] for r in rows.values()) for arm in ("peft", "merged")}
    result = {"what": "greedy generation of the gate's prompts with a LoRA candidate (r16, all linear layers): "
                      "PEFT's adapter beside the base vs merged into it (weights copied and restored)",
              "model": args.model, "repeats": args.repeats, "machine": machine(), "kinds": rows,
              "all_prompts": {"peft_s": round(total["peft"], 2), "merged_s": round(total["merged"], 2),
                              "speedup": round(total["peft"] / total["merged"], 2)}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for kind, r in rows.items():
        print(f"{kind:18s} peft {r['peft_s']:6.1f} s  merged {r['merged_s']:6.1f} s  {r['speedup']:.2f}x  "
              f"identical {r['identical_replies']}/{r['prompts']}")
    print(f"{'all':18s} peft {total['peft']:6.1f} s  merged {total['merged']:6.1f} s  "
          f"{result['all_prompts']['speedup']:.2f}x   -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
