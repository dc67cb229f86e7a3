"""Labelled texts for the junk gate: junk seeds (each written many ways) and good exchanges.

They serve three purposes: the named rules of memory/junk.py were written against the junk here,
the junk classifier (memory/junk_classifier.py) learns from all of it, and bench/bench_memory.py
measures both. Where each set comes from:

  RULE_DEV_JUNK   the strings the named rules were written against, by rule
  DEV2_JUNK       a first held-out set for the rules, run once (0.67 removed), then used to improve them
  DEV3_JUNK       a second held-out set for the rules (never used to change a rule; the rules remove
                  0.59 of it); the classifier trains on it
  GOOD_TEMPLATES  support / coding / cooking / travel / tutoring exchanges, with slots
  GOOD_TEXTS      short good texts that look a little like junk (tool calls, "Yes, refunded.")
  GOOD_EXCHANGES_EXTRA  everyday exchanges of many kinds, for the classifier only
  stdlib docstrings, the "train" half (`docstring_sentences`): real prose nobody wrote for this

bench/bench_memory.py keeps a third junk set and a set of good exchanges from other domains that
nothing here has seen: the classifier's figures are measured on those.
"""

from __future__ import annotations

import hashlib
import random
import re

RULE_DEV_JUNK = {
    "too_short": ["lol ok", "+1", "👍", "ok", "k thx", "same"],
    "engagement_bait": ["Like and subscribe for more!", "Smash that like button and follow for more tips",
                        "You won't believe what happens next", "Link in bio, go check it out now",
                        "Tag a friend who needs to see this today", "This is amazing 🔥🔥🔥 everyone should try it"],
    "shouting": ["THIS IS THE BEST SERVICE EVER WOW", "Why is nobody answering me???", "Best day ever!!!!"],
    "repetitive": ["great great great", "yes yes yes I agree with that", "buy it buy it buy it buy it buy it",
                   "sooooo good honestly", "I love it I love it I love it so much", "I I don't know know",
                   "Buy cheap watches best price cheap watches discount watches cheap"],
    "templated": ["Click here to win a free iPhone today", "Congratulations, you have been selected as our winner",
                  "Dear {name}, your account needs attention", "As an AI language model, I cannot help with that",
                  "Earn $500 a day working from your couch", "Lorem ipsum dolor sit amet, consectetur",
                  "[Agent Name] will reply within [X] hours.", "Sent from my iPhone, please excuse typos",
                  "Hello dear, kindly send your details to claim the inheritance"],
    "low_information": ["ok sure thanks, that is fine", "yeah yeah cool cool whatever",
                        "#### $$$$ %%%% 1234 5678 !!", "asdfghjkl qwrtzp mnbvcxz", "I'm literally crying rn",
                        "hahahaha yes"],
}

GOOD_TEXTS = [
    "I want a refund for order 4411, it arrived broken.",
    "Could you tell me the last four digits of the card you paid with?",
    "Issue a refund for order 4411.",
    "Done! Your refund is on its way and should arrive in 3-5 business days.",
    "refund(order=4411, amount=29.99)",
    "lookup_order(4411)",
    "Please subscribe me to the weekly newsletter.",
    "Which plan are you on, and what is your account number?",
    "Your free trial ends on May 3; after that the plan costs $9 a month.",
    "The strengths of this approach are speed and simplicity.",
    "Order 1000000 shipped from warehouse B.",
    "See https://example.com/help/returns for the return policy.",
    "Yes, refunded.",
    "2 x 10 = 20.",                                   # numbers are information
    "10 x 32 = 320.",
    "See [the docs](https://example.com/docs) for the details.",
    "Use csv.reader on the open file and iterate row by row; each row is a list of strings.",
    "lol my order never arrived, can you check order 4411?",
]


