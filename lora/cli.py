"""`cogcore adapters list|show|rollback|gc|forget`: look at and manage the adapter registry.

    cogcore adapters list [--user alice] [--json]
    cogcore adapters show alice@v3          (or `alice` for the LIVE version)
    cogcore adapters rollback alice [--to 2]
    cogcore adapters gc [--keep 2]
    cogcore adapters forget alice --yes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from .registry import AdapterRegistry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogcore adapters", description="the per-user adapter registry (user@vN)")
    p.add_argument("--root", default=None, help="registry directory (default <home>/adapters)")
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,show,rollback,gc,forget}")
    ls = sub.add_parser("list", help="published versions, LIVE marked")
    ls.add_argument("--user", default=None, help="only this user")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = sub.add_parser("show", help="one version's metadata, lineage and gate report")
    show.add_argument("name", help="user (LIVE version) or user@vN")
    rb = sub.add_parser("rollback", help="make an older version LIVE")
    rb.add_argument("user")
    rb.add_argument("--to", type=int, default=None, help="version number (default: the one before LIVE)")
    gc = sub.add_parser("gc", help="remove half-written leftovers and old versions (LIVE is always kept)")
    gc.add_argument("--keep", type=int, default=2, help="newest versions kept per user")
    fg = sub.add_parser("forget", help="delete every version of a user")
    fg.add_argument("user")
    fg.add_argument("--yes", action="store_true", help="really delete")
    return p


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _gate_word(gate: dict) -> str:
    if not gate:
        return "-"
    return "passed" if gate.get("passed") else "FAILED"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reg = AdapterRegistry(Path(args.root) if args.root else None)

    if args.action == "list":
        arts = reg.list(args.user)
        live = {u: reg.live_version(u) for u in {a.user for a in arts}}
        if args.json:
            print(json.dumps([{**a.to_dict(), "live": live[a.user] == a.version} for a in arts], indent=1))
            return 0
        from rich.console import Console
        from rich.table import Table
        table = Table(title=f"adapters in {reg.root}")
        for col in ("adapter", "live", "created", "base", "set", "r", "gate", "sha256"):
            table.add_column(col)
        for a in arts:
            table.add_row(a.name, "*" if live[a.user] == a.version else "", _when(a.created), a.base_hash[:12],
                          str(a.lineage.get("set_version", "-")), str(a.peft_config.get("r", "-")),
                          _gate_word(a.gate), a.sha256[:12])
        Console().print(table if arts else f"no adapters published in {reg.root}")
        return 0

    if args.action == "show":
        art = reg.resolve(args.name)
        d = art.to_dict()
        d["live"] = reg.live_version(art.user) == art.version
        d["created"] = _when(art.created)
        print(json.dumps(d, indent=1, default=str))
        return 0

    if args.action == "rollback":
        before = reg.live_version(args.user)
        art = reg.rollback(args.user, args.to)
        print(f"{args.user}: LIVE v{before} -> {art.name}")
        return 0

    if args.action == "gc":
        removed = reg.gc(keep=args.keep)
        for p in removed:
            print(f"removed {p}")
        print(f"gc: removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, kept the newest {args.keep} "
              "version(s) per user and every LIVE one")
        return 0

    if args.action == "forget":
        if not args.yes:
            n = len(reg.list(args.user))
            print(f"would delete {n} version(s) of {args.user}; add --yes to do it")
            return 1
        print(f"deleted {reg.forget(args.user)} version(s) of {args.user}")
        return 0
    return 2
