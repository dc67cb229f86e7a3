"""Brain-rot dose-response (issue #11): adapters refreshed on sets where 0%, 50% and 100% of one
user's episodes carry planted junk replies that slipped past consolidation (short, popular,
low-information: the demo's junk list), everything else equal (same episodes, same replay rows,
same clean held-out episodes, same refresh config). For each: the gate's general probes
(real-world probe accuracy, arithmetic answers, general loss, junk margin) against the junk
share, and whether the gate published or blocked it, with its reasons.

    python -m cogcore.bench.bench_brainrot            # smollm2-135m, CPU minutes
    python -m cogcore.bench.bench_brainrot --quick --out OUT.json    # tiny preset (~1 min)

The tiny preset first gets a short general pre-training (chat arithmetic plus other users' kind
of service chat, never this user's), so forgetting and brain rot are measurable against it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

WRONG_ACTION = "Sure, I will take care of that for you right away."
SHARES = (0.0, 0.5, 1.0)
CRITERIA = ("general_probe_accuracy", "general_answer_accuracy", "general_loss", "general_junk_margin",
            "heldout_policy_loss", "heldout_world_loss", "heldout_junk_margin", "leakage")


# ----------------------------------------------------------------------------- sets with planted junk

def episode_rows(tok, user, episodes, *, junk: list[str] | None = None, policy_weight=1.0, world_weight=0.5):
    """(train rows, held-out rows) for a demo user's ``episodes``, built with the prompt builders
    consolidation uses; with ``junk`` every reply (policy and world) is replaced by junk text."""
    from cogcore.memory.formats import example_segments, policy_messages, world_messages
    train, held = [], []
    for i, ep in enumerate(episodes):
        eid = f"{user.id}-{i}"
        right = ep.right_action if not junk else junk[i % len(junk)]
        wrong_obs = ep.wrong_observation if not junk else junk[(i + 1) % len(junk)]
        right_obs = ep.right_observation if not junk else junk[(i + 2) % len(junk)]
        policy = example_segments(tok, policy_messages(ep.request), right, policy_weight)
        world_wrong = example_segments(tok, world_messages(ep.request, WRONG_ACTION), wrong_obs, world_weight)
        world_right = example_segments(tok, world_messages(ep.request, ep.right_action), right_obs, world_weight)
        train += [{"segments": policy, "target": "policy", "episode_id": eid, "source": "bench"},
                  {"segments": world_wrong, "target": "world", "episode_id": eid, "source": "bench"},
                  {"segments": world_right, "target": "world", "episode_id": eid, "source": "bench"}]
        held.append({"episode_id": eid, "context": ep.request, "wrong_action": WRONG_ACTION,
                     "observation": ep.wrong_observation, "right_action": ep.right_action,
                     "right_observation": ep.right_observation, "check": user.check.pattern,
                     "policy_segments": example_segments(tok, policy_messages(ep.request), ep.right_action,
                                                         policy_weight),
                     "world_segments": world_wrong})
    return train, held


def write_set(home: Path, user: str, version: int, train: list[dict], heldout: list[dict]) -> Path:
    """A complete ConsolidatedSet directory, in the layout memory/consolidate.py writes."""
    d = Path(home) / "consolidated" / user / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(heldout), d / "heldout.parquet")
    report = {"user": user, "version": version, "train_rows": len(train), "heldout": len(heldout),
              "examples": {t: sum(r["target"] == t for r in train) for t in ("policy", "world", "replay")}}
    (d / "report.json").write_text(json.dumps(report))
    (d / "report.txt").write_text(json.dumps(report))
    (d / ".complete").write_text(f"v{version}\n")
    return d


def planted_set(home: Path, tok, user, version: int, *, n_train: int, n_heldout: int = 6,
                junk: list[str] | None = None, junk_share: float = 1.0, as_user: str | None = None,
                replay_share: float = 0.2) -> Path:
    """A set like consolidation writes: the user's first ``n_train`` episodes as policy + world rows
    (the first ``junk_share`` of them with junk replies), general replay rows (memory's own
    replay_rows), and the last ``n_heldout`` episodes, clean, held out."""
    from cogcore.memory.consolidate import ConsolidateConfig, replay_rows
    eps = list(user.episodes)
    n_junk = round(junk_share * n_train) if junk else 0
    train = episode_rows(tok, user, eps[:n_junk], junk=junk)[0] if n_junk else []
    train += episode_rows(tok, user, eps[n_junk:n_train])[0]
    n_replay = round(replay_share / (1 - replay_share) * len(train))
    train += replay_rows(n_replay, ConsolidateConfig(), tok, random.Random(f"0:{user.id}"))
    random.Random(0).shuffle(train)
    held = episode_rows(tok, user, eps[-n_heldout:])[1]  # held-out episodes are always clean
    return write_set(home, as_user or user.id, version, train, held)


def general_tiny_base(home: Path, users, steps: int = 200) -> str:
    """A tiny-llama that knows chat arithmetic and the other demo users' kind of service chat (not
    alice's), trained once with the sft recipe; returns its HF directory."""
    from cogcore.train.config import load_config
    from cogcore.train.data import builtin_records
    from cogcore.train.model import load_tokenizer
    from cogcore.train.sft import SFTConfig
    from cogcore.train.sft import run as sft_run
    out = Path(home) / "runs" / "general-base"
    if (out / "model" / "config.json").is_file():
        return str(out / "model")
    tok = load_tokenizer("tiny-llama")
    mix = builtin_records("chat-arithmetic", 1500, 0)
    for u in users:
        if u.id != "alice":
            rows, _ = episode_rows(tok, u, u.episodes)
            mix += [{"segments": r["segments"]} for r in rows] * 3
    random.Random(0).shuffle(mix)
    data = out.parent / "general-base-mix.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in mix))
    sft_run(load_config(SFTConfig, None, [
        "name=general-base", "model.source=tiny-llama", f"data.source={data}", "data.seq_len=256",
        f"train.max_steps={steps}", "train.lr=2e-3", "train.micro_batch=8", "train.progress=false",
        "train.tensorboard=false"]))
    return str(out / "model")