GOOD_TEMPLATES = [
    ("I'd like to return the {product} I bought on {date}; it stopped working.",
     "I've started a return for order {n}; a prepaid label is on its way to {email}."),
    ("Where is my parcel? The tracking page has not changed since {date}.", "lookup_order({n})"),
    ("The {product} arrived with a cracked screen.", "refund(order={n}, amount={amt})"),
    ("Can I change the delivery date for order {n}?", "Yes, order {n} can now arrive on {date}; I updated it."),
    ("How do I read a CSV file in Python without loading it all into memory?",
     "Use csv.reader on the open file and iterate row by row; each row is a list of strings."),
    ("My script says KeyError: '{key}' when I parse the config.",
     "The config has no '{key}' entry; use cfg.get('{key}', default) or add the key to the file."),
    ("What can I use instead of buttermilk in pancakes?",
     "Stir one tablespoon of lemon juice into a cup of milk and let it sit for five minutes."),
    ("How long should I roast a {kg} kg chicken?", "At 200 °C, about {mins} minutes; check that the thigh reaches 75 °C."),
    ("Book a table for two at {time} on Friday near the station.",
     "search_restaurants(city='{city}', party=2, time='{time}')"),
    ("Find me a train from {city} to Paris tomorrow morning.",
     "The 08:{mm} train from {city} arrives in Paris at 11:{mm2}; shall I reserve a seat?"),
    ("Why is the derivative of x squared equal to 2x?",
     "Expand (x+h)^2 - x^2, divide by h and let h go to zero: you are left with 2x."),
    ("What is {a} times {b}?", "{a} x {b} = {c}."),
    ("Thanks, that fixed it!", "Glad it works now. Anything else I can help with?"),
    ("Is order {n} shipped yet?", "Yes, order {n} shipped today."),
    ("Please cancel my {product} order.", "Done! Order {n} is cancelled and you will not be charged."),
    ("Can you summarise the meeting notes?",
     "Three decisions: ship v2 on {date}, hire one more tester, and move the review to Thursdays."),
]
# More good exchanges for the classifier only (the rules were never tuned on them): everyday requests
# and replies of many kinds, short acknowledgements that still say something, casual spelling, tool
# calls and code. Written after the classifier's first held-out run, which dropped 30% of a good set
# from other domains (short replies like "Great, I will close ticket 1290 then." looked like chatter).
GOOD_EXCHANGES_EXTRA = [
    ("hey can u check where my order {n} is pls", "lookup_order({n})"),
    ("thx, that's all for today", "You're welcome, have a good evening!"),
    ("Sorry, wrong order number, it's {n}.", "No problem, I'm looking at order {n} now."),
    ("Can you resend the confirmation email?", "Sent again to {email}; check the spam folder if it is not there in 5 minutes."),
    ("I was charged twice for the same {product}.", "I see two charges of {amt}; I've reversed the second one."),
    ("Is the {product} available in black?", "Yes, the black one is in stock and ships tomorrow."),
    ("Great, go ahead.", "Done, I've placed the order."),
    ("Perfect, see you Thursday then.", "See you Thursday at {time}!"),
    ("Could you move my 3pm meeting to tomorrow?", "calendar.move(event='3pm meeting', to='tomorrow 15:00')"),
    ("Remind me what we decided about the budget.", "You agreed to keep the budget at {amt} and review it in June."),
    ("Draft a polite reply declining the invitation.",
     "Thank you for the kind invitation. Unfortunately I can't make it that day, but I hope it goes well."),
    ("Make this sentence shorter: we would like to inform you that the office will be closed.",
     "The office will be closed."),
    ("What does HTTP 404 mean?", "The server could not find the page you asked for."),
    ("My phone battery drains really fast since the update.",
     "Check Settings > Battery for the app using the most; restarting after an update often helps too."),
    ("How do I reverse a list in JavaScript?", "Use arr.reverse(), or [...arr].reverse() to keep the original."),
    ("Write a function that checks if a number is even.", "def is_even(n):\n    return n % 2 == 0"),
    ("Why does my loop never end?", "The counter is never increased inside the loop; add i += 1 at the end of the body."),
    ("What's a good beginner book about astronomy?",
     "Try a star atlas for beginners together with a small pair of binoculars; start with the Moon and Jupiter."),
    ("Why is the sky blue?", "Air scatters blue light more than red light, so blue reaches your eyes from every direction."),
    ("Who built the first steam locomotive?", "Richard Trevithick ran the first working steam locomotive in 1804."),
    ("How much water should I drink a day?", "About two litres for most adults, more when it is hot or you exercise."),
    ("Give me a 20 minute workout without equipment.",
     "Four rounds: 10 squats, 10 push-ups, 20 lunges, 30 seconds of plank, one minute rest."),
    ("What can I cook with rice, eggs and spinach?", "Fried rice: scramble the eggs, add the rice and spinach, season with soy sauce."),
    ("Is it cheaper to fly or take the train to {city}?",
     "The train costs about {amt} and takes longer; flights are cheaper only if you book weeks ahead."),
    ("How do I split a bill of {amt} between 3 people?", "Divide {amt} by 3 and round up to the next cent."),
    ("What is 15% of 80?", "15% of 80 is 12."),
    ("Convert 5 miles to kilometres.", "5 miles is about 8.05 km."),
    ("Recommend some calm music for studying.", "Try instrumental piano, lo-fi beats or classical guitar playlists."),
    ("My internet keeps dropping every few minutes.", "Restart the router, then check whether the drops stop on a cable."),
    ("Can I bring my own bag on the flight?", "Yes, one personal item under the seat, up to 40 x 30 x 15 cm."),
    ("I need to change the email on my account.", "update_account(user={n}, email='{email}')"),
    ("Please unsubscribe me from the newsletter.", "You are unsubscribed; you will get no more newsletters."),
    ("What's the status of ticket {n}?", "Ticket {n} is with the billing team; they reply within two working days."),
    ("ok, and when will the refund arrive?", "Within 3 to 5 business days on the card you paid with."),
    ("No, that's not what I meant.", "Sorry about that. Could you tell me which order you mean?"),
    ("I'm not sure, what do you suggest?", "I'd start with the smaller plan; you can upgrade any time."),
    ("Summarise the article in two sentences.",
     "The city will add 40 km of bike lanes by 2027. Funding comes from the parking budget."),
    ("Fix the typo: 'recieve the pakage'", "receive the package"),
    ("Explain recursion to a ten year old.",
     "It is like Russian dolls: to open the big doll you open a smaller one inside, until the smallest."),
    ("Yes, the second option please.", "Booked the second option: {date} at {time}."),
    # code, commands, formulas, bare answers and other languages: terse, symbol-heavy or non-English
    # outputs that are still exactly right (added after the second held-out run missed such texts)
    ("How do I list hidden files?", "ls -a"),
    ("Find all .log files under this folder.", "find . -name '*.log'"),
    ("How do I create a virtual environment?", "python -m venv .venv && source .venv/bin/activate"),
    ("Count the lines in data.csv.", "wc -l data.csv"),
    ("Show my current git branch.", "git branch --show-current"),
    ("Kill the process with id {n}.", "kill {n}"),
    ("In a spreadsheet, average of C2 to C20?", "=AVERAGE(C2:C20)"),
    ("How do I count the cells in column D that are not empty?", "=COUNTA(D:D)"),
    ("Join first and last name from A1 and B1.", '=A1 & " " & B1'),
    ("Python: sort a list of dicts by 'age'.", "people.sort(key=lambda p: p['age'])"),
    ("SQL to delete rows older than 30 days?", "DELETE FROM events WHERE ts < NOW() - INTERVAL '30 days';"),
    ("JSON for a user with a name and an id?", '{{"id": {n}, "name": "Ana"}}'),
    ("What is the integral of 2x?", "x^2 + C"),
    ("Solve 3x + 5 = 20.", "x = 5"),
    ("What's 7 squared?", "49"),
    ("sqrt(144)?", "12"),
    ("How do you say 'good morning' in Spanish?", "Buenos días."),
    ("Translate 'thank you' into Italian.", "Grazie."),
    ("Wie spät ist es in {city}?", "get_time(city='{city}')"),
    ("Traduis 'see you tomorrow' en français.", "À demain !"),
    ("How do you write 'hello' in Portuguese?", "Olá."),
    ("What's the chemical formula of table salt?", "NaCl"),
    ("Hex color for pure red?", "#FF0000"),
    ("Keyboard shortcut to undo on a Mac?", "Cmd + Z"),
]

