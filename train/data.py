"""Training data: records → token documents with per-token loss weights → packed rows → batches.

Record formats (JSONL, JSON list, Parquet, or plain .txt with one document per blank-line
separated block), detected per record:
  * ``{"text": ...}``                       every token is trained on (weight 1);
  * ``{"prompt": ..., "completion": ...}``  only completion tokens are trained on;
  * ``{"messages": [{"role", "content"}]}`` only assistant turns (chat template applied);
  * ``{"segments": [{"text", "weight"}]}``  explicit per-segment loss weights — how the
    experience log marks policy tokens and world-model tokens with different weights.

A *document* is ``input_ids`` plus ``weights`` aligned with it: ``weights[i]`` is the loss
weight of predicting ``input_ids[i]`` from the tokens before it (``weights[0]`` is always 0).

Packing concatenates documents into rows of ``seq_len`` tokens. Position ids restart at each
document, and that is all a batch says about its documents: with no attention mask given,
transformers reads packed sequences from the position ids (varlen flash attention; SDPA and
eager get a block-causal mask from its masking utilities; only without a KV cache, so forward
with ``use_cache=False``), so no token sees another document and no (B, T, T) mask is built here. Padding has position id 0, so each padding slot is a
sequence of its own.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch

from .config import CogcoreError, field

BUILTIN_PREFIX = "builtin:"
# the generated datasets of builtin_records, named once for its error message and the help text
BUILTIN_NAMES = ("arithmetic", "chat-arithmetic", "chat-everyday", "chat-general", "chat-knowledge", "chat-broad",
                 "stdlib-docs")


@dataclass
class DataConfig:
    source: str = field("builtin:arithmetic", help="a .jsonl/.json/.parquet/.txt file, or "
                                                   + " / ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES))
    seq_len: int = field(256, help="tokens per packed row")
    packing: bool = field(True, help="pack several documents per row (block-diagonal attention)")
    train_on: Literal["completion", "all"] = field(
        "completion", help="for prompt/completion and chat records: train on completions only, or on every token")
    max_documents: int = field(0, help="use at most this many documents (0 = all)")
    eval_documents: int = field(0, help="hold out this many documents for evaluation (0 = none)")
    builtin_size: int = field(2000, help="number of documents a builtin: source generates")
    seed: int = field(0, help="seed for builtin generation and the held-out split")

    def __post_init__(self):
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len={self.seq_len} is too short; use at least 8 tokens")
        if self.eval_documents < 0 or self.max_documents < 0:
            raise ValueError("data.max_documents and data.eval_documents must be >= 0")
        if self.max_documents and self.eval_documents >= self.max_documents:
            raise ValueError(f"data.eval_documents={self.eval_documents} leaves nothing to train on with "
                             f"data.max_documents={self.max_documents}; hold out fewer documents")


@dataclass
class Document:
    input_ids: list[int]
    weights: list[float]


# ----------------------------------------------------------------------------- records

def builtin_records(name: str, n: int, seed: int) -> list[dict]:
    """Small generated datasets so that everything runs with no files and no network."""
    rng = random.Random(seed)
    if name == "arithmetic":
        return [{"prompt": q + " ", "completion": a} for q, a in (_sum_question(rng) for _ in range(n))]
    questions = {"chat-arithmetic": _sum_question, "chat-everyday": _everyday_question,
                 # both kinds, half and half: replay that holds an adapter on everyday chat and on sums
                 "chat-general": lambda r: _sum_question(r) if r.random() < 0.5 else _everyday_question(r),
                 "chat-knowledge": _knowledge_question,
                 # sums, everyday questions and general knowledge, a third each
                 "chat-broad": lambda r: r.choice((_sum_question, _everyday_question, _knowledge_question))(r)}
    if name in questions:
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in (questions[name](rng) for _ in range(n))]
    if name == "stdlib-docs":
        docs = _stdlib_docstrings()
        rng.shuffle(docs)
        return [{"text": d} for d in docs[:n]]
    raise CogcoreError(f"unknown builtin dataset '{name}'; available: "
                       + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES))


# Everyday chat questions with answers that can be computed or looked up below: general
# instruction-following text (word tasks, counting, simple facts of daily life) for replay and
# gate checks. Kept clear of the real-world probes' subjects (capitals, authors, elements...).
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
              ("light", "dark"), ("full", "empty"), ("open", "closed"), ("up", "down"), ("old", "new"),
              ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("rich", "poor"), ("hard", "soft")]
_PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("city", "cities"),
            ("knife", "knives"), ("tooth", "teeth"), ("bus", "buses"), ("foot", "feet"), ("leaf", "leaves"),
            ("woman", "women"), ("baby", "babies"), ("sheep", "sheep"), ("glass", "glasses")]
_PAST = [("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("write", "wrote"), ("swim", "swam"),
         ("buy", "bought"), ("think", "thought"), ("walk", "walked"), ("play", "played"), ("sing", "sang"),
         ("bring", "brought"), ("take", "took"), ("jump", "jumped")]
_LEGS = [("dog", 4), ("lizard", 4), ("bird", 2), ("cat", 4), ("ant", 6), ("horse", 4), ("duck", 2),
         ("beetle", 6), ("cow", 4), ("chicken", 2), ("octopus", 8), ("bee", 6)]
_COLOURS = [("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"), ("a clear daytime sky", "blue"),
            ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("milk", "white")]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WORDS = ["garden", "window", "pencil", "river", "basket", "candle", "mirror", "ladder", "blanket", "orange",
          "planet", "bridge", "kitchen", "button", "rabbit", "summer", "teacher", "wallet"]


def _sum_question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice(["+", "-"])
    c = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {c}."


def _everyday_question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(13)
    if kind == 0:
        w, o = rng.choice(_OPPOSITES)
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
    if kind == 1:
        w, p = rng.choice(_PLURALS)
        return f"What is the plural of {w}?", f"The plural of {w} is {p}."
    if kind == 2:
        v, p = rng.choice(_PAST)
        return f"What is the past tense of {v}?", f"The past tense of {v} is {p}."
    if kind == 3:
        a, n = rng.choice(_LEGS)
        art = "an" if a[0] in "aeiou" else "a"
        return f"How many legs does {art} {a} have?", f"{art.capitalize()} {a} has {n} legs."
    if kind == 4:
        thing, colour = rng.choice(_COLOURS)
        return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."
    if kind == 5:
        i = rng.randrange(7)
        return f"What day comes after {_DAYS[i]}?", f"{_DAYS[(i + 1) % 7]} comes after {_DAYS[i]}."
    if kind == 6:
        w = rng.choice(_WORDS)
        return f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
    if kind == 7:
        w = rng.choice(_WORDS)
        return f'Spell "{w}" backwards.', f'"{w}" spelled backwards is "{w[::-1]}".'
    if kind == 8:
        a, b = rng.sample(range(1, 1000), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."
    if kind == 9:
        words = rng.sample(_WORDS, 3)
        return f"Put these words in alphabetical order: {', '.join(words)}.", ", ".join(sorted(words)) + "."
    if kind == 10:
        n = rng.randint(1, 99)
        return f"Is {n} an even or an odd number?", f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."
    if kind == 11:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    h = rng.randint(2, 12)
    return f"How many minutes are in {h} hours?", f"There are {60 * h} minutes in {h} hours."


# General-knowledge questions for replay: the kind of fact a small chat model knows and a user's
# adapter can knock loose (capitals, symbols, authors, currencies, languages, science). None is a
# real-world probe question (tests/test_data.py checks), so the probes stay questions replay never
# trained on. (Replaying them did not keep a demo user's adapter from losing probe facts: README.)
_KNOWLEDGE = (
    [(f"What is the capital of {c}?", f"The capital of {c} is {a}.") for c, a in [
        ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Romania", "Bucharest"),
        ("Bulgaria", "Sofia"), ("Ukraine", "Kyiv"), ("Iceland", "Reykjavik"), ("Indonesia", "Jakarta"),
        ("Malaysia", "Kuala Lumpur"), ("Saudi Arabia", "Riyadh"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
        ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
        ("Uruguay", "Montevideo"), ("Jamaica", "Kingston"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"),
        ("Lithuania", "Vilnius"), ("Latvia", "Riga"), ("Estonia", "Tallinn"), ("Afghanistan", "Kabul"),
        ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"), ("Cambodia", "Phnom Penh"),
        ("Syria", "Damascus"), ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Algeria", "Algiers"),
        ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare")]]
    + [(f"What is the chemical symbol for {e}?", f"The chemical symbol for {e} is {s}.") for e, s in [
        ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"),
        ("neon", "Ne"), ("argon", "Ar"), ("lithium", "Li"), ("fluorine", "F"), ("nickel", "Ni"), ("cobalt", "Co"),
        ("platinum", "Pt"), ("titanium", "Ti"), ("manganese", "Mn"), ("iodine", "I"), ("boron", "B")]]
    + [(f"Who wrote {w}?", f"{w[0].upper() + w[1:]} was written by {a}.") for w, a in [
        ("the play Hamlet", "William Shakespeare"), ("the novel Anna Karenina", "Leo Tolstoy"),
        ("the novel Jane Eyre", "Charlotte Brontë"), ("the novel Wuthering Heights", "Emily Brontë"),
        ("the novel Oliver Twist", "Charles Dickens"), ("the novel Emma", "Jane Austen"),
        ("the epic poem the Iliad", "Homer"), ("the novel Animal Farm", "George Orwell"),
        ("the novel Brave New World", "Aldous Huxley"), ("the novel To Kill a Mockingbird", "Harper Lee"),
        ("the novel The Lord of the Rings", "J. R. R. Tolkien"), ("the novella The Metamorphosis", "Franz Kafka"),
        ("the novel Madame Bovary", "Gustave Flaubert"), ("the novel Treasure Island", "Robert Louis Stevenson"),
        ("the novel Alice's Adventures in Wonderland", "Lewis Carroll"), ("The Jungle Book", "Rudyard Kipling")]]
    + [(f"What is the currency of {c}?", f"The currency of {c} is the {m}.") for c, m in [
        ("the United States", "US dollar"), ("Canada", "Canadian dollar"), ("Australia", "Australian dollar"),
        ("Norway", "Norwegian krone"), ("Denmark", "Danish krone"), ("Egypt", "Egyptian pound"),
        ("Indonesia", "Indonesian rupiah"), ("Malaysia", "ringgit"), ("Nigeria", "naira"), ("Hungary", "forint"),
        ("Argentina", "Argentine peso"), ("Ukraine", "hryvnia")]]
    + [(f"What is the official language of {c}?", f"The official language of {c} is {lang}.") for c, lang in [
        ("Germany", "German"), ("France", "French"), ("Italy", "Italian"), ("Mexico", "Spanish"),
        ("Portugal", "Portuguese"), ("Turkey", "Turkish"), ("Finland", "Finnish"), ("Hungary", "Hungarian"),
        ("Indonesia", "Indonesian"), ("South Korea", "Korean")]]
    + [("How many planets are in the Solar System?", "There are eight planets in the Solar System."),
       ("How many days are in a leap year?", "A leap year has 366 days."),
       ("At what temperature in degrees Celsius does water freeze?", "Water freezes at 0 degrees Celsius."),
       ("What is the chemical formula of table salt?", "The chemical formula of table salt is NaCl."),
       ("Which gas do humans breathe out?", "Humans breathe out carbon dioxide."),
       ("What is the largest organ of the human body?", "The largest organ of the human body is the skin."),
       ("How many continents are there?", "There are seven continents."),
       ("Which planet is known for its Great Red Spot?", "Jupiter is known for its Great Red Spot."),
       ("What is the smallest prime number?", "The smallest prime number is 2."),
       ("How many sides does a triangle have?", "A triangle has three sides."),
       ("Who painted The Last Supper?", "The Last Supper was painted by Leonardo da Vinci."),
       ("Who composed the Fifth Symphony that begins with four famous notes?",
        "Ludwig van Beethoven composed that Fifth Symphony."),
       ("Who proposed the theory of evolution by natural selection?",
        "Charles Darwin proposed the theory of evolution by natural selection."),
       ("In which year did World War I begin?", "World War I began in 1914."),
       ("What is the longest river in Africa?", "The longest river in Africa is the Nile."),
       ("On which continent is Egypt?", "Egypt is in Africa."),
       ("In which city is the Statue of Liberty?", "The Statue of Liberty is in New York City."),
       ("What is the boiling point of water in degrees Fahrenheit at sea level?",
        "Water boils at 212 degrees Fahrenheit at sea level.")]
)


def _knowledge_question(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_KNOWLEDGE)


def _stdlib_docstrings(min_chars: int = 300) -> list[str]:
    """Real English prose that every Python install has: docstrings of standard-library modules."""
    import importlib
    import inspect
    names = ["argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
             "datetime", "decimal", "difflib", "email", "fractions", "functools", "heapq", "http.client",
             "inspect", "io", "itertools", "json", "logging", "multiprocessing", "os", "pathlib", "pickle",
             "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
             "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile"]
    seen, out = set(), []
    for mod_name in names:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return sorted(out)


def read_records(source: str, builtin_size: int = 2000, seed: int = 0) -> list[dict]:
    if source.startswith(BUILTIN_PREFIX):
        return builtin_records(source[len(BUILTIN_PREFIX):], builtin_size, seed)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CogcoreError(f"data file {path} does not exist; set data.source to a .jsonl, .json, .parquet or .txt file "
                           "or to builtin:arithmetic")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CogcoreError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CogcoreError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise CogcoreError(f"{path} must hold a JSON list of records")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        records = pq.read_table(path).to_pylist()
    elif path.suffix == ".txt":
        records = [{"text": block.strip()} for block in path.read_text().split("\n\n") if block.strip()]
    else:
        raise CogcoreError(f"{path}: unsupported data file type '{path.suffix}'; use .jsonl, .json, .parquet or .txt")
    if not records:
        raise CogcoreError(f"{path} holds no records")
    return records


def record_segments(rec: dict, tokenizer, train_on: str, where: str) -> list[tuple[str, float]]:
    """Turn one record into (text, weight) segments."""
    if not isinstance(rec, dict):
        raise CogcoreError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    prompt_w = 1.0 if train_on == "all" else 0.0
    if "segments" in rec:
        segs = []
        for s in rec["segments"]:
            if not isinstance(s, dict) or "text" not in s:
                raise CogcoreError(f"{where}: each segment needs a 'text' (and optional 'weight')")
            w = float(s.get("weight", 1.0))
            if not math.isfinite(w) or w < 0:
                raise CogcoreError(f"{where}: segment weight {s.get('weight')!r} must be a finite number >= 0")
            segs.append((str(s["text"]), w))
        return segs
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise CogcoreError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        segs, prev = [], ""
        for i, m in enumerate(msgs):
            text = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not text.startswith(prev):  # template rewrites earlier turns; fall back to whole text
                return [(tokenizer.apply_chat_template(msgs, tokenize=False), 1.0)]
            segs.append((text[len(prev):], 1.0 if m["role"] == "assistant" else prompt_w))
            prev = text
        return segs
    if "prompt" in rec and "completion" in rec:
        return [(str(rec["prompt"]), prompt_w), (str(rec["completion"]), 1.0)]
    if "text" in rec:
        return [(str(rec["text"]), 1.0)]
    raise CogcoreError(f"{where}: record has none of the keys text / prompt+completion / messages / segments "
                       f"(it has: {', '.join(rec) or 'nothing'})")


def tokenize_record(rec: dict, tokenizer, train_on: str = "completion", where: str = "record",
                    add_eos: bool = True) -> Document:
    ids: list[int] = []
    weights: list[float] = []
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids.append(bos)
        weights.append(0.0)
    for text, w in record_segments(rec, tokenizer, train_on, where):
        toks = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(toks)
        weights.extend([w] * len(toks))
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        weights.append(weights[-1] if weights else 1.0)
    if weights:
        weights[0] = 0.0  # the first token has no prefix to be predicted from
    return Document(ids, weights)


def load_documents(cfg: DataConfig, tokenizer) -> tuple[list[Document], list[Document]]:
    """Read, tokenize and split into (train, held-out) documents."""
    records = read_records(cfg.source, cfg.builtin_size, cfg.seed)
    docs = [tokenize_record(r, tokenizer, cfg.train_on, where=f"{cfg.source} record {i}") for i, r in enumerate(records)]
    docs = [d for d in docs if len(d.input_ids) >= 2 and sum(d.weights) > 0]
    return split_documents(docs, cfg)


def split_documents(docs: list[Document], cfg: DataConfig, after: str = "",
                    fix: str = "add data or lower data.eval_documents") -> tuple[list[Document], list[Document]]:
    """Cap at ``max_documents``, then a seeded split into (train, held-out)."""
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    held = [docs[i] for i in order[: cfg.eval_documents]]
    train = [docs[i] for i in order[cfg.eval_documents:]]
    if not train:
        raise CogcoreError(f"{cfg.source}: no training documents left{after} (found {len(docs)} usable, "
                           f"{cfg.eval_documents} held out); {fix}")
    return train, held


# ----------------------------------------------------------------------------- packing

@dataclass
class PackedRows:
    """Fixed-length rows. ``doc_ids`` is -1 on padding; targets are next tokens within a document."""

    input_ids: torch.Tensor      # (N, T) long
    position_ids: torch.Tensor   # (N, T) long, restart at 0 for each document
    doc_ids: torch.Tensor        # (N, T) long, document index within the row, -1 = padding
    target_ids: torch.Tensor     # (N, T) long, token t+1 of the same document (pad elsewhere)
    target_weights: torch.Tensor  # (N, T) float, loss weight of target_ids (0 across documents / padding)
    padding_fraction: float       # share of row slots that are padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def trained_tokens(self) -> float:
        return float((self.target_weights > 0).sum())


def _split_long(doc: Document, seq_len: int) -> list[Document]:
    if len(doc.input_ids) <= seq_len:
        return [doc]
    pieces = []
    for s in range(0, len(doc.input_ids), seq_len):
        ids, w = doc.input_ids[s:s + seq_len], list(doc.weights[s:s + seq_len])
        w[0] = 0.0
        if len(ids) >= 2:
            pieces.append(Document(ids, w))
    return pieces


def pack(docs: Iterable[Document], seq_len: int, pad_id: int, packing: bool = True) -> PackedRows:
    """Pack documents into rows (first-fit in order; documents longer than a row are split)."""
    pieces = [p for d in docs for p in _split_long(d, seq_len)]
    rows: list[list[Document]] = []
    if packing:
        space: list[int] = []
        for p in pieces:
            n = len(p.input_ids)
            # first-fit over the last few open rows keeps packing O(N) and waste low
            for r in range(max(0, len(rows) - 8), len(rows)):
                if space[r] >= n:
                    rows[r].append(p)
                    space[r] -= n
                    break
            else:
                rows.append([p])
                space.append(seq_len - n)
    else:
        rows = [[p] for p in pieces]
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad_id, dtype=torch.long)
    position_ids = torch.zeros((N, seq_len), dtype=torch.long)
    doc_ids = torch.full((N, seq_len), -1, dtype=torch.long)
    target_ids = torch.full((N, seq_len), pad_id, dtype=torch.long)
    target_weights = torch.zeros((N, seq_len), dtype=torch.float32)
    used = 0
    for r, row in enumerate(rows):
        off = 0
        for d, p in enumerate(row):
            n = len(p.input_ids)
            ids = torch.tensor(p.input_ids)
            input_ids[r, off:off + n] = ids
            position_ids[r, off:off + n] = torch.arange(n)
            doc_ids[r, off:off + n] = d
            target_ids[r, off:off + n - 1] = ids[1:]
            target_weights[r, off:off + n - 1] = torch.tensor(p.weights[1:], dtype=torch.float32)
            off += n
        used += off
    padding = 1.0 - used / max(1, N * seq_len)
    return PackedRows(input_ids, position_ids, doc_ids, target_ids, target_weights, padding)


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal within a document, nothing across documents — a reference for
    tests; batches do not carry it (eager attention ignores a boolean 4-D mask, flash attention
    takes it for a padding mask, and it is O(T²)).

    Padding positions attend to themselves only, so no softmax row is empty (an empty row
    gives NaN, and NaN times a zero loss weight is still NaN).
    """
    B, T = doc_ids.shape
    real = doc_ids >= 0
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & real[:, :, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    return ((same & causal) | eye)[:, None]


def make_batch(rows: PackedRows, index: torch.Tensor) -> dict[str, torch.Tensor]:
    doc_ids = rows.doc_ids[index]
    return {
        "row_index": index,
        "doc_ids": doc_ids,
        "input_ids": rows.input_ids[index],
        "position_ids": rows.position_ids[index],
        "target_ids": rows.target_ids[index],
        "target_weights": rows.target_weights[index],
    }


class BatchPlan:
    """Which rows each rank uses at each micro-step: a pure function of (seed, step).

    Resuming at step s needs no iterator state — the data position *is* the step. The
    global batch of a step is the same whatever the number of ranks, so 1 process with
    accumulation 2 and 2 processes with accumulation 1 see the same rows.
    """

    def __init__(self, n_rows: int, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.n_rows, self.micro, self.accum, self.world, self.seed = n_rows, micro_batch, grad_accum, world_size, seed
        self.global_batch = micro_batch * grad_accum * world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_rows, generator=g)}
        return self._perms[epoch]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n_rows

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """Row indices for each of this rank's micro-batches at optimizer step ``step``."""
        out = []
        for a in range(self.accum):
            start = step * self.global_batch + a * self.micro * self.world + rank * self.micro
            g = torch.arange(start, start + self.micro)
            idx = torch.stack([self._perm(int(i) // self.n_rows)[int(i) % self.n_rows] for i in g])
            out.append(idx)
        return out

    def all_micro_batches(self, step: int) -> list[list[torch.Tensor]]:
        return [self.micro_batches(step, r) for r in range(self.world)]
