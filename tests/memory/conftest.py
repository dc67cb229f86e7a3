"""A scripted support desk: the environment the memory tests log experience from.

Each request has one right first move. Any other move is refused, and the refusal says what was
missing ("I need the last four digits of your card before I can refund order 4411."), as a real
backend would. A naive agent tries the obvious action first, is refused, then does the right thing.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

# intent: (request, naive action, right action, right-action regex, refusal, success)
CASES = {
    "refund": ("I want a refund for order {n}, {why}.",
               "Issue a refund for order {n}.",
               "Could you tell me the last four digits of the card you paid with?",
               r"last four digits",
               "I need the last four digits of your card before I can refund order {n}.",
               "Card ending {d} confirmed; the refund for order {n} is on its way."),
    "address": ("Please ship order {n} to my new address instead, {why}.",
                "Change the shipping address of order {n}.",
                "Could you confirm the email address on your account first?",
                r"email address",
                "I need you to verify the email address on the account before changing order {n}.",
                "Email verified; order {n} will ship to the new address."),
    "cancel": ("Cancel my subscription, {why}.",
               "Cancel the subscription now.",
               "Which plan are you on, and what is your account number?",
               r"account number",
               "The account number is required to cancel a subscription.",
               "Subscription for account {n} cancelled, effective today."),
}


# why the user asks (ten each, used in turn), so that two requests of the same kind are not
# near-duplicates of each other
WHY = {
    "refund": ["it arrived broken", "it never arrived", "the colour is wrong", "it is two sizes too small",
               "the box was soaked in rain", "I was charged twice", "the zipper tore on day one",
               "the battery will not hold a charge", "a different model came in the parcel",
               "the description promised a steel frame"],
    "address": ["I moved last week", "I am staying with my parents", "the office is closed in August",
                "my old flat has a new tenant", "the courier cannot reach my street", "I am travelling for work",
                "the gift is for my sister in Leeds", "our building lobby is being renovated",
                "I changed jobs and sit downtown now", "the previous address had a typo"],
    "cancel": ["I am moving abroad", "it has become too expensive", "I no longer use it",
               "I found another provider", "my company pays for a plan now", "the app keeps crashing on my phone",
               "I only needed it for one project", "my student discount ended", "support took weeks to answer",
               "we merged two household accounts"],
}


class SupportDesk:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def answer(self, intent: str, action: str, n: int, d: int) -> tuple[str, bool]:
        """The desk's reply to ``action`` and whether it did what the user asked."""
        _, _, _, right_re, refusal, success = CASES[intent]
        if re.search(right_re, action):
            return success.format(n=n, d=d), True
        return refusal.format(n=n, d=d), False

    def episode(self, user: str, episode_id: str, ts: float, intent: str, first_try_right: bool = False,
                flag_ok: bool = False, variant: int = 0) -> list[dict]:
        """A logged episode: request, (naive action, refusal,) right action, success, reward 1."""
        request, naive, right, right_re, *_ = CASES[intent]
        n, d = self.rng.randint(1000, 9999), self.rng.randint(1000, 9999)
        why = WHY[intent][variant % len(WHY[intent])]
        events = [{"user_id": user, "episode_id": episode_id, "ts": ts, "kind": "context",
                   "text": request.format(n=n, why=why), "meta": {"check": right_re, "intent": intent}}]
        actions = [right] if first_try_right else [naive.format(n=n), right]
        for i, action in enumerate(actions):
            obs, ok = self.answer(intent, action, n, d)
            events.append({"user_id": user, "episode_id": episode_id, "ts": ts + 2 * i + 1, "kind": "action",
                           "text": action})
            events.append({"user_id": user, "episode_id": episode_id, "ts": ts + 2 * i + 2, "kind": "observation",
                           "text": obs, "meta": {"ok": ok} if flag_ok else {}})
        events.append({"user_id": user, "episode_id": episode_id, "ts": ts + 10, "kind": "reward", "text": "",
                       "reward": 1.0})
        return events

    def junk_episode(self, user: str, episode_id: str, ts: float, action: str,
                     context: str = "Can you help me with my order, please?") -> list[dict]:
        return [{"user_id": user, "episode_id": episode_id, "ts": ts, "kind": "context", "text": context},
                {"user_id": user, "episode_id": episode_id, "ts": ts + 1, "kind": "action", "text": action},
                {"user_id": user, "episode_id": episode_id, "ts": ts + 2, "kind": "observation",
                 "text": "No change was made."},
                {"user_id": user, "episode_id": episode_id, "ts": ts + 3, "kind": "reward", "reward": 0.0}]


def history(user: str, n: int, seed: int = 0, t0: float | None = None, start: int = 0) -> list[dict]:
    """``n`` episodes of ``user`` (numbered from ``start``) cycling through the intents; every fourth one
    right on the first try."""
    desk = SupportDesk(seed)
    t0 = t0 if t0 is not None else time.time() - 86400 * 30
    intents = list(CASES)
    events = []
    for i in range(start, start + n):
        events += desk.episode(user, f"{user}-ep{i:04d}", t0 + 100 * (i - start), intents[i % len(intents)],
                               first_try_right=(i % 4 == 3), variant=i // len(intents))
    return events


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


ENGLISH = [
    "I want a refund for order 4411, it arrived broken.", "Could you tell me the last four digits of the card?",
    "Issue a refund for order 4411.", "Done! Your refund is on its way and should arrive in a few days.",
    "Please subscribe me to the weekly newsletter.", "Which plan are you on, and what is your account number?",
    "Your free trial ends on May 3; after that the plan costs nine dollars a month.",
    "Please ship order 5512 to my new address instead.", "Could you confirm the email address on your account?",
    "I need the last four digits of your card before I can refund the order.",
    "Email verified; the order will ship to the new address.", "Cancel my subscription, I am moving abroad.",
    "Change the shipping address of the order.", "The account number is required to cancel a subscription.",
]


@pytest.fixture(scope="session")
def english_tiny(tmp_path_factory) -> Path:
    """tiny-llama trained for a few seconds on plain support-desk English, saved as an HF directory: a
    model under which English is likely and gibberish is not (what the perplexity gate relies on)."""
    import torch

    from cogcore.train.model import load_model, load_tokenizer
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok, model = load_tokenizer("tiny-llama"), load_model("tiny-llama")
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in ENGLISH]
    x = torch.full((len(ids), max(map(len, ids))), tok.pad_token_id)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
    mask = (x != tok.pad_token_id).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(before)
    out = tmp_path_factory.mktemp("english-tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def desk():
    return SupportDesk(0)


@pytest.fixture
def make_history():
    return history


@pytest.fixture
def jsonl():
    return write_jsonl
