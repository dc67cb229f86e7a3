"""What consolidation drops before anything is trained on: junk ("brain rot") and duplicates.

Junk is judged per episode, on what the user asked and what the agent did (the request and the
actions; the environment's observations are its own business). Each named rule below looks at
one text and says whether it is junk; the first rule that fires names the reason, so a report
can say "engagement_bait dropped 12 episodes, for example: ...".

  too_short        fewer than 2 words, or fewer than 8 letters/digits and no number ("lol ok", "+1", "👍")
  engagement_bait  calls to like / subscribe / follow / share / comment, clickbait teasers, emoji walls
  shouting         "!!!" / "???" runs, or mostly capital letters
  repetitive       a word three times in a row, a stutter, a phrase over and over, one keyword
                   stuffed in, few distinct words, a text that compresses to almost nothing
  templated        spam, scam and boilerplate templates ("Click here to win", "kindly send your
                   details", "as an AI language model", "Sent from my iPhone") and unfilled
                   placeholders ("Dear {name}", "[insert link]", "[Agent Name]")
  low_information  mostly filler words or internet slang ("ok sure thanks", "literally crying rn"),
                   mostly symbols, or keyboard mashing
  perplexity       (optional, needs a model) the core model finds the text very unlikely
  relevance        (optional, needs a model) the request does not make the action likelier: an
                   action that would follow any request as well (ads, channel intros, filler)
  classifier       (optional, needs a model) a logistic regression over the core's hidden states,
                   trained on labelled junk and good texts, calls the request or an action junk
                   (memory/junk_classifier.py)

Near-duplicates are found with MinHash LSH (datasketch) over character shingles and confirmed
with the exact Jaccard similarity of the shingle sets.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import unicodedata
import zlib
from collections import Counter

# ----------------------------------------------------------------------------- named rules

_WORD = re.compile(r"[^\W_]+")   # letters and digits, any script

_BAIT = re.compile("|".join([
    r"\blike\b.{0,20}\b(subscribe|share|follow|comment)\b",
    r"\bsubscribe (for|to (my|our)|now)\b", r"\bhit subscribe\b", r"\bsmash (that|the)\b", r"\bhit (that|the) (like|bell|subscribe|follow)",
    r"\bfollow (me|us|for)\b", r"\bfor more (content|videos|tips|like this)\b", r"\blink in (my |the )?(bio|description)\b",
    r"\btag (a|your) (friend|bestie|buddy)", r"\bshare (this|it) with\b", r"\bcomment (below|down below)\b",
    r"\bdrop a (like|comment|follow)\b", r"\bdon'?t forget to (like|share|follow|comment)\b",
    r"\byou won'?t believe\b", r"\bwhat happens next\b", r"\bstay tuned\b", r"\bturn on (post )?notifications\b",
    r"\bcheck out my\b", r"\bdm me\b", r"\bgoing viral\b", r"\bmust[- ]watch\b",
    r"\bsmash\b.{0,10}\bbutton\b", r"\b(f4f|l4l|s4s|sub4sub|follow ?4 ?follow|follow back)\b",
    r"\bvisit my (profile|page|channel|site)\b",
]), re.IGNORECASE)

_TEMPLATES = re.compile("|".join([
    r"\bclick (here|the link|below|now)\b", r"\bwin (a |an )?(free|big|cash|prize|\$|iphone|gift)", r"\byou('ve| have) (won|been selected)\b",
    r"\bcongratulations\b.{0,40}\b(won|winner|selected|chosen)\b", r"\blimited[- ]time (offer|only|deal)\b", r"\bact now\b",
    r"\b(buy|call|sign up) now\b", r"\b100% (free|guaranteed)\b",
    r"\bfree (gift|money|followers|likes|iphone)\b", r"\bearn \$?\d+.{0,10}\b(a|per) (day|week|hour)\b",
    r"\bwork from home\b", r"\brisk[- ]free\b", r"\bclaim (your|it now|now)\b", r"\$\$\$", r"\bbit\.ly/|\btinyurl\.",
    r"\bas an ai (language )?model\b", r"\blorem ipsum\b",
    # scams and get-rich spam
    r"\b(get rich|passive income|make money (fast|online|from home)|double your (money|bitcoin|crypto|investment))\b",
    r"\b(crypto|bitcoin|forex) (giveaway|signals?|profits?|investment)\b", r"\b(dm|inbox|message) (me|us) for\b",
    r"\bkindly (send|provide|share|forward)\b", r"\b(inheritance|wire transfer|western union|gift ?cards?)\b",
    r"\bsingles in your area\b", r"\bone (weird |simple |little )?trick\b", r"\b(doctors|banks|experts) (hate|don'?t want)\b",
    r"\b(limited|low) stock\b", r"\bgrab yours\b", r"\bwhile (stocks?|supplies) last\b", r"\b(promo|discount) code\b",
    # boilerplate that carries nothing
    r"\bsent from my (iphone|android|phone|ipad)\b", r"\bget outlook for\b",
    # unfilled placeholders: {name}, [insert link], [Agent Name], %NAME%
    r"\{\{?\s*[A-Za-z_]+\s*\}?\}", r"\[(insert|your|name|link|placeholder)[^\]]*\]", r"<(placeholder|insert)[^>]*>",
]), re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[[A-Z][A-Za-z ]{0,30}\](?!\()|%[A-Z_]{2,}%")   # case-sensitive: [Agent Name], [X]

_FILLER = frozenset("""ok okay k kk lol lmao rofl haha hahaha hehe yeah yea ya yes yep yup no nope nah sure
cool nice wow omg idk hmm hm mm meh whatever fine great good thanks thank thx ty bye hi hello hey
u ur too me it this that so just like really very and the a is same agreed true well oh ah
right gotcha alright""".split())
# internet slang and laughter: a text made of these says nothing a model should learn from
_SLANG = frozenset("""lol lmao lmfao rofl rn tbh ngl imo imho smh fr bruh bro pov ratio fam lit af omg omfg wtf idk
idc ikr irl literally u ur ya tho cuz plz pls yolo fomo vibes vibe slay sus lowkey highkey deadass bestie xd lmk
nvm btw gg ez hehe""".split())
_LAUGH = re.compile(r"(ha){2,}h?|(he){2,}|lo+l|a+h+|x+d+")
_STOP = frozenset("the a an and or of to in on for is are was be it this that with as at by from your you i we".split())

_MASH = re.compile(r"[bcdfghjklmnpqrstvwxz]{6,}", re.IGNORECASE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _is_emoji(ch: str) -> bool:
    return unicodedata.category(ch) == "So" or 0x1F000 <= ord(ch) <= 0x1FAFF


def too_short(text: str) -> bool:
    # numbers are information: "2 x 10 = 20." is short and fine, "lol ok" is not
    return len(_words(text)) < 2 or (sum(ch.isalnum() for ch in text) < 8 and not any(ch.isdigit() for ch in text))


def engagement_bait(text: str) -> bool:
    if _BAIT.search(text):
        return True
    emojis = sum(_is_emoji(ch) for ch in text)
    return emojis >= 3 or (emojis and emojis / max(1, len(text.strip())) > 0.15)


def shouting(text: str) -> bool:
    if re.search(r"[!?]{3,}", text):
        return True
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 12 and sum(ch.isupper() for ch in letters) / len(letters) > 0.7


def repetitive(text: str) -> bool:
    words = _words(text)
    if re.search(r"\b(\w+)(\W+\1\b){2,}", text.lower()):          # "great great great"
        return True
    if re.search(r"([^\W\d_])\1{4,}|([!?.*~])\2{5,}", text):         # "sooooo", "......"
        return True
    if len(words) >= 6 and len(set(words)) / len(words) < 0.5:
        return True
    trigrams = Counter(zip(words, words[1:], words[2:]))
    if trigrams and trigrams.most_common(1)[0][1] >= 3:            # a phrase said three times
        return True
    if sum(a == b for a, b in zip(words, words[1:])) >= 2:         # stutter: "I I don't know know"
        return True
    content = Counter(w for w in words if len(w) >= 3 and w not in _STOP and not w.isdigit())
    top = content.most_common(1)[0][1] if content else 0
    if top >= 3 and top / len(words) >= 0.2:                        # keyword stuffing: "cheap watches ... cheap"
        return True
    raw = text.encode("utf-8", errors="replace")
    return len(raw) >= 120 and len(zlib.compress(raw, 9)) / len(raw) < 0.3


def templated(text: str) -> bool:
    return bool(_TEMPLATES.search(text) or _PLACEHOLDER.search(text))


def low_information(text: str) -> bool:
    words = _words(text)
    slang = sum(w in _SLANG or bool(_LAUGH.fullmatch(w)) for w in words)
    filler = sum(w in _FILLER or w in _SLANG or bool(_LAUGH.fullmatch(w)) for w in words)
    if words and (slang / len(words) >= 0.25 or filler / len(words) >= 0.8):
        return True
    if re.search(r"https?://|\w\(", text):   # URLs and tool calls may be mostly symbols and consonants
        return False
    visible = [ch for ch in text if not ch.isspace()]
    if visible and sum(ch.isalnum() for ch in visible) / len(visible) < 0.4:   # mostly symbols
        return True
    return bool(_MASH.search(text))


RULES = {
    "too_short": too_short,
    "engagement_bait": engagement_bait,
    "shouting": shouting,
    "repetitive": repetitive,
    "templated": templated,
    "low_information": low_information,
}
RULE_NAMES = tuple(RULES) + ("perplexity", "relevance", "classifier")


def junk_rule(text: str, rules=tuple(RULES)) -> str | None:
    """The first named rule (in ``rules``) that calls ``text`` junk, or None."""
    for name in rules:
        if name in RULES and RULES[name](text):
            return name
    return None


def judge_episode(texts: list[str], rules=tuple(RULES)) -> tuple[str, str] | None:
    """(rule, offending text) for the first junk text of an episode, or None if it is all fine."""
    for text in texts:
        rule = junk_rule(text, rules)
        if rule:
            return rule, text
    return None


# ----------------------------------------------------------------------------- model score

class PerplexityScorer:
    """Perplexity of each text under a causal LM (the core): exp(mean next-token loss over the text).

    Without a prompt the text is scored on its own (its first token predicted from BOS); with a
    prompt (the chat up to the assistant's turn) it is scored as the reply to it, so an action that
    is fluent but has nothing to do with the request also scores high."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_tokens: int = 256):
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens

    @classmethod
    def load(cls, source: str, batch_size: int = 8) -> PerplexityScorer:
        from ..train.model import load_model, load_tokenizer
        return cls(load_model(source), load_tokenizer(source), batch_size)

    def __call__(self, texts: list[str], prompts: list[str] | None = None, progress: str = "") -> list[float]:
        """``progress``: a label for a progress bar over the texts (none when empty)."""
        import torch
        start = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        encode = lambda t: self.tok(t, add_special_tokens=False).input_ids   # noqa: E731
        seqs = []   # (ids, index where the scored text starts)
        for i, text in enumerate(texts):
            target = encode(text)[: self.max_tokens]
            prefix = encode(prompts[i])[-self.max_tokens:] if prompts else [start]   # keep the prompt's end
            seqs.append((prefix + target, len(prefix)))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))   # similar lengths share a batch
        out = [math.inf] * len(seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(seqs), desc=progress, unit="text", leave=False)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b: b + self.batch_size]
                T = max(len(seqs[i][0]) for i in idx)
                x = torch.full((len(idx), T), pad, dtype=torch.long)
                attn = torch.zeros((len(idx), T), dtype=torch.long)
                scored = torch.zeros((len(idx), T), dtype=torch.float)     # 1 where a text token is predicted
                for r, i in enumerate(idx):
                    ids, begin = seqs[i]
                    x[r, : len(ids)] = torch.tensor(ids)
                    attn[r, : len(ids)] = 1
                    scored[r, begin: len(ids)] = 1
                logits = self.model(input_ids=x.to(device), attention_mask=attn.to(device)).logits.float()
                nll = torch.nn.functional.cross_entropy(                     # (B, T-1): token t+1 from 0..t
                    logits[:, :-1].transpose(1, 2), x[:, 1:].to(device), reduction="none")
                m = scored[:, 1:].to(device)
                mean = (nll * m).sum(1) / m.sum(1).clamp(min=1)
                for r, i in enumerate(idx):
                    out[i] = float(torch.exp(mean[r]).cpu())
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


