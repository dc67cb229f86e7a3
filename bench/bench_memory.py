"""The experience log and consolidation: ingest throughput vs a plain JSONL append, consolidation time
for 10,000 events of 100 users, and the junk gate's precision/recall on a planted mix.

(a) Ingest, side by side in one run, repeats interleaved (log, plain, log, plain, ...), median of
    ``--repeats``; both sides start from the same events and write to the same disk, neither fsyncs
    per event (SQLite WAL with synchronous=NORMAL; the JSONL file is flushed once at the end):
      * append:  ``ExperienceLog.append(dicts)`` (validation, id hashing, idempotent insert, batches
                 of 5,000 per transaction) vs ``f.write(json.dumps(d) + "\\n")`` per dict;
      * file:    ``ExperienceLog.ingest_jsonl(path)`` (also per-line quarantine bookkeeping) vs
                 reading the same file, ``json.loads`` each line and appending ``json.dumps`` of it;
      * one by one: ``append([d])`` per event (one transaction each: what a server does per
                 request) vs write + flush per event.
(b) Consolidation of 100 users x 100 events (20 support-desk episodes each, 1 in 10 planted junk)
    with the model score OFF (``max_perplexity=0``: the embedded model is not run), the tokenizer of
    ``--model`` (default smollm2-135m, the core's chat template) loaded once before timing.
(c) Junk gate on a planted mix, judged per episode (request + action) by the named heuristics:
      * good: (i) support / coding / cooking / travel / tutoring exchanges from templates with slots,
        (ii) first sentences (>= 5 words) of Python standard-library docstrings as the action: real
        prose that nobody wrote with these rules in mind;
      * junk, dev: the strings the rules were written against (tests/memory/test_junk.py);
      * junk, dev2: a first held-out set, run once against the first rules (0.67 removed), then used
        to improve them (so no longer held out);
      * junk, held out: templates written after that, with the rules frozen (social filler, scams,
        phishing, stuffing, stutter, placeholders, test strings, bot boilerplate, ...), all with
        random emoji / punctuation / casing variation; no rule was changed after seeing them.
    With ``--model-score`` the two model gates under ``--model`` are added as consolidation runs them,
    on ``--model-score-episodes`` episodes per set: perplexity (the request scored on its own, the
    action as the reply to it; threshold = 99th percentile on a random half of the good ones) and
    relevance (how many nats per token the request adds to the action's likelihood, against a
    neutral request; threshold = 1st percentile on the same half); both evaluated on the rest.
    Relevance was added after the held-out misses had been read (fluent ads, channel intros, scam
    lines that perplexity passes); it has one number fitted, its threshold, on good episodes only.
    With ``--classifier`` the junk classifier is trained under ``--model`` and scores the first
    ``--classifier-episodes`` of each set (``--classifier-sets`` to pick sets): the rules and the
    classifier each dropping alone, the classifier alone, and the rules confirmed by the classifier
    (what consolidation does with ``junk_classifier=true``: a rule needs P(junk) >= junk_rule_confirm);
    the headline is junk_heldout_v6 against good_docstrings + good_heldout_v5.

    python -m cogcore.bench.bench_memory [--events 20000] [--repeats 5] [--model-score] [--classifier]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

NOW = time.time()


def machine() -> dict:
    import sqlite3
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "load_average_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------- synthetic experience

DESK = [  # request, naive action, refusal, right action, success
    ("I want a refund for order {n}, {why}.", "Issue a refund for order {n}.",
     "I need the last four digits of your card before I can refund order {n}.",
     "Could you tell me the last four digits of the card you paid with?",
     "Card ending {d} confirmed; the refund for order {n} is on its way."),
    ("Please ship order {n} to my new address, {why}.", "Change the shipping address of order {n}.",
     "I need you to verify the email address on the account before changing order {n}.",
     "Could you confirm the email address on your account first?", "Email verified; order {n} will ship to the new address."),
    ("Cancel my subscription {n}, {why}.", "Cancel the subscription now.",
     "The account number is required to cancel a subscription.",
     "Which plan are you on, and what is your account number?", "Subscription {n} cancelled, effective today."),
]
WHYS = ["it arrived broken", "it never arrived", "I moved last week", "it is too expensive", "I no longer use it",
        "the colour is wrong", "I was charged twice", "I am travelling", "the office is closed", "I found another one"]


def desk_events(user: str, n_episodes: int, rng: random.Random, prefix: str = "ep", junk_every: int = 10) -> list[dict]:
    """Support-desk episodes: half fail first (the refusal says why) then succeed, 1 in ``junk_every`` is junk."""
    out = []
    for i in range(n_episodes):
        ep, t = f"{prefix}{i}", NOW - 86400 * 60 + 20 * i
        req, naive, refusal, right, success = rng.choice(DESK)
        n, d, why = rng.randint(1000, 99999), rng.randint(1000, 9999), rng.choice(WHYS)
        out.append({"user_id": user, "episode_id": ep, "ts": t, "kind": "context", "text": req.format(n=n, why=why)})
        if junk_every and i % junk_every == junk_every - 1:
            actions = [(rng.choice(["Like and subscribe for more!!! 🔥🔥", "lol ok", "great great great"]), "Nothing done.")]
        elif i % 2:
            actions = [(right, success)]
        else:
            actions = [(naive, refusal), (right, success)]
        for j, (a, o) in enumerate(actions):
            out.append({"user_id": user, "episode_id": ep, "ts": t + 2 * j + 1, "kind": "action", "text": a.format(n=n)})
            out.append({"user_id": user, "episode_id": ep, "ts": t + 2 * j + 2, "kind": "observation",
                        "text": o.format(n=n, d=d)})
        out.append({"user_id": user, "episode_id": ep, "ts": t + 9, "kind": "reward", "text": "", "reward": 1.0})
    return out


def user_events(user: str, n: int, rng: random.Random) -> list[dict]:
    """Exactly ``n`` events: whole episodes, topped up with feedback events on the last one."""
    evs = desk_events(user, n // 3 + 1, rng)[:n]
    while evs and evs[-1]["kind"] != "reward":   # no half episode at the end
        evs.pop()
    last = evs[-1]
    evs += [{"user_id": user, "episode_id": last["episode_id"], "ts": last["ts"] + 1 + k, "kind": "feedback",
             "text": f"Next time please send the receipt by email (note {k})."} for k in range(n - len(evs))]
    return evs


# ----------------------------------------------------------------------------- (a) ingest

def bench_ingest(work: Path, n: int, repeats: int) -> dict:
    from cogcore.memory.log import ExperienceLog
    events = user_events("alice", n, random.Random(1))
    src = work / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    one_by_one = events[: max(1, n // 10)]

    def fresh_log(tag: str) -> ExperienceLog:
        for f in work.glob(f"{tag}.sqlite*"):
            f.unlink()
        return ExperienceLog.open(f"sqlite:///{work}/{tag}.sqlite")

    def log_append():
        log = fresh_log("append")
        t = time.perf_counter()
        added, _ = log.append(events)
        dt = time.perf_counter() - t
        log.close()
        assert added == len(events)
        return dt

    def plain_append():
        out = work / "plain.jsonl"
        t = time.perf_counter()
        with open(out, "w") as f:
            for e in events:
                f.write(json.dumps(e) + "\n")
        return time.perf_counter() - t

    def log_file():
        log = fresh_log("file")
        t = time.perf_counter()
        r = log.ingest_jsonl(src, "alice")
        dt = time.perf_counter() - t
        log.close()
        assert r.added == len(events) and not r.quarantined
        return dt

    def plain_file():
        out = work / "plain-file.jsonl"
        t = time.perf_counter()
        with open(src) as f, open(out, "w") as g:
            for line in f:
                g.write(json.dumps(json.loads(line)) + "\n")
        return time.perf_counter() - t

    def log_single():
        log = fresh_log("single")
        t = time.perf_counter()
        for e in one_by_one:
            log.append([e])
        dt = time.perf_counter() - t
        log.close()
        return dt

    def plain_single():
        out = work / "plain-single.jsonl"
        t = time.perf_counter()
        with open(out, "w") as f:
            for e in one_by_one:
                f.write(json.dumps(e) + "\n")
                f.flush()
        return time.perf_counter() - t

    pairs = {"append": (log_append, plain_append, len(events)), "file": (log_file, plain_file, len(events)),
             "one_by_one": (log_single, plain_single, len(one_by_one))}
    out = {}
    for name, (log_fn, plain_fn, count) in pairs.items():
        log_fn(), plain_fn()   # warm-up (imports, page cache)
        log_t, plain_t = [], []
        for r in range(repeats):   # in turns, the first one alternating: a busy machine slows both alike
            first, second = (log_fn, plain_fn) if r % 2 == 0 else (plain_fn, log_fn)
            a, b = first(), second()
            log_t.append(a if first is log_fn else b)
            plain_t.append(b if first is log_fn else a)
        ratios = [p / lg for lg, p in zip(log_t, plain_t)]   # events/s of the log over events/s of plain
        lg, pl = count / statistics.median(log_t), count / statistics.median(plain_t)
        out[name] = {"events": count, "log_events_per_s": round(lg), "plain_jsonl_events_per_s": round(pl),
                     "ratio_log_over_plain_median_of_pairs": round(statistics.median(ratios), 3),
                     "ratio_pairs": [round(x, 3) for x in ratios],
                     "log_seconds": log_t, "plain_seconds": plain_t}
        print(f"  ingest {name:<10} log {lg:>9,.0f} ev/s   plain JSONL {pl:>9,.0f} ev/s   "
              f"ratio (median of {repeats} pairs) {statistics.median(ratios):.2f}", flush=True)
    return out


# ----------------------------------------------------------------------------- (b) consolidation

def bench_consolidation(work: Path, model: str, users: int, per_user: int) -> dict:
    from cogcore.memory.consolidate import ConsolidateConfig, _tokenizer, consolidate_all
    from cogcore.memory.log import ExperienceLog
    rng = random.Random(2)
    events = [e for u in range(users) for e in user_events(f"user{u:03d}", per_user, rng)]
    log = ExperienceLog.open(f"sqlite:///{work}/consolidate.sqlite")
    log.append(events)
    t = time.perf_counter()
    _tokenizer(model)
    tok_s = time.perf_counter() - t
    cfg = ConsolidateConfig(model=model, out=str(work / "sets"), progress=False, max_perplexity=0.0)
    t = time.perf_counter()
    sets = consolidate_all(log, cfg)
    dt = time.perf_counter() - t
    rows = sum(s.n_train for s in sets)
    r = {"users": len(sets), "events": len(events), "model_score": "off (max_perplexity=0)", "tokenizer": model,
         "tokenizer_load_s": round(tok_s, 2), "seconds": round(dt, 2), "events_per_s": round(len(events) / dt),
         "seconds_per_user": round(dt / len(sets), 3), "train_rows": rows,
         "heldout": sum(s.n_heldout for s in sets), "junk_dropped": sum(s.report["junk"]["dropped"] for s in sets),
         "near_duplicates": sum(s.report["duplicates"]["near"] for s in sets),
         "lessons_per_user": statistics.median(len(s.report["lessons"]) for s in sets)}
    print(f"  consolidate {len(events)} events of {len(sets)} users: {dt:.1f}s ({len(events) / dt:,.0f} events/s; "
          f"model score off; tokenizer load {tok_s:.1f}s not included)", flush=True)
    log.close()
    return r


# ----------------------------------------------------------------------------- (c) junk gate

# The labelled sets the rules were written against and the classifier learns from live in
# cogcore/memory/junk_examples.py (GOOD_TEMPLATES, RULE_DEV_JUNK, DEV2_JUNK, DEV3_JUNK).

# Held-out sets, third version: written (and committed) before the junk classifier existed; the
# classifier never trains on them and no rule or setting was changed after seeing its score on them.
# New kinds of junk (social filler, ads, scams, self-promotion, bot output, test strings, stutter, mash,
# off-topic opinions) and good exchanges from domains no other set has (IT helpdesk, banking, health,
# gardening, cars, SQL, git, tool calls, e-mail drafting), including good ones that talk about junk.
HELDOUT3_JUNK = [
    "lmaooo I can't", "sending good vibes to everyone reading this", "omw", "brb gotta feed the cat",
    "what a time to be alive", "not me reading this at 3am", "we been knew", "the way I screamed", "I felt that",
    "Exclusive deal: 70% off all sneakers this weekend only", "Try our new energy drink, now with zero sugar!",
    "Get 3 months of premium for free with code SAVE3", "Lose 10 pounds in 10 days with this detox tea",
    "Shop the summer collection at our online store today",
    "Your Netflix account is suspended, update your payment details now",
    "Congrats {name}! Your number was picked in our lottery", "Urgent: your tax refund is pending, confirm your bank info",
    "I am a prince and I need your help moving $4.5M", "Investment opportunity: 30% monthly returns guaranteed",
    "New video is up on my channel, go watch it", "Join my Discord server for daily giveaways",
    "Use my referral link to get a bonus", "This message was automatically generated, do not reply",
    "Error 500: internal server error", "undefined", "null", "[object Object]", "{{{{response}}}}", "Message deleted",
    "This content is unavailable", "asdf", "testing 1 2 3 testing", "foo bar baz", "placeholder text goes here",
    "I mean I mean I mean", "so so so so good", "yes. yes. yes. yes.", "blah blah blah", "hmmmmmm", "?!?!",
    "hjkhjkhjk", "qweqweqwe", "I hate Mondays so much ugh", "can't even right now", "pineapple on pizza is a crime",
    "cats are better than dogs, change my mind",
]
GOOD_HELDOUT_TEMPLATES = [
    ("My laptop won't connect to the office VPN since this morning.",
     "Sign out of the VPN client and back in with badge number {n}; if it still fails I will reset your token."),
    ("What is the fee for an international transfer of {amt} euros?",
     "Transfers abroad cost 0.5% with a minimum of 2 euros; the app shows the exact fee before you confirm."),
    ("Can I move my dentist appointment from {date} to next week?", "reschedule(appointment={n}, week='next')"),
    ("My tomato leaves are turning yellow at the bottom.",
     "That is often too much water; let the top 3 cm of soil dry out before watering again."),
    ("The check-engine light came on right after I filled up.",
     "A loose fuel cap often does that; tighten it until it clicks and the light should go off after a few drives."),
    ("How do I count orders per customer in SQL?", "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id;"),
    ("I committed to the wrong branch, how do I move the commit?",
     "Switch to the right branch, run git cherry-pick 3f2a91c, then go back and git reset --hard HEAD~1."),
    ("That worked, thanks a lot.", "Great, I will close ticket {n} then."),
    ("Cancel my 7am alarm tomorrow.", "alarms.delete(time='07:00', day='tomorrow')"),
    ("What's the weather in {city} this weekend?", "get_forecast(city='{city}', days=['Sat', 'Sun'])"),
    ("Write a short note telling the team the standup moves to 10:30.",
     "Hi all, from Monday the standup starts at 10:30 instead of 10:00. Same room, same link."),
    ("Is 91 a prime number?", "No: 91 = 7 x 13."),
    ("How many rest days should I take when I start running?",
     "Run every other day for the first month so your joints can adapt, then add a fourth day."),
    ("Summarise this complaint in one sentence.",
     "The customer was charged twice for order {n} and wants one of the charges refunded."),
    ("How do I unsubscribe from your marketing emails?", "unsubscribe(email='{email}', lists=['marketing'])"),
    ("I got an email saying I won a prize and must pay a fee. Is it a scam?",
     "Yes, that is phishing: we never ask for fees or card details by email. Delete it and do not click the link."),
]

# Held-out sets, fourth version: written (and committed) after the classifier's first run on the third
# version and before its misses were read; for the final figures of any classifier changed after that run.
HELDOUT4_JUNK = [
    "yall are not ready for this", "living my best life rn", "mood", "this >>>", "iykyk", "ate and left no crumbs",
    "nobody: me at 2am:", "Free shipping on orders over $50, today only!", "Our biggest sale of the year starts NOW",
    "Get paid to take surveys from your phone", "Meet hot moms near you", "Claim your $1000 gift voucher today",
    "Dear customer, your parcel is held at customs, pay the fee here", "Your PayPal has been limited, log in to restore",
    "Hello, I have a business proposal for you, reply for details", "Crypto presale live, 100x guaranteed",
    "Check my latest reel, link in comments", "Vote for me in the contest please!!", "Giveaway time, repost to enter",
    "Automatic reply: I am out of the office until Monday", "Traceback (most recent call last):", "NaN", "None",
    "<br><br><br>", "%s %s %s", "lorem lorem lorem", "aaaaaaaaaa", "lkjlkjlkj", "testing testing", "xyz",
    "ok so so so so anyway", "wait wait wait wait", "no no no no no no", "omg omg omg", "ugh whatever",
    "Mondays am I right", "tea is better than coffee and I will die on this hill", "first comment!",
    "Who's watching in 2026?", "This video changed my life",
]
GOOD_HELDOUT2_TEMPLATES = [
    ("Does my renter's insurance cover a burst pipe?",
     "Most policies cover sudden water damage to your belongings, not the pipe itself; check section 4 of policy {n}."),
    ("When is the deadline to register my son for the autumn term?",
     "Registration for the autumn term closes on {date}; the form is on the school portal under Enrolment."),
    ("My dog keeps scratching his ears and shaking his head.",
     "That often means an ear infection; book a vet visit and don't put anything in the ear until then."),
    ("The bathroom tap drips even when it is fully closed.",
     "The washer is probably worn; shut the water off under the sink, unscrew the handle and replace the washer."),
    ("Why are my night photos so blurry?",
     "The shutter stays open longer in the dark; use a tripod or raise the ISO so the shutter speed gets shorter."),
    ("hey quick q: how do I drop rows with missing values in pandas?", "df = df.dropna()  # or df.dropna(subset=['price'])"),
    ("How do I find which process is using port 8080 on Linux?", "Run: sudo lsof -i :8080"),
    ("In a spreadsheet, how do I add up column B only where column A says 'paid'?", "=SUMIF(A:A, \"paid\", B:B)"),
    ("What's the difference between 'ser' and 'estar' in Spanish?",
     "Ser is for lasting traits and identity, estar for states and locations: soy alto, estoy cansado."),
    ("My payslip for {date} shows no overtime.", "get_timesheet(employee={n}, month='{date}')"),
    ("Can the landlord raise the rent in the middle of the lease?",
     "Usually not: the amount is fixed until the lease ends unless the contract has a clause that allows it."),
    ("Plan a birthday party for ten kids on a small budget.",
     "Home party, two hours: a treasure hunt, pizza you bake together, and a cake; about {amt} euros in total."),
    ("How many moles are in 18 grams of water?", "Water is 18 g/mol, so 18 g is 1 mole."),
    ("Set a reminder to call the plumber at 5.", "reminders.create(text='Call the plumber', time='17:00')"),
    ("Translate 'where is the train station' into German.", "Wo ist der Bahnhof?"),
    ("ok thanks, and can you also send me the invoice for order {n}?", "send_invoice(order={n}, to='{email}')"),
]


# Held-out good set, third version: written (and committed) after the second classifier run on v2 / v4
# showed its misses (a spreadsheet formula, a shell command, a German sentence) and before any change
# made for them; the figures of a classifier changed after that run are measured on this one.
GOOD_HELDOUT3_TEMPLATES = [
    ("How do I undo the last commit but keep the changes?", "git reset --soft HEAD~1"),
    ("Regex for a 5-digit zip code?", "^\\d{{5}}$"),
    ("Excel: how do I get the last 4 characters of A2?", "=RIGHT(A2, 4)"),
    ("How do you say 'thank you very much' in Japanese?", "Arigatou gozaimasu."),
    ("Comment dit-on 'good night' en français ?", "Bonne nuit."),
    ("Show the disk usage of this folder.", "du -sh ."),
    ("What's the derivative of sin(x)?", "cos(x)"),
    ("Give me the CSS to center a div.", "display: flex; justify-content: center; align-items: center;"),
    ("Convert 1010 from binary to decimal.", "1010 in binary is 10."),
    ("My flight {n} got cancelled, what now?", "rebook(flight={n}, option='next_available')"),
    ("Who do I contact about a wrong charge on my phone bill?",
     "Call billing at the number on your invoice, or open Billing > Dispute in the app."),
    ("Can I freeze cooked rice?", "Yes: cool it quickly, freeze it flat in a bag and use it within a month."),
    ("Is it safe to run a race with a cold?",
     "If the symptoms are above the neck an easy run may be fine; with a fever or a chest cold, skip it."),
    ("How do I stop my bike chain squeaking?", "Wipe it clean, put a drop of chain oil on each link, wipe off the extra."),
    ("ls says permission denied for /var/log/app.", "sudo ls /var/log/app  # or add your user to the adm group"),
    ("What's 2^10?", "1024"),
]


# Held-out sets, fifth version (junk) and fourth (good): written (and committed) after the third
# classifier run, before the classifier read a request together with its action; for that classifier.
HELDOUT5_JUNK = [
    "sksksksk", "and I oop", "bruh moment", "it's giving", "main character energy", "no thoughts head empty",
    "slay queen", "touch grass", "big mood tbh", "periodt", "Limited offer: buy 2 get 1 free on all candles",
    "Download our app and get 20% off your first order", "Best VPN deal of the year, 80% off today",
    "Earn cashback on every purchase with our new card", "You have 1 unread message from a secret admirer",
    "Your account will be deleted in 24h unless you verify here", "We detected a virus on your phone, tap to clean",
    "Send me your seed phrase and I will double your coins", "Support my fundraiser, every dollar counts!!",
    "Follow my second account for more memes", "Like if you agree, share if you don't",
    "This is an automated message, replies are not monitored", "404 not found", "TypeError: cannot read property",
    "undefined undefined", "[image]", "<<EMPTY>>", "lorem", "sample text", "qazwsxedc", "mnmnmnmn", "1234567890",
    "yeah yeah yeah yeah", "same same same", "ha", "meh", "whatever lol", "coffee first, questions later",
    "pizza is just a round sandwich, prove me wrong", "anyone else think the moon landing was staged?",
]
GOOD_HELDOUT4_TEMPLATES = [
    ("What does the -r flag do in cp?", "It copies directories recursively, with everything inside them."),
    ("Regex for an email-like string?", "^[^@\\s]+@[^@\\s]+\\.[a-z]+$"),
    ("Google Sheets: how do I count rows where B is over 100?", "=COUNTIF(B:B, \">100\")"),
    ("How do you say 'excuse me' in Dutch?", "Pardon."),
    ("¿Cómo se dice 'library' en español?", "Biblioteca."),
    ("Check how much free memory the machine has.", "free -h"),
    ("What's 12 times 12?", "144"),
    ("Python one-liner to flatten a list of lists?", "[x for sub in lists for x in sub]"),
    ("Cancel my table for tonight at {time}.", "cancel_booking(time='{time}', date='today')"),
    ("My washing machine won't drain.", "Clean the filter behind the small door at the bottom front; it is often blocked."),
    ("How long do boiled eggs keep in the fridge?", "About a week, in their shells."),
    ("Can I pay my invoice {n} in two parts?", "Yes: pay half now and half by {date}; I've set that up."),
    ("What's the capital letter shortcut on a phone?", "Double-tap the shift key for caps lock."),
    ("Where can I see my past orders?", "Account > Orders lists everything from the last two years."),
    ("Is it ok to water succulents every day?", "No, once every one to two weeks is enough; they rot if the soil stays wet."),
    ("Please add milk and eggs to my shopping list.", "shopping_list.add(['milk', 'eggs'])"),
]


# Held-out sets, sixth version (junk) and fifth (good): written (and committed) in session 11, before
# the rules were made to need the classifier's agreement (``junk_rule_confirm``) and before any run on
# them. New kinds of junk (more slang, dating / diet / customs-fee / gift-card scams, referral links,
# crash output, unrendered templates, off-topic chat) and good exchanges from domains no other set has
# (chemistry, music, pets, networking, chess, photography, accounting, language), many of them terse.
HELDOUT6_JUNK = [
    "ngl this slaps", "fr fr no cap", "deadass", "ratio", "L take", "mid", "who asked", "cope harder",
    "Hot singles in your area want to meet you", "Lose 10 pounds in 10 days with this one weird trick",
    "Act now! Only 3 left in stock", "Use code SAVE15 at checkout for 15% off everything",
    "Get Premium Plus free for 30 days, cancel anytime*",
    "Your parcel is waiting: pay the $1.99 customs fee at this link",
    "This is the tax office, pay your overdue balance with gift cards today",
    "Hi mum, I lost my phone, can you send money to this new account?",
    "Your streaming payment failed, update your card here to keep watching",
    "Check out my podcast, new episode every Tuesday", "Smash that bell icon so you never miss an upload",
    "Use my referral link for a free month", "NullPointerException at line 42", "Segmentation fault (core dumped)",
    "null", "NaN", "[object Object]", "{{user_name}}", "TODO: write response", "ERROR 500 Internal Server Error",
    "idk man, vibes", "anyway how's your day going", "did you see the game last night",
    "cats are better than dogs, fight me", "i'm so bored rn", "hmm", "k", "zzz", "buy buy buy buy",
    "no no no no no", "test test 1 2 3", "asdfjkl;",
]
GOOD_HELDOUT5_TEMPLATES = [
    ("What's the chemical symbol for sodium?", "Na"),
    ("Convert 5 km to miles.", "About 3.1 miles."),
    ("Which chord is C-E-G?", "C major."),
    ("My dog ate a grape, should I worry?", "Yes, grapes can be toxic to dogs; call your vet now, even if he seems fine."),
    ("What does HTTP 404 mean?", "The server could not find the page you asked for."),
    ("Show the routing table on Linux.", "ip route"),
    ("How do I undo my last git commit but keep the changes?", "git reset --soft HEAD~1"),
    ("Best reply to 1. e4 e5 2. Nf3?", "2... Nc6 is the most common: it defends the pawn on e5."),
    ("Is 'irregardless' a word?", "It is in dictionaries, but 'regardless' is the standard form."),
    ("What's the square root of 169?", "13"),
    ("What aperture gives more background blur?", "A wider one, such as f/1.8 rather than f/8."),
    ("Pretty-print a JSON file in the terminal.", "python -m json.tool data.json"),
    ("Which is bigger, 3/8 or 2/5?", "2/5 (0.4 is more than 0.375)."),
    ("Book a table for {n} at 7pm on Friday.", "book_table(party_size={n}, time='19:00', day='friday')"),
    ("Capital of Australia?", "Canberra."),
    ("Which depreciation method spreads the cost evenly over the years?", "Straight-line depreciation."),
    ("How often should I feed a goldfish?", "Once or twice a day, only what it eats in about two minutes."),
    ("Translate 'thank you' to Japanese.", "Arigatou."),
    ("Quick: what's 15% of 80?", "12"),
    ("Do I need a lawyer to write a will?",
     "Not always: a simple will you can write yourself, but with property abroad or a business a lawyer helps."),
]


def bench_junk(n_good: int, n_junk: int, model_score: bool, model: str, model_score_episodes: int = 100,
               classifier: bool = False, classifier_episodes: int = 250, classifier_sets: list[str] | None = None) -> dict:
    from cogcore.memory.junk import judge_episode
    from cogcore.memory.junk_examples import (
        DEV2_JUNK,
        DEV3_JUNK,
        GOOD_TEMPLATES,
        RULE_DEV_JUNK,
        docstring_sentences,
        fill,
        vary_junk,
    )
    rng = random.Random(3)
    dev_junk = [t for texts in RULE_DEV_JUNK.values() for t in texts]
    contexts = [fill(c, rng) for c, _ in GOOD_TEMPLATES]
    docs = docstring_sentences("test")
    rng.shuffle(docs)
    sets: dict[str, list[list[str]]] = {
        "good_templates": [[fill(c, rng), fill(a, rng)] for c, a in (rng.choice(GOOD_TEMPLATES) for _ in range(n_good))],
        "good_docstrings": [["Explain what this part of the Python documentation says.", s] for s in docs[:n_good]],
        "good_heldout_v1": [[fill(c, rng), fill(a, rng)]
                            for c, a in (rng.choice(GOOD_HELDOUT_TEMPLATES) for _ in range(n_good))],
        "good_heldout_v2": [[fill(c, rng), fill(a, rng)]
                            for c, a in (rng.choice(GOOD_HELDOUT2_TEMPLATES) for _ in range(n_good))],
        "good_heldout_v3": [[fill(c, rng), fill(a, rng)]
                            for c, a in (rng.choice(GOOD_HELDOUT3_TEMPLATES) for _ in range(n_good))],
        "good_heldout_v4": [[fill(c, rng), fill(a, rng)]
                            for c, a in (rng.choice(GOOD_HELDOUT4_TEMPLATES) for _ in range(n_good))],
        "junk_dev": [[rng.choice(contexts), vary_junk(rng.choice(dev_junk), rng, slots=False)] for _ in range(n_junk)],
        "junk_dev2": [[rng.choice(contexts), vary_junk(rng.choice(DEV2_JUNK), rng)] for _ in range(n_junk)],
        "junk_dev3": [[rng.choice(contexts), vary_junk(rng.choice(DEV3_JUNK), rng)] for _ in range(n_junk)],
        # held-out junk as the agent's action, and (one in three) as the user's whole request
        "junk_heldout_v3": [([rng.choice(contexts), j] if i % 3 else [j, "Could you tell me more about what you need?"])
                            for i, j in enumerate(vary_junk(rng.choice(HELDOUT3_JUNK), rng) for _ in range(n_junk))],
        "junk_heldout_v4": [([rng.choice(contexts), j] if i % 3 else [j, "Could you tell me more about what you need?"])
                            for i, j in enumerate(vary_junk(rng.choice(HELDOUT4_JUNK), rng) for _ in range(n_junk))],
        "junk_heldout_v5": [([rng.choice(contexts), j] if i % 3 else [j, "Could you tell me more about what you need?"])
                            for i, j in enumerate(vary_junk(rng.choice(HELDOUT5_JUNK), rng) for _ in range(n_junk))],
        "junk_heldout_v6": [([rng.choice(contexts), j] if i % 3 else [j, "Could you tell me more about what you need?"])
                            for i, j in enumerate(vary_junk(rng.choice(HELDOUT6_JUNK), rng) for _ in range(n_junk))],
        # the sixth / fifth versions come last, so the sets above are drawn as in earlier runs
        "good_heldout_v5": [[fill(c, rng), fill(a, rng)]
                            for c, a in (rng.choice(GOOD_HELDOUT5_TEMPLATES) for _ in range(n_good))],
    }
    result: dict = {"sets": {k: len(v) for k, v in sets.items()}, "heuristics": {}}
    verdicts = {k: [judge_episode(ep) for ep in eps] for k, eps in sets.items()}
    for name, eps in sets.items():
        flagged = [v for v in verdicts[name] if v]
        by_rule: dict[str, int] = {}
        for rule, _ in flagged:
            by_rule[rule] = by_rule.get(rule, 0) + 1
        is_junk = name.startswith("junk")
        misses = [_junk_text(ep) for ep, v in zip(eps, verdicts[name]) if bool(v) != is_junk]
        share = len(flagged) / len(eps)
        result["heuristics"][name] = {
            "removed" if is_junk else "kept": round(share if is_junk else 1 - share, 4), "by_rule": by_rule,
            "missed_examples" if is_junk else "wrongly_dropped_examples": sorted(set(misses))[:12]}
    # the headline: held-out junk against the good sets nothing was fitted on (dev junk only shows the
    # rules do what they were written for)
    junk = verdicts["junk_heldout_v6"]
    good = verdicts["good_docstrings"] + verdicts["good_heldout_v5"]
    tp, fp = sum(bool(v) for v in junk), sum(bool(v) for v in good)
    result["heuristics"]["headline"] = {"heldout_junk_removed": round(tp / len(junk), 4),
                                        "heldout_good_kept": round(1 - fp / len(good), 4),
                                        "precision_on_heldout_mix": round(tp / max(1, tp + fp), 4)}
    h = result["heuristics"]
    for name in sets:
        key = "removed" if name.startswith("junk") else "kept"
        print(f"  junk gate  {name:<16} {key} {h[name][key]:.3f}", flush=True)

    if classifier:
        result["with_classifier"] = _classifier_score(sets, verdicts, model, classifier_episodes, classifier_sets)
    if model_score:
        result["with_model_score"] = _model_score(sets, verdicts, model, model_score_episodes, rng)
    return result


def _junk_text(ep: list[str]) -> str:
    """The planted text of an episode: the action, or the request when the junk is the request."""
    return ep[1] if ep[1] != "Could you tell me more about what you need?" else ep[0]


def _classifier_score(sets, verdicts, model: str, per_set: int, only: list[str] | None = None) -> dict:
    """The junk classifier as consolidation runs it (``junk_classifier=true``): trained from scratch on
    cogcore/memory/junk_examples.py (timed), then an episode is dropped when its request (on its own)
    or its action (as the reply to the request) scores above the threshold; on the first ``per_set``
    episodes of each set."""
    from cogcore.memory.consolidate import ConsolidateConfig
    from cogcore.memory.junk_classifier import JunkClassifier
    from cogcore.memory.junk_examples import training_examples
    from cogcore.train.model import load_model, load_tokenizer
    if only:
        sets = {k: v for k, v in sets.items() if k in only}
    confirm = ConsolidateConfig.junk_rule_confirm   # the default consolidation runs with
    tok, core = load_tokenizer(model), load_model(model).eval()
    requests, texts, labels = map(list, zip(*training_examples(0)))
    t = time.perf_counter()
    clf = JunkClassifier.train(core, tok, texts, labels, requests, progress=True)
    train_s = time.perf_counter() - t
    # as consolidation reads an episode: the request on its own, the action as the reply to it
    unique = sorted({(None, ep[0]) for eps in sets.values() for ep in eps[:per_set]}
                    | {(ep[0], ep[1]) for eps in sets.values() for ep in eps[:per_set]}, key=str)
    t = time.perf_counter()
    scores = clf.probabilities(core, tok, [x for _, x in unique], [r for r, _ in unique], progress="junk classifier: scoring")
    prob = dict(zip(unique, scores))
    score_s = time.perf_counter() - t
    out = {"model": model, "threshold": clf.threshold, "trained_on": {"junk": clf.info["n_junk"], "good": clf.info["n_good"]},
           "train_accuracy": clf.info["train_accuracy"], "train_seconds": round(train_s, 1),
           "scoring_seconds": round(score_s, 1), "texts_scored": len(unique),
           "texts_per_s": round(len(unique) / score_s, 1), "episodes_per_set": per_set,
           "in_training": "good_templates' templates, the train half of the docstring sentences (good_docstrings "
                          "is the test half), junk_dev, junk_dev2, junk_dev3; never good_heldout_*, junk_heldout_*",
           "junk_rule_confirm": confirm,
           "headline_sets": "junk_heldout_v6 against good_docstrings + good_heldout_v5, the freshest sets: v1 (good) "
                            "and v3 (junk) were read after the first run, v2 (good) and v4 (junk) after the second, "
                            "v3 (good) after the third, v4 (good) and v5 (junk) after the fourth, and the classifier "
                            "was changed after each; v5 (good) / v6 (junk) were written before the rules were made "
                            "to need the classifier's agreement (junk_rule_confirm)"}
    both: dict[str, list[bool]] = {}     # rules and classifier, each dropping on its own (junk_rule_confirm=0)
    alone: dict[str, list[bool]] = {}    # ... with junk_rules=[classifier]: the classifier alone
    confirmed: dict[str, list[bool]] = {}   # the default with the classifier on: a rule needs P(junk) >= confirm
    for name, eps in sets.items():
        eps, heur = eps[:per_set], [bool(v) for v in verdicts[name][:per_set]]
        worst = [max(prob[(None, ep[0])], prob[(ep[0], ep[1])]) for ep in eps]
        clf_says = [p > clf.threshold for p in worst]
        both[name] = [h or c for h, c in zip(heur, clf_says)]
        alone[name] = clf_says
        confirmed[name] = [c or (h and p >= confirm) for h, c, p in zip(heur, clf_says, worst)]
        is_junk = name.startswith("junk")
        key = "removed" if is_junk else "kept"
        share = functools.partial(_share, key=key)
        wrong = [_junk_text(ep) if is_junk else ep[1] for ep, d in zip(eps, both[name]) if d != is_junk]
        out[name] = {key: share(both[name]), f"heuristics_alone_{key}": share(heur),
                     f"classifier_alone_{key}": share(clf_says), f"rules_confirmed_{key}": share(confirmed[name]),
                     "evaluated_on": len(eps),
                     "dropped_by_classifier_only": sum(c and not h for h, c in zip(heur, clf_says)),
                     "missed_examples" if is_junk else "wrongly_dropped_examples": sorted(set(wrong))[:12]}
        print(f"  + junk classifier ({model})  {name:<16} {key}: heuristics {out[name][f'heuristics_alone_{key}']:.3f}, "
              f"classifier {out[name][f'classifier_alone_{key}']:.3f}, both {out[name][key]:.3f}, "
              f"rules confirmed {out[name][f'rules_confirmed_{key}']:.3f}", flush=True)
    for label, dropped in (("headline", both), ("headline_classifier_alone", alone),
                           ("headline_rules_confirmed", confirmed)):
        if not {"junk_heldout_v6", "good_docstrings", "good_heldout_v5"} <= set(dropped):
            continue
        junk, good = dropped["junk_heldout_v6"], dropped["good_docstrings"] + dropped["good_heldout_v5"]
        tp, fp = sum(junk), sum(good)
        out[label] = {"heldout_junk_removed": round(tp / len(junk), 4), "heldout_good_kept": round(1 - fp / len(good), 4),
                      "new_domains_good_kept": _share(dropped["good_heldout_v5"], "kept"),
                      "precision_on_heldout_mix": round(tp / max(1, tp + fp), 4)}
        print(f"  {label}: held-out junk removed {out[label]['heldout_junk_removed']:.3f}, held-out good kept "
              f"{out[label]['heldout_good_kept']:.3f}", flush=True)
    return out


def _share(dropped: list[bool], key: str) -> float:
    """The share removed (a junk set) or kept (a good set), given which episodes were dropped."""
    frac = sum(dropped) / len(dropped)
    return round(frac if key == "removed" else 1 - frac, 4)


def _model_score(sets, verdicts, model: str, per_set: int, rng: random.Random) -> dict:
    """The two model scores as consolidation runs them, on ``per_set`` episodes of each set:
    perplexity (request on its own, action as the reply to it) and relevance (how much the request
    makes the action likelier). Each threshold is calibrated on a random half of the good episodes
    (the 99th percentile of perplexity, the 1st of relevance) and evaluated on the other half and on
    all junk."""
    from cogcore.memory.junk import PerplexityScorer, episode_perplexity, episode_relevance
    t = time.perf_counter()
    scorer = PerplexityScorer.load(model, batch_size=16)
    picked = {name: rng.sample(range(len(eps)), min(per_set, len(eps))) for name, eps in sets.items()}
    ppl = {name: [p for p, _ in episode_perplexity(scorer, [sets[name][i] for i in idx])] for name, idx in picked.items()}
    seconds_ppl = time.perf_counter() - t
    t = time.perf_counter()
    rel = {name: [r for r, _ in episode_relevance(scorer, [sets[name][i] for i in idx])] for name, idx in picked.items()}
    seconds_rel = time.perf_counter() - t
    calib, evaluate = {}, {}
    for name in ("good_templates", "good_docstrings"):
        order = list(range(len(picked[name])))
        rng.shuffle(order)
        calib[name], evaluate[name] = order[: len(order) // 2], order[len(order) // 2:]
    calib_ppl = sorted(ppl[n][j] for n in calib for j in calib[n])
    calib_rel = sorted(rel[n][j] for n in calib for j in calib[n])
    threshold = calib_ppl[int(0.99 * (len(calib_ppl) - 1))]
    min_relevance = calib_rel[int(0.01 * (len(calib_rel) - 1))]
    out = {"model": model, "threshold": round(threshold, 2), "min_relevance": round(min_relevance, 3),
           "scoring_seconds": round(seconds_ppl, 1), "relevance_seconds": round(seconds_rel, 1),
           "episodes_scored_per_set": per_set,
           "calibration": "perplexity: 99th percentile, relevance: 1st percentile, each on a random half of each "
                          "good set; the other half and all junk are evaluated"}
    for name in sets:
        positions = evaluate.get(name, range(len(picked[name])))
        heur = [bool(verdicts[name][picked[name][j]]) for j in positions]
        high = [ppl[name][j] > threshold for j in positions]
        low = [rel[name][j] < min_relevance for j in positions]
        key = "removed" if name.startswith("junk") else "kept"
        share = functools.partial(_share, key=key)
        out[name] = {key: share([h or m for h, m in zip(heur, high)]), f"heuristics_alone_{key}": share(heur),
                     "dropped_by_model_only": sum(m and not h for h, m in zip(heur, high)), "evaluated_on": len(heur),
                     "median_perplexity": round(statistics.median(ppl[name][j] for j in positions), 1),
                     f"with_relevance_{key}": share([h or r for h, r in zip(heur, low)]),
                     "dropped_by_relevance_only": sum(r and not h for h, r in zip(heur, low)),
                     f"all_three_{key}": share([h or m or r for h, m, r in zip(heur, high, low)]),
                     "median_relevance": round(statistics.median(rel[name][j] for j in positions), 3)}
        print(f"  + model scores ({model})  {name:<16} {key}: heuristics {out[name][f'heuristics_alone_{key}']:.3f}, "
              f"+ perplexity {out[name][key]:.3f}, + relevance {out[name][f'with_relevance_{key}']:.3f}, "
              f"all three {out[name][f'all_three_{key}']:.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="events per ingest repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--events-per-user", type=int, default=100)
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer for consolidation; model for --model-score")
    ap.add_argument("--good", type=int, default=500, help="good episodes per good set")
    ap.add_argument("--junk", type=int, default=500, help="junk episodes per junk set")
    ap.add_argument("--model-score", action="store_true", help="also run the model scores: perplexity and relevance "
                                                                "(slow on CPU)")
    ap.add_argument("--model-score-episodes", type=int, default=100, help="episodes per set scored by the model")
    ap.add_argument("--classifier", action="store_true", help="also train the junk classifier under --model and "
                                                               "score the sets with it (a few minutes on CPU)")
    ap.add_argument("--classifier-episodes", type=int, default=250, help="episodes per set scored by the classifier")
    ap.add_argument("--classifier-sets", nargs="+", help="score only these sets with the classifier (default: all)")
    ap.add_argument("--only", choices=["ingest", "consolidation", "junk"], action="append",
                    help="run only these parts (repeatable; default: all)")
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cogcore-bench-memory-"))
    result = {"what": "experience log ingest vs plain JSONL append; consolidation time; junk gate on a planted mix",
              "settings": vars(args), "machine": machine(), "notes": __doc__.split("\n\n")[1].strip()}
    parts = args.only or ["ingest", "consolidation", "junk"]
    if "ingest" in parts:
        print("== ingest", flush=True)
        result["ingest"] = bench_ingest(work, args.events, args.repeats)
    if "consolidation" in parts:
        print("== consolidation", flush=True)
        result["consolidation"] = bench_consolidation(work, args.model, args.users, args.events_per_user)
    if "junk" in parts:
        print("== junk gate", flush=True)
        result["junk_gate"] = bench_junk(args.good, args.junk, args.model_score, args.model, args.model_score_episodes,
                                         args.classifier, args.classifier_episodes, args.classifier_sets)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