PRODUCTS = ["kettle", "laptop stand", "rain jacket", "coffee grinder", "desk lamp", "phone case", "router", "blender"]
CITIES = ["Lyon", "Brussels", "Geneva", "Lille", "Cologne", "Basel"]

DEV2_JUNK = [
    "first", "frist!", "bump", "bumping this", "^^^ this", "who else is here in {year}?", "{name} did it again",
    "nice post! visit my profile for more", "Earn passive income with crypto, DM for details",
    "follow back? f4f", "I'm literally crying rn", "this. just this.", "ratio + L + you fell off",
    "POV: you just realized it's Monday", "no because why is this so true", "hahahaha yes", "...", "??", "k",
    "Hot singles in your area are waiting for you", "Get rich quick: the one trick banks don't want you to know",
    "Subscribe to my newsletter for exclusive drops", "I I I don't know know", "The the the the best best product",
    "Buy cheap watches online best price cheap watches discount watches cheap", "Hello dear, I am Mrs. {name} from "
    "the bank, kindly send your details to claim the inheritance", "Read more at example dot com slash deal",
    "qwertyuiop", "jfjfjfjfjf", "Great question! Great question! Great question!", "[Agent Name] will reply within "
    "[X] hours.", "u up?", "idk lol whatever works", "same tbh", "this is the way", "Sent from my iPhone",
    "Limited stock!! Grab yours before it's gone", "cool story bro", "Wow. Just wow.", "me when the {product} lol",
]
DEV3_JUNK = [
    "Hey guys, welcome back to my channel", "Respectfully, this ain't it chief", "can't stop won't stop", "🙏🙏",
    "👀", "ty ty", "gm", "gm fam", "wagmi, to the moon", "Send 0.1 ETH to this wallet and receive 1 ETH back",
    "Your package could not be delivered, confirm your address at parcel-redelivery.co",
    "Act fast, only 3 left in stock", "I make $8000 a month from home, ask me how",
    "this comment section is a mess", "who asked", "Based.", "real", "Top 10 reasons why you should care "
    "(number 7 will shock you)", "Ok ok ok ok", "nah nah nah that's crazy", "asdkjaslkdj", "zzzzzz", "mmhmm",
    ".......", "Hi {name}, we noticed unusual activity. Verify your account here", "Reply STOP to unsubscribe",
    "Best {product} best {product} best {product} deals", "Thank you thank you thank you so much",
    "Please please please answer", "Agent: Customer: Agent: Customer:", "<insert answer here>",
    "TODO: write response", "N/A", "test test 123", "The quick brown fox jumps over the lazy dog",
    "I am a bot, this action was performed automatically", "Watch till the end", "Rate this 1-10 in the comments",
    "Stream {name}'s new album NOW", "Unpopular opinion: {product}s are overrated, fight me",
]
EMOJI = ["🔥", "😂", "💯", "🚀", "😭", "👇", "🙌", "💀", "✨"]