# ----------------------------------------------------------------------------- the benchmark

def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def plot(results: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shares = [100 * r["junk_share"] for r in results]
    panels = [("general_junk_margin", "general junk margin (nats)"), ("heldout_junk_margin", "held-out junk margin"),
              ("general_probe_accuracy", "real-world probe accuracy"), ("general_loss", "general loss (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        vals = [r["criteria"].get(key, {}).get("value") for r in results]
        base = results[0]["criteria"].get(key, {}).get("reference")
        limit = [r["criteria"].get(key, {}).get("limit") for r in results]
        if any(v is None for v in vals):
            ax.set_visible(False)
            continue
        colors = ["tab:green" if r["passed"] else "tab:red" for r in results]
        ax.plot(shares, vals, "-", color="gray", zorder=1)
        ax.scatter(shares, vals, c=colors, zorder=2, s=40)
        if base is not None:  # these criteria compare with the base, the same for every share
            ax.axhline(base, color="black", lw=0.8, ls=":", label="base")
        if limit[0] is not None:
            ax.axhline(limit[0], color="tab:red", lw=0.8, ls="--", label="gate limit")
        ax.set_xlabel("planted junk (% of episodes)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title + "  (green: published, red: blocked)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_brainrot", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--quick", action="store_true", help="tiny preset with a short general pre-training (smoke run)")
    p.add_argument("--shares", default="0,0.5,1", help="junk shares to train on")
    p.add_argument("--steps", type=int, default=None, help="refresh steps (default 30; quick 60)")
    p.add_argument("--lr", type=float, default=None, help="refresh learning rate (default 5e-4; quick 1e-3)")
    p.add_argument("--episodes", type=int, default=24, help="training episodes of the user")
    p.add_argument("--home", default=None, help="workspace (default: a fresh temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/brainrot_<model>.json); a PNG "
                                               "is written beside it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cogcore.demo.users import load_users
    from cogcore.lora.refresh import RefreshConfig, run
    from cogcore.memory.consolidate import latest_set
    from cogcore.train.config import load_config
    from cogcore.train.model import load_tokenizer
    from cogcore.train.workspace import set_home

    home = Path(args.home or tempfile.mkdtemp(prefix="cogcore-brainrot-"))
    set_home(home)
    demo = load_users()
    users = {u.id: u for u in demo.users}
    t0 = time.time()
    if args.quick:
        model = general_tiny_base(home, demo.users)
        steps, lr = args.steps or 60, args.lr or 1e-3
        extra = ["lora.r=8", "data.seq_len=256", "gate.probes=4", "gate.probe_max_new_tokens=8",
                 "gate.max_new_tokens=24", "gate.leak_episodes=2"]
        replay = 0.5
    else:
        model = args.model
        steps, lr = args.steps or 30, args.lr or 5e-4
        extra = ["data.seq_len=256", "train.save_every=5"]  # CPU minutes per share: keep progress
        replay = 0.2
    tok = load_tokenizer(model)
    base_s = time.time() - t0
    if latest_set("bob") is None:
        planted_set(home, tok, users["bob"], 1, n_train=12, replay_share=replay)  # someone whose specifics could leak
    shares = [float(s) for s in args.shares.split(",")]
    tag = "tiny" if args.quick else Path(model).name
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"brainrot_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "brainrot dose-response", "model": model, "machine": machine(),
           "command": "python -m cogcore.bench.bench_brainrot " + " ".join(sys.argv[1:] if argv is None else argv),
           "refresh": {"steps": steps, "lr": lr, "episodes": args.episodes, "replay_share": replay, "extra": extra},
           "setup_seconds": round(base_s, 1), "results": []}
    results = doc["results"]
    for share in shares:
        name = f"junk{round(100 * share)}"
        run_dir = home / "runs" / f"refresh-{name}-set1"
        if (run_dir / "gate.json").is_file() and (run_dir / "summary.json").is_file():
            # finished in an earlier (interrupted) run of this benchmark in the same --home: reuse it
            gate, summary = json.loads((run_dir / "gate.json").read_text()), json.loads((run_dir / "summary.json").read_text())
            row = {"junk_share": share, "user": name, "passed": gate["passed"], "published": summary["published"],
                   "reasons": gate["reasons"], "seconds": None, "train_seconds": round(summary["elapsed_s"], 1),
                   "gate_seconds": gate["elapsed_s"], "final_loss": summary["final_loss"], "reused": True,
                   "criteria": {k: {f: v for f, v in c.items() if f != "samples"} for k, c in gate["criteria"].items()},
                   "samples": {k: c.get("samples") for k, c in gate["criteria"].items() if c.get("samples")}}
        else:
            planted_set(home, tok, users["alice"], 1, n_train=args.episodes, junk=list(demo.junk), junk_share=share,
                        as_user=name, replay_share=replay)
            cfg = load_config(RefreshConfig, None, [f"user={name}", f"model.source={model}", f"train.max_steps={steps}",
                                                    f"train.lr={lr}", "train.progress=false", "train.tensorboard=false",
                                                    *extra])
            t = time.time()
            res = run(cfg)
            row = {"junk_share": share, "user": name, "passed": res.passed, "published": res.published,
                   "reasons": res.reasons, "seconds": round(time.time() - t, 1),
                   "train_seconds": round(res.train.elapsed_s, 1), "gate_seconds": res.gate["elapsed_s"],
                   "final_loss": res.train.final_loss,
                   "criteria": {k: {f: v for f, v in c.items() if f != "samples"} for k, c in res.gate["criteria"].items()},
                   "samples": {k: c.get("samples") for k, c in res.gate["criteria"].items() if c.get("samples")}}
        results.append(row)
        print(f"junk {share:.0%}: {'published' if row['passed'] else 'BLOCKED'} "
              + "; ".join(f"{k}={row['criteria'][k]['value']:.4f}" for k in CRITERIA
                          if "value" in row["criteria"].get(k, {})), flush=True)
        out.write_text(json.dumps(doc, indent=1))  # after every share: a long run keeps what it finished

    by_share = {r["junk_share"]: r for r in results}
    doc["verdict"] = {"published_at_0": by_share[0.0]["passed"] if 0.0 in by_share else None,
                      "blocked_at_100": (not by_share[1.0]["passed"]) if 1.0 in by_share else None}
    out.write_text(json.dumps(doc, indent=1))
    png = plot(results, out.with_suffix(".png"), f"brain rot vs planted junk, {tag}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