def episode_perplexity(scorer: PerplexityScorer, episodes: list[list[str]], progress: bool = False
                       ) -> list[tuple[float, str]]:
    """For each episode given as [request, action, ...]: the highest perplexity among the request (scored
    on its own) and the actions (each scored as the assistant's reply to the request), and that text."""
    from .formats import policy_messages, render_prompt
    texts, prompts, owner = [], [], []
    for k, (request, *actions) in enumerate(episodes):
        texts.append(request)
        prompts.append(None)
        owner.append(k)
        prompt = render_prompt(scorer.tok, policy_messages(request))
        for action in actions:
            texts.append(action)
            prompts.append(prompt)
            owner.append(k)
    alone = [i for i, p in enumerate(prompts) if p is None]
    as_reply = [i for i, p in enumerate(prompts) if p is not None]
    scores = [0.0] * len(texts)
    label = "perplexity: {}" if progress else ""
    for i, v in zip(alone, scorer([texts[i] for i in alone], progress=label.format("requests"))):
        scores[i] = v
    for i, v in zip(as_reply, scorer([texts[i] for i in as_reply], [prompts[i] for i in as_reply],
                                     progress=label.format("actions"))):
        scores[i] = v
    worst: list[tuple[float, str]] = [(-1.0, "")] * len(episodes)
    for i, k in enumerate(owner):
        worst[k] = max(worst[k], (scores[i], texts[i]))
    return worst


