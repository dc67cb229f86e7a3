"""Teachers for distillation: live (same process), cached top-k, and on-policy samples.

* ``LiveTeacher`` runs the teacher under ``no_grad`` in its own dtype (optionally 4-bit) and
  hands the student's loss its final hidden states plus lm_head weight, so the teacher's
  logits too are only ever made chunk by chunk.
* ``TeacherCache`` runs the teacher once over the packed rows and stores its top-k
  log-probs (fp16 values, int32 ids) in sharded safetensors with an ``index.json``. The cache
  directory is named by a hash of teacher weights + its dtype and quantization + tokenizer +
  data + k, so a cache is never reused for another teacher load or other data; every shard carries its sha256, so a corrupt shard is caught.
  Building is resumable: finished shards are kept when the build is killed and rerun.
* ``on_policy_rows`` makes GKD-style batches: the student continues the batch's prompts and
  the teacher then scores the student's own tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..train.config import CogcoreError
from ..train.data import Document, PackedRows, make_batch, pack
from ..train.lm import decoder_hidden, output_weight

# ----------------------------------------------------------------------------- tokenizers

def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token]
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()


def check_same_tokenizer(teacher_tok, student_tok, teacher_model=None, student_model=None,
                         names=("teacher", "student")) -> None:
    """Distillation compares distributions token by token: both must share one vocabulary
    (and, when the models are given, one output size)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        moved = sum(1 for k in set(tv) & set(sv) if tv[k] != sv[k])
        raise CogcoreError(
            f"the {names[0]} and {names[1]} tokenizers differ ({len(tv)} vs {len(sv)} tokens; {only_t} only in the "
            f"{names[0]}, {only_s} only in the {names[1]}, {moved} with other ids). Token-level distillation needs one "
            "vocabulary: build the student from the teacher (student.init=prune) or pick a student of the same family.")
    if teacher_model is None or student_model is None:
        return
    vt = output_weight(teacher_model).shape[0]
    vs = output_weight(student_model).shape[0]
    if vt != vs:
        raise CogcoreError(f"the {names[0]} has {vt} output logits and the {names[1]} {vs}; they must match "
                           "(resize the student's embeddings to the teacher's).")


# ----------------------------------------------------------------------------- live

class LiveTeacher:
    """The teacher in the same process: frozen, no grad, its own dtype."""

    def __init__(self, model):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return output_weight(self.model)

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        return decoder_hidden(self.model, batch)

    def attach(self, batch: dict) -> dict:
        batch = dict(batch)
        batch["teacher_hidden"] = self.hidden(batch)
        return batch

    @torch.no_grad()
    def topk(self, batch: dict, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, k) int32 ids and fp16 log-probs of the teacher's full softmax."""
        h = self.hidden(batch)
        B, T, H = h.shape
        flat = h.reshape(-1, H)
        ids, vals = [], []
        for s in range(0, flat.shape[0], chunk):
            logp = torch.log_softmax((flat[s:s + chunk] @ self.weight.T).float(), dim=-1)
            v, i = logp.topk(k, dim=-1)
            ids.append(i.to(torch.int32))
            vals.append(v.to(torch.float16))
        return torch.cat(ids).reshape(B, T, k), torch.cat(vals).reshape(B, T, k)


# ----------------------------------------------------------------------------- cache

def rows_fingerprint(rows: PackedRows) -> str:
    h = hashlib.sha256()
    for t in (rows.input_ids, rows.position_ids, rows.doc_ids):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher_hash: str, tok_fp: str, rows: PackedRows, k: int, teacher_load: str = "") -> str:
    """Everything a cache's contents depend on: teacher weights, how they were loaded (dtype,
    quantization: a bf16 or 4-bit teacher ranks its top-k differently), tokenizer, rows, k."""
    load = f"|{teacher_load}" if teacher_load else ""
    return hashlib.sha256(f"{teacher_hash}|{tok_fp}|{rows_fingerprint(rows)}|k={k}{load}".encode()).hexdigest()


