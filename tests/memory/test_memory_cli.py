"""`cogcore memory ...` end to end through the real CLI, in a fresh workspace."""

import json

from cogcore.memory.consolidate import latest_set


def test_ingest_stats_consolidate_notes_export_forget(cli, tmp_path, make_history, desk, jsonl):
    home = tmp_path / "ws"
    events = make_history("alice", 10)
    events += desk.junk_episode("alice", "junk", events[-1]["ts"] + 100, "Like and subscribe for more!!! 🔥🔥")
    lines = [json.dumps(e) for e in events]
    lines.insert(3, "{oops")
    lines.insert(7, json.dumps({**events[0], "user_id": "mallory", "text": "sneaky"}))
    src = jsonl(tmp_path / "alice.jsonl", lines)
    run = lambda *a, **kw: cli("--home", str(home), "memory", *a, **kw)   # noqa: E731

    p = run("ingest", "--user", "alice", str(src), check=True)
    assert f"{len(events)} events added" in p.stdout and "2 quarantined" in p.stdout
    assert f"{src}:4: quarantined: not valid JSON" in p.stderr
    assert f"{src}:8: quarantined: event is for user 'mallory', not for 'alice'" in p.stderr
    p = run("ingest", "--user", "alice", "--strict", str(src))
    assert p.returncode == 1 and f"0 events added, {len(events)} already stored" in p.stdout

    p = run("stats", check=True)
    assert "1 users" in p.stdout and f"{len(events)} events" in p.stdout and "alice" in p.stdout
    stats = json.loads(run("stats", "--json", check=True).stdout)
    assert stats["per_user"][0]["quarantined"] == 2 and stats["per_user"][0]["episodes"] == 11

    p = run("consolidate", "--user", "alice", "--model", "tiny-llama", "--seed", "3", "--no-progress",
            "world_weight=0.3", check=True)
    assert "consolidated alice@v1" in p.stdout and "engagement_bait" in p.stdout and "lessons" in p.stdout
    cs = latest_set("alice", root=home / "consolidated")
    assert cs.version == 1 and cs.report["seed"] == 3 and cs.report["config"]["world_weight"] == 0.3
    assert {s["weight"] for r in cs.train_records() if r["target"] == "world" for s in r["segments"]} == {0.0, 0.3}

    p = run("notes", "--user", "alice", check=True)
    assert "- Before issuing a refund for the order, ask for the last four digits of their card." in p.stdout

    p = run("consolidate", "--all", "--since", "last", "--model", "tiny-llama", "--no-progress", check=True)
    assert "consolidated 0 users" in p.stdout                  # nothing new since v1

    out = tmp_path / "export.jsonl"
    run("export", "--user", "alice", "--out", str(out), check=True)
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(exported) == len(events) and all(e["user_id"] == "alice" for e in exported)
    assert run("export", "--user", "alice", check=True).stdout.count("\n") == len(events)

    (home / "adapters" / "alice" / "v1").mkdir(parents=True)  # an adapter published from this data
    p = run("forget", "--user", "alice", check=True)
    assert f"forgot alice: {len(events)} events, 2 quarantined lines" in p.stdout
    assert "cogcore adapters forget alice --yes" in p.stderr  # the adapters are kept, and it says so
    assert str(home / "consolidated" / "alice") in p.stdout
    assert not (home / "consolidated" / "alice").exists()
    assert "no notes for alice" in run("notes", "--user", "alice", check=True).stdout
    assert json.loads(run("stats", "--json", check=True).stdout)["events"] == 0


def test_user_errors_are_one_line(cli, tmp_path):
    home = tmp_path / "ws"
    run = lambda *a: cli("--home", str(home), "memory", *a)   # noqa: E731
    for args, says in [
        (["ingest", "--user", "../root", str(tmp_path / "x.jsonl")], "user id '../root' is not allowed"),
        (["ingest", "--user", "alice", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["consolidate", "--user", "alice", "--model", "tiny-llama"], "no events for user alice"),
        (["consolidate", "--user", "alice", "replay_share=2"], "replay_share=2.0 must be in [0, 1)"),
        (["stats", "--db", "postgresql://u:pw@host/db"], "needs psycopg"),
        (["consolidate", "--user", "alice", "--since", "someday"], "--since 'someday'"),
    ]:
        p = run(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert says in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    p = run("stats", "--db", f"sqlite:///{bad}")
    assert p.returncode == 2 and f"{bad} is not a readable SQLite database" in p.stderr


def test_help(cli):
    p = cli("memory", "--help")
    assert p.returncode == 0 and "consolidate" in p.stdout and "forget" in p.stdout
    p = cli("memory", "consolidate", "--help")
    assert p.returncode == 0 and "--since" in p.stdout and "--max-perplexity" in p.stdout
    assert cli("memory", "consolidate").returncode == 2           # --user or --all is required


def test_junk_classifier_command_trains_once_scores_and_reports_bad_labels(cli, tmp_path, jsonl):
    home = tmp_path / "ws"
    run = lambda *a, **kw: cli("--home", str(home), "memory", "junk-classifier", "--model", "tiny-llama", *a, **kw)  # noqa: E731
    labels = jsonl(tmp_path / "labels.jsonl", [{"text": "gm fam wagmi", "junk": True},
                                                {"text": "refund(order=4411, amount=29.99)", "junk": False}])
    p = run("--examples", str(labels), "--score", "lol ok", "refund(order=1)", check=True)
    assert "trained in" in p.stdout and "junk classifier of tiny-llama" in p.stdout
    scores = [line for line in p.stdout.splitlines() if line.endswith(("lol ok", "refund(order=1)"))]
    assert len(scores) == 2 and all(0 <= float(line.split()[0]) <= 1 for line in scores)
    saved = list((home / "experience" / "junk-classifier").glob("*.safetensors"))
    assert len(saved) == 1
    p = run(check=True)                                                  # kept: loaded, not trained again
    assert "trained in" not in p.stdout and str(saved[0]) in p.stdout

    bad = jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "junk": True}, {"text": "no label"}])
    p = run("--examples", str(bad))
    assert p.returncode != 0 and f"{bad}:2: expected" in p.stderr