NEUTRAL_REQUEST = "Say something."   # a request that asks for nothing in particular: the baseline of relevance


def episode_relevance(scorer: PerplexityScorer, episodes: list[list[str]], progress: bool = False
                      ) -> list[tuple[float, str]]:
    """For each episode given as [request, action, ...]: the lowest relevance among its actions, and
    that action ((inf, "") when it has none).

    Relevance of an action = log perplexity of the action as the reply to a neutral request minus
    log perplexity as the reply to the episode's request: how many nats per token the request makes
    it likelier. A reply to the request scores above 0; a text that would follow anything as well
    (an ad, "welcome back to my channel", a scam line) scores about 0 or below, however fluent it is,
    which perplexity alone cannot see."""
    from .formats import policy_messages, render_prompt
    neutral = render_prompt(scorer.tok, policy_messages(NEUTRAL_REQUEST))
    actions, prompts, owner = [], [], []
    for k, (request, *acts) in enumerate(episodes):
        prompt = render_prompt(scorer.tok, policy_messages(request))
        for action in acts:
            actions.append(action)
            prompts.append(prompt)
            owner.append(k)
    lowest: list[tuple[float, str]] = [(math.inf, "")] * len(episodes)
    if not actions:
        return lowest
    label = "relevance: {}" if progress else ""
    as_reply = scorer(actions, prompts, progress=label.format("actions after their request"))
    after_neutral = scorer(actions, [neutral] * len(actions), progress=label.format("actions after a neutral request"))
    for k, action, a, b in zip(owner, actions, as_reply, after_neutral):
        lowest[k] = min(lowest[k], (math.log(b) - math.log(a), action))
    return lowest