def teacher_load_key(spec) -> str:
    """How a teacher ModelSpec is loaded, as part of a cache key."""
    return f"dtype={spec.dtype}|quantize={spec.quantize}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TeacherCache:
    """Top-k teacher log-probs for every position of every packed row, sharded on disk."""

    root: Path
    key: str
    n_rows: int
    seq_len: int
    k: int
    shard_rows: int

    INDEX = "index.json"

    @classmethod
    def location(cls, cache_root: Path, key: str) -> Path:
        return Path(cache_root) / key[:24]

    @classmethod
    def open(cls, cache_root: Path, key: str, rows: PackedRows, k: int) -> TeacherCache:
        """Open a complete cache for exactly these rows; explain what to do otherwise."""
        root = cls.location(cache_root, key)
        index = root / cls.INDEX
        if not index.is_file():
            raise CogcoreError(f"no teacher cache for this teacher + data + k={k} (looked in {root}). "
                               "Build it first with `cogcore distill cache` and the same config.")
        meta = json.loads(index.read_text())
        if meta.get("key") != key or meta.get("n_rows") != len(rows) or meta.get("k") != k:
            raise CogcoreError(f"the teacher cache in {root} was made for other data or settings "
                               f"(key {meta.get('key', '?')[:12]} vs {key[:12]}); rebuild it with `cogcore distill cache`.")
        if not meta.get("complete"):
            raise CogcoreError(f"the teacher cache in {root} is incomplete (the build was interrupted); "
                               "rerun `cogcore distill cache` to finish it.")
        cache = cls(root, key, meta["n_rows"], meta["seq_len"], meta["k"], meta["shard_rows"])
        cache._meta = meta
        return cache

    @classmethod
    def build(cls, cache_root: Path, key: str, rows: PackedRows, teacher, k: int,
              micro_batch: int = 8, shard_rows: int = 256, device=torch.device("cpu"), progress: bool = True,
              extra_meta: dict | None = None) -> TeacherCache:
        """Run the teacher over ``rows`` once; resumable (finished, verified shards are kept).

        ``teacher`` is a :class:`LiveTeacher` or a function returning one (called only if a
        shard is missing or corrupt).
        """
        root = cls.location(cache_root, key)
        root.mkdir(parents=True, exist_ok=True)
        index = root / cls.INDEX
        meta = json.loads(index.read_text()) if index.is_file() else {}
        if meta and (meta.get("key") != key or meta.get("shard_rows") != shard_rows):
            meta = {}
        meta.update({"key": key, "n_rows": len(rows), "seq_len": rows.input_ids.shape[1], "k": k,
                     "shard_rows": shard_rows, "complete": False, **(extra_meta or {})})
        shards = meta.setdefault("shards", {})
        n_shards = (len(rows) + shard_rows - 1) // shard_rows
        todo = []
        for s in range(n_shards):
            entry = shards.get(str(s))
            path = root / f"shard-{s:05d}.safetensors"
            if entry and path.is_file() and _sha256(path) == entry["sha256"]:
                continue
            todo.append(s)
        if todo and callable(teacher) and not isinstance(teacher, LiveTeacher):
            teacher = teacher()  # load the teacher only when some shard needs it
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm
            bar = tqdm(total=sum(min(shard_rows, len(rows) - s * shard_rows) for s in todo), desc="teacher cache",
                       unit="row", dynamic_ncols=True)
        for s in todo:
            lo, hi = s * shard_rows, min(len(rows), (s + 1) * shard_rows)
            ids_parts, lp_parts = [], []
            for b in range(lo, hi, micro_batch):
                idx = torch.arange(b, min(hi, b + micro_batch))
                batch = {k_: v.to(device) if torch.is_tensor(v) else v for k_, v in make_batch(rows, idx).items()}
                ids, lp = teacher.topk(batch, k)
                ids_parts.append(ids.cpu())
                lp_parts.append(lp.cpu())
                if bar is not None:
                    bar.update(len(idx))
            path = root / f"shard-{s:05d}.safetensors"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"ids": torch.cat(ids_parts), "logprobs": torch.cat(lp_parts)}, str(tmp),
                      metadata={"rows": f"{lo}:{hi}", "key": key})
            tmp.replace(path)  # atomic: a killed build never leaves a half-written shard
            shards[str(s)] = {"file": path.name, "rows": [lo, hi], "sha256": _sha256(path)}
            _write_json(index, meta)
        if bar is not None:
            bar.close()
        meta["complete"] = True
        _write_json(index, meta)
        return cls.open(cache_root, key, rows, k)

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        loaded = getattr(self, "_loaded", None)
        if loaded is None:
            loaded = self._loaded = {}
        if s not in loaded:
            entry = self._meta["shards"].get(str(s))
            path = self.root / f"shard-{s:05d}.safetensors"
            if entry is None or not path.is_file():
                raise CogcoreError(f"teacher cache shard {path} is missing; rerun `cogcore distill cache` to rebuild it")
            if _sha256(path) != entry["sha256"]:
                raise CogcoreError(f"teacher cache shard {path} is corrupt (its sha256 does not match index.json); "
                                   "rerun `cogcore distill cache`, which rebuilds corrupt shards")
            loaded[s] = load_file(str(path))
        return loaded[s]

    def lookup(self, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lps = [], []
        for r in row_index.tolist():
            sh = self._shard(r // self.shard_rows)
            ids.append(sh["ids"][r % self.shard_rows])
            lps.append(sh["logprobs"][r % self.shard_rows])
        return torch.stack(ids).long(), torch.stack(lps)

    def attach(self, batch: dict) -> dict:
        batch = dict(batch)
        ids, lps = self.lookup(batch["row_index"].cpu())
        dev = batch["input_ids"].device
        batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = ids.to(dev), lps.to(dev)
        return batch


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------- on-policy

def prompt_of(doc: Document) -> list[int]:
    """The tokens before the first trained token (the prompt of a prompt/completion doc)."""
    first = next((i for i, w in enumerate(doc.weights) if w > 0), len(doc.weights))
    return doc.input_ids[:max(1, first)]


@torch.no_grad()
def on_policy_rows(student, tokenizer, prompts: list[list[int]], seq_len: int, max_new_tokens: int,
                   temperature: float, device) -> PackedRows:
    """The student continues each prompt; rows train on the student's own tokens (weight 1)."""
    was_training = student.training
    student.eval()
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: generation continues from the right edge
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=temperature > 0,
                           temperature=max(temperature, 1e-5), top_k=0, max_new_tokens=max_new_tokens,
                           pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    student.train(was_training)
    docs = []
    for i, p in enumerate(prompts):
        gen = out[i, width:].tolist()
        if tokenizer.eos_token_id in gen:
            gen = gen[: gen.index(tokenizer.eos_token_id) + 1]
        gen = gen or [tokenizer.eos_token_id]
        full = (p + gen)[:seq_len]
        docs.append(Document(full, [0.0] * len(p) + [1.0] * (len(full) - len(p))))
    return pack(docs, seq_len, pad, packing=False)
