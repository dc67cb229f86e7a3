"""The demo's report: a summary table on the terminal, and report.html with PNG charts."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"  # NaN: not measured (e.g. probes=0)


def _gate_word(r: dict) -> str:
    """published / published at a share of its update (the gate's back-off) / blocked."""
    if not r["gate_passed"]:
        return "blocked"
    scale = r.get("gate_scale") or 1.0
    return "published" if scale == 1.0 else f"published x{scale:g}"


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="cogcore demo: before sleep -> after sleep (held-out episodes)",
              caption=f"per user: {results['heldout_per_user']} held-out episodes; general probe: "
                      f"{results['n_probes']} real-world questions the gate does not ask"
                      + ("; published xS: with S of its update as trained (the gate's back-off)"
                         if any(_gate_word(r).startswith("published x") for r in results["users"].values()) else ""))
    for col in ("user", "success", "world model", "general probe", "leakage", "gate", "adapter"):
        t.add_column(col)
    for uid, r in results["users"].items():
        t.add_row(uid,
                  f"{r['success_before']:.0%} -> {r['success_after']:.0%}",
                  f"{r['world_before']:.0%} -> {r['world_after']:.0%}",
                  f"{_pct(r['probe_before'])} -> {_pct(r['probe_after'])}",
                  f"{r['leakage']:.0%}",
                  _gate_word(r),
                  r.get("adapter") or "-")
    Console().print(t)
    phases = "  ".join(f"{k} {v:.0f}s" for k, v in results["phases_s"].items())
    Console().print(f"time per phase: {phases}  (total {sum(results['phases_s'].values()):.0f}s)")
    for t in results.get("targets", []):
        Console().print(f"  {t['status']:<12} {t['target']}: {t['detail']}", highlight=False, markup=False)