# ----------------------------------------------------------------------------- duplicates

def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, k: int) -> set[bytes]:
    t = normalize(text)
    if len(t) <= k:
        return {t.encode("utf-8", errors="replace")}
    return {t[i: i + k].encode("utf-8", errors="replace") for i in range(len(t) - k + 1)}


@functools.lru_cache(maxsize=8)
def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch picks (bands, rows) by numerical integration (~80 ms); once per setting is enough."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class Deduplicator:
    """Keeps the first of each group of (near-)identical texts, in the order they are offered.

    ``seen(key, text)`` returns None for a new text, else the key of the earlier one it repeats and
    whether exactly ("exact") or nearly ("near": Jaccard of character shingles >= threshold)."""

    def __init__(self, threshold: float = 0.85, shingle_chars: int = 5, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH
        self.threshold, self.k, self.num_perm, self.seed = threshold, shingle_chars, num_perm, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=_lsh_bands(threshold, num_perm))
        self.exact: dict[str, str] = {}
        self.sets: dict[str, set[bytes]] = {}

    def seen(self, key: str, text: str) -> tuple[str, str] | None:
        from datasketch import MinHash
        digest = hashlib.sha256(normalize(text).encode("utf-8", errors="replace")).hexdigest()
        if digest in self.exact:
            return self.exact[digest], "exact"
        sh = shingles(text, self.k)
        mh = MinHash(num_perm=self.num_perm, seed=self.seed)
        mh.update_batch(sorted(sh))
        # LSH gives candidates; the exact Jaccard decides (and sorting keeps the choice deterministic).
        for other in sorted(self.lsh.query(mh)):
            theirs = self.sets[other]
            if len(sh & theirs) / len(sh | theirs) >= self.threshold:
                return other, "near"
        self.exact[digest] = key
        self.sets[key] = sh
        self.lsh.insert(key, mh)
        return None