def fill(t: str, rng: random.Random) -> str:
    """A template with its slots ({product}, {n}, {date}, ...) filled at random."""
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return t.format(product=rng.choice(PRODUCTS), date=f"{rng.randint(1, 28)} {rng.choice(['May', 'June', 'July'])}",
                    n=rng.randint(1000, 99999), email=f"{rng.choice(['ana', 'li', 'sam'])}@example.com",
                    amt=f"{rng.randint(5, 300)}.{rng.randint(0, 99):02d}", key=rng.choice(["port", "host", "token"]),
                    kg=rng.choice(["1.5", "2", "2.5"]), mins=rng.choice([70, 80, 90, 100]), time=f"{rng.randint(18, 21)}:00",
                    city=rng.choice(CITIES), mm=f"{rng.randint(0, 59):02d}", mm2=f"{rng.randint(0, 59):02d}",
                    a=a, b=b, c=a * b, year=rng.choice([2023, 2024, 2025]), name=rng.choice(["Jake", "Mia", "Obi"]))


def vary_junk(t: str, rng: random.Random, slots: bool = True) -> str:
    """Random casing, trailing emoji and punctuation: the same junk written a hundred ways (``slots``:
    fill the template's slots first; the rule-dev strings hold literal placeholders that are the junk)."""
    t = fill(t, rng) if slots else t
    r = rng.random()
    if r < 0.2:
        t = t.upper()
    elif r < 0.4:
        t = t.lower()
    if rng.random() < 0.4:
        t += " " + rng.choice(EMOJI) * rng.randint(1, 3)
    if rng.random() < 0.3:
        t += rng.choice(["!", "!!", "?", " :)", " lmao"])
    return t



