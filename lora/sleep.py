"""`cogcore sleep`: consolidate → refresh → gate → publish for every user who is due, once or every interval.

    cogcore sleep                                  # one cycle, then exit
    cogcore sleep --every 6h --min-new-events 50   # forever, a cycle every 6 hours
    cogcore sleep --max-age 1d refresh.train.max_steps=60 consolidate.replay_share=0.3

A user is due for consolidation when at least ``min_new_events`` events arrived since their
last set, or when any did and that set is older than ``max_age``. A user is due for a refresh
when their latest set is newer than their LIVE adapter's lineage (so a cycle killed between
consolidation and publishing picks up where it stopped). Scheduling only calls the recipes
(memory.consolidate.consolidate, lora.refresh.refresh_users, which gates and publishes);
a per-user sleep lock means two sleepers never work on one user at once, and the refresh
lock inside means a manual `cogcore refresh` never trains alongside them either.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import time
from dataclasses import dataclass

from cogcore.memory.consolidate import ConsolidateConfig, consolidate
from cogcore.train.config import CogcoreError, ConfigError, describe, field, load_config
from cogcore.train.workspace import get_workspace

from .refresh import RefreshConfig, RefreshResult, due_users, refresh_users
from .registry import AdapterRegistry

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str, key: str) -> float:
    """'90', '90s', '15m', '6h', '1d' → seconds; '' → 0."""
    if not text:
        return 0.0
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a duration; write e.g. 90s, 15m, 6h or 1d")
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass
class SleepConfig:
    every: str = field("", help="run a cycle every DURATION (90s, 15m, 6h, 1d); empty = one cycle")
    cycles: int = field(0, help="with every: stop after this many cycles (0 = run until interrupted)")
    min_new_events: int = field(20, help="consolidate a user once this many events arrived since their last set")
    max_age: str = field("", help="also consolidate a user with any new event when their last set is older than this")
    users: list[str] = field(default_factory=list, help="only these users (default: everyone in the log)")
    db: str = field("", help="experience log URL (default sqlite:///<home>/experience/log.sqlite)")
    consolidate: ConsolidateConfig = field(default_factory=ConsolidateConfig,
                                           help="consolidation (its model is set to refresh.model.source)")
    refresh: RefreshConfig = field(default_factory=RefreshConfig, help="refresh, gate and publish")

    def __post_init__(self):
        seconds(self.every, "every")
        seconds(self.max_age, "max_age")
        if self.min_new_events < 1:
            raise ValueError(f"min_new_events must be >= 1, got {self.min_new_events}")
        if self.cycles < 0:
            raise ValueError("cycles must be >= 0")
        if self.refresh.user:
            raise ValueError("refresh.user is chosen per user by sleep; leave it unset (use users=[...] to restrict)")


@dataclass
class UserCycle:
    """What one cycle did for one user (a row of the summary table)."""

    user: str
    new_events: int = 0
    consolidated: str = "-"        # "v3" when a set was written this cycle
    refresh: RefreshResult | None = None
    note: str = ""


def consolidation_due(log, user: str, cfg: SleepConfig, now: float) -> tuple[bool, int, str]:
    """(due, new events, why) for one user."""
    new = log.count_new_events(user)
    if new == 0:
        return False, 0, "no new events"
    if new >= cfg.min_new_events:
        return True, new, f"{new} new events"
    last = log.last_consolidation(user)
    max_age = seconds(cfg.max_age, "max_age")
    if max_age and last is not None and now - float(last["created"]) >= max_age:
        return True, new, f"last set is {(now - float(last['created'])) / 3600:.1f} h old"
    if last is None and max_age:
        return True, new, "never consolidated"
    return False, new, f"{new} new events < {cfg.min_new_events}"


def cycle(cfg: SleepConfig, registry: AdapterRegistry | None = None) -> list[UserCycle]:
    """One sleep: consolidate the users who are due, then refresh (gate, publish) those whose set is new."""
    from cogcore.memory.log import ExperienceLog
    registry = registry or AdapterRegistry()
    cons_cfg = dataclasses.replace(cfg.consolidate, model=cfg.refresh.model.source, progress=False)
    rows: dict[str, UserCycle] = {}
    log = ExperienceLog.open(cfg.db or None)
    try:
        users = cfg.users or log.users()
        with contextlib.ExitStack() as locks:
            mine = []
            for user in users:
                rows[user] = UserCycle(user)
                try:  # another sleeper working on this user: leave it to them
                    locks.enter_context(registry.lock(user, "sleep", timeout=0))
                except CogcoreError as e:
                    rows[user].note = str(e)
                    continue
                mine.append(user)

            # 1. consolidate who is due (each user's failure is theirs alone)
            now = time.time()
            for user in mine:
                due, new, why = consolidation_due(log, user, cfg, now)
                rows[user].new_events, rows[user].note = new, why
                if not due:
                    continue
                try:
                    cset = consolidate(log, user, cons_cfg)
                    rows[user].consolidated = f"v{cset.version}"
                except CogcoreError as e:
                    rows[user].note = f"consolidation failed: {e}"

            # 2. refresh, gate and publish every user whose latest set is newer than their adapter
            due = [u for u in due_users(cfg.refresh, registry) if u in mine]
            for result in refresh_users(cfg.refresh, due, registry):
                rows[result.user].refresh = result
    finally:
        log.close()
    return list(rows.values())


def summary_table(rows: list[UserCycle], title: str):
    from rich.table import Table
    t = Table(title=title)
    for col in ("user", "new events", "consolidated", "gate", "published", "live", "note"):
        t.add_column(col)
    for r in rows:
        res = r.refresh
        gate = "-" if res is None else ("passed" if res.passed else "refused")
        why = "; ".join(res.reasons) if res is not None and res.reasons else r.note
        t.add_row(r.user, str(r.new_events), r.consolidated, gate, (res.published if res else None) or "-",
                  (res.live if res else None) or "-", why[:140])
    return t


def run(cfg: SleepConfig) -> list[list[UserCycle]]:
    """Cycles until ``cycles`` are done (one when ``every`` is empty); returns each cycle's rows."""
    from rich.console import Console
    every = seconds(cfg.every, "every")
    done: list[list[UserCycle]] = []
    while True:
        t0 = time.time()
        rows = cycle(cfg)
        done.append(rows)
        Console().print(summary_table(rows, f"sleep cycle {len(done)} ({time.time() - t0:.0f} s, "
                                            f"{time.strftime('%H:%M:%S')})"))
        if not every or (cfg.cycles and len(done) >= cfg.cycles):
            return done
        time.sleep(max(0.0, every - (time.time() - t0)))


def build_parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k:<40} {t}: {h}" for k, t, h in describe(SleepConfig))
    p = argparse.ArgumentParser(prog="cogcore sleep", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="consolidate -> refresh -> gate -> publish for every due user",
                                epilog="config keys (key=value):\n" + keys)
    p.add_argument("--every", help="run a cycle every DURATION (90s, 15m, 6h, 1d); default: one cycle")
    p.add_argument("--cycles", type=int, help="with --every: stop after N cycles")
    p.add_argument("--min-new-events", type=int, help="new events that make a user due (default 20)")
    p.add_argument("--max-age", help="also due: any new event and a last set older than DURATION")
    p.add_argument("--users", help="comma-separated users (default: everyone in the log)")
    p.add_argument("--config", help="YAML file with SleepConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. refresh.train.max_steps=60")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {"every": args.every, "cycles": args.cycles, "min_new_events": args.min_new_events,
             "max_age": args.max_age, "users": args.users}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(SleepConfig, args.config, overrides)
    get_workspace()  # create the workspace before the first cycle
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("sleep: interrupted; every finished user's adapter is published, the rest resume next time")
        return 130
    return 0