def _bar_chart(path: Path, users: dict, before_key: str, after_key: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(users)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.2))
    ax.bar([i - 0.2 for i in x], [users[n][before_key] for n in names], 0.4, label="before sleep (core)")
    ax.bar([i + 0.2 for i in x], [users[n][after_key] for n in names], 0.4, label="after sleep (user's adapter)")
    # a refused adapter is not served: that user's "after" bar is the core again
    ax.set_xticks(list(x), [n if users[n].get("gate_passed", True) else f"{n}\n(gate refused:\ncore serves)"
                            for n in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _phase_chart(path: Path, phases: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(phases)))
    ax.barh(list(phases)[::-1], list(phases.values())[::-1], color="#6a8caf")
    ax.set_xlabel("seconds")
    ax.set_title("time per phase")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gate_chart(path: Path, sleep: dict) -> None:
    """The gate's decisions: for each user, every adapter it gated (as trained, then each share of
    the update it backed off to) on its two general-ability checks, against the core and the limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    checks = (("general_probe_accuracy", "real-world probes"), ("general_answer_accuracy", "general questions"))
    trials = {}  # user -> [(scale, passed, criteria)]
    for user, rep in sleep.items():
        gate = rep.get("gate") or {}
        if gate.get("criteria"):
            trials[user] = [(t["scale"], False, t.get("criteria", {})) for t in gate.get("backoff", [])] + \
                           [(gate.get("scale", 1.0), gate["passed"], gate["criteria"])]
    if not trials:  # a rerun with nothing new to learn: the live adapters were gated in an earlier run
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no adapter was gated in this run (nothing new since the last sleep)", ha="center",
                va="center", fontsize=9)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(checks), figsize=(2 + 2.4 * max(1, len(trials)), 3.4), squeeze=False)
    for ax, (name, label) in zip(axes[0], checks):
        ax.set_ylim(0, 1.2 * max([1e-3] + [c.get(name, {}).get(f, 0) for tried in trials.values()
                                           for _, _, c in tried for f in ("reference", "value")]))
        x = 0.0
        ticks = []
        for user, tried in trials.items():
            for k, (scale, passed, crit) in enumerate(tried):
                c = crit.get(name, {})
                if "value" not in c:
                    continue
                ax.bar(x + 0.35 * k, c["value"], 0.3, color="#4c9a5b" if c.get("passed", True) else "#c0504d",
                       hatch="" if passed else "//", edgecolor="white")
                ax.text(x + 0.35 * k, 0.02 * ax.get_ylim()[1], f"x{scale:g}", ha="center", va="bottom", fontsize=7,
                        color="white")
                ax.hlines(c["reference"], x + 0.35 * k - 0.15, x + 0.35 * k + 0.15, colors="black")
                ax.hlines(c["limit"], x + 0.35 * k - 0.15, x + 0.35 * k + 0.15, colors="black", linestyles="dotted")
            ticks.append((x + 0.35 * (len(tried) - 1) / 2, user))
            x += 0.35 * len(tried) + 0.5
        ax.set_xticks([t for t, _ in ticks], [u for _, u in ticks], fontsize=8)
        ax.set_title(f"gate: {label}", fontsize=9)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="#4c9a5b"), plt.Rectangle((0, 0), 1, 1, color="#c0504d"),
                               plt.Rectangle((0, 0), 1, 1, facecolor="#999999", hatch="//", edgecolor="white"),
                               plt.Line2D([], [], color="black"), plt.Line2D([], [], color="black", linestyle="dotted")],
               labels=["check passed", "check failed", "adapter refused", "core", "limit"], fontsize=7,
               loc="lower center", ncol=5)
    fig.suptitle("the gate's decisions (xS: share of the update as trained)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict) -> Path:
    """results.json, five PNG charts and report.html into ``out``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    users = results["users"]
    _bar_chart(out / "success.png", users, "success_before", "success_after", "held-out success (right first action)")
    _bar_chart(out / "world_model.png", users, "world_before", "world_after",
               "world model: predicts the environment's answer")
    _bar_chart(out / "general_probe.png", users, "probe_before", "probe_after", "general probe (real-world facts)")
    _phase_chart(out / "phases.png", results["phases_s"])
    _gate_chart(out / "gate.png", results.get("sleep", {}))
    rows = []
    for uid, r in users.items():
        reasons = "; ".join(r.get("gate_reasons", [])) or "-"
        rows.append(
            f"<tr><td>{html.escape(uid)}</td><td>{r['success_before']:.0%} &rarr; {r['success_after']:.0%}</td>"
            f"<td>{r['world_before']:.0%} &rarr; {r['world_after']:.0%}</td>"
            f"<td>{_pct(r['probe_before'])} &rarr; {_pct(r['probe_after'])}</td><td>{r['leakage']:.0%}</td>"
            f"<td>{html.escape(_gate_word(r))} {html.escape(r.get('adapter') or '') if r['gate_passed'] else ''}</td>"
            f"<td>{html.escape(reasons)}</td></tr>")
    junk = results.get("junk", {})
    page = f"""<!doctype html><meta charset="utf-8"><title>cogcore demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style>
<h1>cogcore demo</h1>
<p>Core: {html.escape(results['core']['provenance'])} (base {html.escape(results['core']['base_hash'][:12])}).
{len(users)} users, {results['heldout_per_user']} held-out episodes each, measured through the server;
general probe: {results['n_probes']} real-world questions that the gate does not ask.
Planted junk: {junk.get('planted', 0)} episodes, dropped by consolidation: {junk.get('dropped', 0)}.</p>
<table><tr><th>user</th><th>success</th><th>world model</th><th>general probe</th><th>leakage</th><th>gate</th><th>gate's reasons</th></tr>
{''.join(rows)}</table>
<h2>Targets</h2>
<table>{''.join(f"<tr><td>{html.escape(t['status'])}</td><td>{html.escape(t['target'])}</td><td>{html.escape(t['detail'])}</td></tr>" for t in results.get('targets', []))}</table>
<h2>Before and after sleep</h2>
<img src="success.png"> <img src="world_model.png"> <img src="general_probe.png">
<h2>The gate's decisions</h2><img src="gate.png">
<h2>Time</h2><img src="phases.png">
<p>Machine: {html.escape(results.get('machine', ''))}. Raw numbers: <a href="results.json">results.json</a>.</p>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"