def docstring_sentences(half: str | None = None) -> list[str]:
    """First sentences (5+ words, at most 300 characters) of Python standard-library docstrings.

    ``half``: "train" or "test" splits them by a hash of the sentence, so the classifier learns from
    one half and the benchmark measures on the other; None: all of them."""
    from ..train.data import _stdlib_docstrings
    out = []
    for doc in _stdlib_docstrings(min_chars=40):
        first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0]
        if len(first.split()) >= 5 and len(first) <= 300:
            out.append(first)
    out = sorted(set(out))
    if half is None:
        return out
    if half not in ("train", "test"):
        raise ValueError(f"half must be 'train', 'test' or None, not {half!r}")
    parity = 0 if half == "train" else 1
    return [t for t in out if hashlib.sha256(t.encode()).digest()[0] % 2 == parity]


def all_junk_seeds() -> list[tuple[str, bool]]:
    """Every junk seed, with whether its {slots} are to be filled (the rule-dev strings: no)."""
    return ([(t, False) for texts in RULE_DEV_JUNK.values() for t in texts]
            + [(t, True) for t in DEV2_JUNK + DEV3_JUNK])


DOCS_REQUEST = "Summarise what this part of the documentation says."


def training_examples(seed: int = 0, junk_per_seed: int = 8, good_per_template: int = 12
                      ) -> list[tuple[str | None, str, int]]:
    """The classifier's training set: (request or None, text, label) with label 1 = junk; a text
    with a request is read as the reply to it, one without on its own. Deterministic given ``seed``.

    Junk: every seed written ``junk_per_seed`` ways, two in three as the reply to a good request,
    one in three on its own (junk a user sent). Good: every good template's request on its own and
    its answer after it, ``good_per_template`` fillings each (the extra exchanges a third as often),
    the short good texts on their own, everyday chat questions and answers (builtin:chat-everyday),
    and the train half of the docstring sentences after a request to summarise documentation."""
    from ..train.data import builtin_records
    rng = random.Random(seed)
    pairs = [(fill(q, rng), fill(a, rng)) for q, a in GOOD_TEMPLATES for _ in range(good_per_template)]
    pairs += [(fill(q, rng), fill(a, rng)) for q, a in GOOD_EXCHANGES_EXTRA for _ in range(good_per_template // 3)]
    for rec in builtin_records("chat-everyday", 150, seed):
        pairs.append((rec["messages"][0]["content"], rec["messages"][1]["content"]))
    requests = [q for q, _ in pairs]
    out: list[tuple[str | None, str, int]] = []
    for k, (t, slots) in enumerate((t, s) for t, s in all_junk_seeds() for _ in range(junk_per_seed)):
        junk = vary_junk(t, rng, slots)
        out.append((None, junk, 1) if k % 3 == 2 else (rng.choice(requests), junk, 1))
    for q, a in pairs:
        out += [(None, q, 0), (q, a, 0)]
    out += [(None, t, 0) for t in GOOD_TEXTS]
    out += [(DOCS_REQUEST, t, 0) for t in docstring_sentences("train")]
    rng.shuffle(out)
    return out


def read_labelled(path) -> list[tuple[str | None, str, int]]:
    """A user's own labels: JSONL, one ``{"text": "...", "junk": true|false}`` per line, with an optional
    ``"request"``: the request the text answers (it is then read as the reply to it)."""
    import json
    from pathlib import Path

    from ..train.config import CogcoreError
    out: list[tuple[str | None, str, int]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CogcoreError(f"cannot read labelled examples {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CogcoreError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip()
                and isinstance(rec.get("junk"), bool) and isinstance(rec.get("request"), (str, type(None)))):
            raise CogcoreError(f'{path}:{n}: expected {{"text": "<non-empty string>", "junk": true|false}} and '
                               'optionally "request": "<the request the text answers>"')
        out.append((rec.get("request"), rec["text"], int(rec["junk"])))
    if not out:
        raise CogcoreError(f"{path} holds no labelled examples")
    return out
