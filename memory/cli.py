"""`cogcore memory ...`: the experience log from the command line.

    cogcore memory ingest --user alice events.jsonl     # bad lines: line number + reason, kept in quarantine
    cogcore memory stats
    cogcore memory export --user alice [--out alice.jsonl]
    cogcore memory notes --user alice
    cogcore memory consolidate --user alice [--since T|last] [--seed S] [--model M]
    cogcore memory consolidate --all [--new-only]
    cogcore memory forget --user alice                  # events, quarantine, notes and sets: all gone
    cogcore memory junk-classifier [--model M] [--examples labels.jsonl] [--score TEXT ...]

Every command takes ``--db URL`` (default: sqlite:///<workspace>/experience/log.sqlite).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..train.config import CogcoreError

SHOW_QUARANTINED = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogcore memory", description="The per-user experience log and its "
                                "consolidation into training sets.")
    sub = p.add_subparsers(dest="action", metavar="<action>")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--db", help="database URL (default: sqlite:///<workspace>/experience/log.sqlite)")
        return sp

    sp = add("ingest", "store a JSONL file of events for one user (bad lines are reported and quarantined)")
    sp.add_argument("--user", required=True)
    sp.add_argument("files", nargs="+", metavar="FILE.jsonl")
    sp.add_argument("--strict", action="store_true", help="exit with status 1 if any line was quarantined")

    sp = add("stats", "events, episodes, quarantined lines, notes and sets per user")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("export", "a user's events as JSONL (re-ingestable)")
    sp.add_argument("--user", required=True)
    sp.add_argument("--out", help="write to this file instead of stdout")

    sp = add("forget", "remove every trace of a user: events, quarantine, notes, consolidated sets")
    sp.add_argument("--user", required=True)

    sp = add("notes", "show (or add to) a user's notes: lessons that serving can put in the prompt")
    sp.add_argument("--user", required=True)
    sp.add_argument("--add", metavar="TEXT", help="add this note")

    sp = add("consolidate", "turn experience into a versioned training set (junk gate, dedup, lessons, "
                            "policy + world-model examples, replay, held-out split)")
    who = sp.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--all", action="store_true", help="every user with events")
    sp.add_argument("--new-only", action="store_true", help="with --all: only users with events newer than their last set")
    sp.add_argument("--since", help="only episodes with events after T (unix seconds, ISO time, or 'last' = since the "
                                    "user's last consolidation)")
    sp.add_argument("--seed", type=int, help="seed (the config key `seed`)")
    sp.add_argument("--model", help="model for the tokenizer / perplexity / lessons (default smollm2-135m)")
    sp.add_argument("--max-perplexity", type=float, help="turn the model score on with this threshold (0 = off)")
    sp.add_argument("--junk-classifier", action="store_true", help="also drop what the junk classifier calls junk "
                                                                   "(the config key `junk_classifier`)")
    sp.add_argument("--replay-share", type=float, help="share of replay rows (the config key `replay_share`)")
    sp.add_argument("--replay-source", help="a builtin: source (builtin:chat-general, builtin:chat-broad...) or a records file")
    sp.add_argument("--heldout-fraction", type=float, help="share of successful episodes held out for the gate")
    sp.add_argument("--lessons", choices=["template", "model"], help="who writes lessons")
    sp.add_argument("--out", help="folder for the sets (default <workspace>/consolidated)")
    sp.add_argument("--config", help="YAML file with ConsolidateConfig keys")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print the report(s) as JSON instead of the summary")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="ConsolidateConfig overrides, e.g. world_weight=0.3")

    sp = sub.add_parser("junk-classifier", help="train (or show) the junk classifier of a core model and score texts",
                        description="The junk gate's classifier: a logistic regression over the core's hidden states, "
                                    "trained on cogcore's labelled junk and good texts (plus yours with --examples), "
                                    "kept in <workspace>/experience/junk-classifier per base model.")
    sp.add_argument("--model", default="smollm2-135m", help="the core model (default smollm2-135m)")
    sp.add_argument("--examples", metavar="FILE.jsonl", help='your own labels, one {"text": ..., "junk": true|false} '
                                                            '(and optionally "request": ...) per line, added to the '
                                                            "built-in ones (retrains)")
    sp.add_argument("--retrain", action="store_true", help="train again even if one exists")
    sp.add_argument("--score", nargs="+", metavar="TEXT", help="print P(junk) of these texts")
    sp.add_argument("--request", help="with --score: read the texts as replies to this request")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help (0) or a usage error (2): argparse already printed why
        return int(e.code or 0)
    if args.action is None:
        parser.print_help()
        return 0
    if args.action == "junk-classifier":   # needs a model, not the log
        return _junk_classifier(args)
    from .log import ExperienceLog
    with ExperienceLog.open(args.db) as log:
        return ACTIONS[args.action](log, args)


# ----------------------------------------------------------------------------- actions

def _ingest(log, args) -> int:
    any_quarantined = False
    for f in args.files:
        report = log.ingest_jsonl(f, args.user, progress=sys.stderr.isatty())
        for line, reason in report.quarantined[:SHOW_QUARANTINED]:
            print(f"{f}:{line}: quarantined: {reason}", file=sys.stderr)
        if len(report.quarantined) > SHOW_QUARANTINED:
            print(f"{f}: ... and {len(report.quarantined) - SHOW_QUARANTINED} more quarantined lines "
                  f"(all are in the quarantine table)", file=sys.stderr)
        any_quarantined |= bool(report.quarantined)
        print(report.summary())
    return 1 if (args.strict and any_quarantined) else 0


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) if ts is not None else "-"


def _stats(log, args) -> int:
    s = log.stats()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: {s['users']} users, {s['events']} events, {s['quarantine']} quarantined lines, "
          f"{s['notes']} notes, {s['consolidations']} consolidations")
    if s["per_user"]:
        print(f"{'user':<20} {'events':>7} {'episodes':>8} {'quarant.':>8} {'notes':>5} {'set':>5}  "
              f"{'first (UTC)':<16}  {'last (UTC)':<16}")
        for r in s["per_user"]:
            v = f"v{r['consolidated_version']}" if r["consolidated_version"] else "-"
            print(f"{r['user']:<20} {r['events']:>7} {r['episodes']:>8} {r['quarantined']:>8} {r['notes']:>5} "
                  f"{v:>5}  {_when(r['first_ts']):<16}  {_when(r['last_ts']):<16}")
    return 0


def _export(log, args) -> int:
    events = log.export(args.user)
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
        print(f"wrote {len(events)} events of {args.user} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def _forget(log, args) -> int:
    removed = log.forget(args.user)
    print(f"forgot {args.user}: {removed['events']} events, {removed['quarantine']} quarantined lines, "
          f"{removed['notes']} notes, {removed['consolidations']} consolidation records, "
          f"sets folder: {removed['sets_dir'] or 'none'}")
    # adapters belong to lora/ (memory/ does not import it), but they were trained on this data
    from cogcore.train.workspace import get_workspace
    adapters = get_workspace().adapters / args.user
    if adapters.is_dir() and any(adapters.iterdir()):
        print(f"{args.user} still has published adapters trained on this data in {adapters}: "
              f"`cogcore adapters forget {args.user} --yes` deletes them", file=sys.stderr)
    return 0


def _notes(log, args) -> int:
    if args.add:
        added = log.add_note(args.user, args.add, source="manual")
        print("added" if added else "already there")
    notes = log.notes(args.user)
    if not notes:
        print(f"no notes for {args.user}")
    for n in notes:
        print(f"- {n}")
    return 0


def _consolidate(log, args) -> int:
    from ..train.config import load_config
    from .consolidate import ConsolidateConfig, consolidate, consolidate_all, summary
    overrides = list(args.overrides)
    for flag, key in [("seed", "seed"), ("model", "model"), ("max_perplexity", "max_perplexity"),
                      ("replay_share", "replay_share"), ("replay_source", "replay_source"),
                      ("heldout_fraction", "heldout_fraction"), ("lessons", "lessons"), ("out", "out")]:
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.junk_classifier:
        overrides.append("junk_classifier=true")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = load_config(ConsolidateConfig, args.config, overrides)
    if args.all:
        since = "last" if args.since == "last" else _since(args.since)
        sets = consolidate_all(log, cfg, since=since, only_new=args.new_only)
    else:
        since = _since(args.since, log, args.user)
        sets = [consolidate(log, args.user, cfg, since=since)]
    if args.json:
        print(json.dumps([s.report for s in sets], indent=2, ensure_ascii=False))
        return 0
    for s in sets:
        if len(sets) == 1:
            print(summary(s.report), end="")
        print(f"wrote {s.path}  ({s.n_train} training rows, {s.n_heldout} held out)")
    if len(sets) > 1 or args.all:
        rows = sum(s.n_train for s in sets)
        print(f"consolidated {len(sets)} users: {rows} training rows, {sum(s.n_heldout for s in sets)} held out, "
              f"{sum(s.report['junk']['dropped'] for s in sets)} junk episodes dropped")
    return 0


def _junk_classifier(args) -> int:
    from ..train.model import load_model, load_tokenizer
    from .junk_classifier import JunkClassifier, default_path
    from .junk_examples import read_labelled, training_examples
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    path = default_path(model.base_hash)
    if args.retrain or args.examples or not path.is_file():
        examples = training_examples(0) + (read_labelled(args.examples) if args.examples else [])
        requests, texts, labels = map(list, zip(*examples))
        t = time.perf_counter()
        clf = JunkClassifier.train(model, tok, texts, labels, requests, progress=sys.stderr.isatty())
        clf.save(path)
        print(f"trained in {time.perf_counter() - t:.0f}s", end=": ")
    else:
        clf = JunkClassifier.load(path, model)
    i = clf.info
    print(f"junk classifier of {args.model} (base {i['base_hash'][:12]}) at {path}: {i['n_junk']} junk and "
          f"{i['n_good']} good texts, training accuracy {i['train_accuracy']:.3f}, threshold {clf.threshold:g}")
    texts = args.score or []
    requests = [args.request] * len(texts) if args.request else None
    for text, p in zip(texts, clf.probabilities(model, tok, texts, requests)):
        print(f"{p:.3f}  {'junk' if p > clf.threshold else 'ok  '}  {text}")
    return 0


def _since(value: str | None, log=None, user: str | None = None) -> float | None:
    if value is None:
        return None
    if value == "last":
        last = log.last_consolidation(user)
        return last["last_event_ts"] if last else None
    try:
        return float(value)
    except ValueError:
        from .events import EventError, parse_ts
        try:
            return parse_ts(value)
        except EventError as e:
            raise CogcoreError(f"--since {value!r}: {e}") from None


ACTIONS = {"ingest": _ingest, "stats": _stats, "export": _export, "forget": _forget, "notes": _notes,
           "consolidate": _consolidate}
