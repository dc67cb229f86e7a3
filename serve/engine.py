"""The serving engine: one base model, many users' LoRA adapters, one forward per decode step.

No HTTP here. An :class:`Engine` owns the running batch, its KV cache and the decode loop
(one background thread); requests come in through :meth:`Engine.submit` and their text
comes back as :class:`Delta` events through a sink the caller chooses (a queue for
blocking callers, ``loop.call_soon_threadsafe`` for asyncio).

Mixed-adapter batching. The base model's linear layers are wrapped once by
``kernels.lora.apply_multi_lora`` with ``adapters_on_device`` slots of rank ``max_rank``
(an adapter of lower rank is zero-padded; each slot has its own alpha/r scale per layer).
Every row of the batch carries the slot of its adapter (-1 = the plain core), so one forward
serves every user at once through the gathered LoRA op.

Continuous batching. The batch's KV cache is left-padded: row i's tokens sit at the right end
of the time axis, a 2-D attention mask hides the padding and explicit position ids keep each
row's positions its own. Between two decode steps, newly admitted requests are prefilled
together (left-padded among themselves), their first token sampled, and their cache merged
into the batch by padding the shorter side on the left. Finished rows are dropped and
all-padding columns trimmed. A row's numbers are therefore those of the same request served
alone up to float rounding, which the tests check token for token.

    loop:  expire/cancel  ->  admit waiting (adapter on device or loadable into a free slot)
           ->  prefill the admitted, merge caches  ->  one decode step for all rows  ->  stop checks
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cogcore.kernels.lora import DEFAULT_TARGETS, MultiLoRALinear, apply_multi_lora
from cogcore.lora.registry import CONFIG, AdapterArtifact, AdapterRegistry
from cogcore.train.config import CogcoreError
from cogcore.train.config import field as cfg_field
from cogcore.train.model import ModelSpec, load_model, load_tokenizer, plain_head_input

from .adapters import AdapterCache, AdapterRef, ModelTarget

log = logging.getLogger("cogcore.serve")

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class QueueFull(CogcoreError):
    """The waiting queue is at its limit (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(CogcoreError):
    """A request ran past its timeout (HTTP 504)."""


class BadRequest(CogcoreError):
    """A request the engine cannot serve as asked (HTTP 400)."""


@dataclass
class EngineConfig:
    """How the engine batches and where adapters live."""

    model: ModelSpec = cfg_field(default_factory=ModelSpec, help="the base model (the core)")
    device: str = cfg_field("cpu", help="torch device for the model and the device adapter slots")
    max_batch: int = cfg_field(32, help="most requests decoded together in one forward")
    max_queue: int = cfg_field(64, help="most requests waiting for a batch row; more are refused (HTTP 429)")
    adapters_on_device: int = cfg_field(8, help="adapter slots on the device (the LoRA stack's first dimension)")
    cpu_adapters: int = cfg_field(64, help="adapters kept in CPU memory (LRU) behind the device slots")
    cpu_adapter_mb: float = cfg_field(0.0, help="byte limit of the CPU tier in MiB (0 = count limit only)")
    max_rank: int = cfg_field(0, help="LoRA rank of the device slots; 0 = the largest rank in the registry "
                                     "(16 when it is empty). Adapters of higher rank are refused")
    target_modules: list[str] = cfg_field(default_factory=list, help="linear layers that get adapter slots; "
                                          "empty = q/k/v/o/gate/up/down plus whatever the registry's adapters target")
    prefill_tokens: int = cfg_field(4096, help="most (padded) prompt tokens prefilled in one forward")
    request_timeout: float = cfg_field(120.0, help="seconds a request may take from arrival to its last token")
    max_tokens_limit: int = cfg_field(2048, help="largest max_tokens a request may ask for")
    lora_impl: str = cfg_field("auto", help="gathered LoRA implementation: auto, torch, loop, triton")
    load_threads: int = cfg_field(2, help="background threads loading adapters from the registry")

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "adapters_on_device", "cpu_adapters", "prefill_tokens", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise CogcoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_rank < 0:
            raise CogcoreError(f"max_rank must be >= 0, got {self.max_rank}")
        if self.request_timeout <= 0:
            raise CogcoreError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")


@dataclass
class GenerationRequest:
    """One completion: token ids in, sampling parameters, where it may stop."""

    prompt_ids: list[int]
    target: ModelTarget | None = None  # None = the plain core
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    timeout: float | None = None  # None = the engine's request_timeout
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks; vLLM's option)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def adapter(self) -> AdapterRef | None:
        return self.target.adapter if self.target else None


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    adapter: str  # "core" or "user@vN"
    queued_s: float  # arrival -> admitted into the batch
    first_token_s: float  # arrival -> first token
    total_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """What the engine reports: new text; on the last one `done` with a result or an error."""

    text: str = ""
    done: bool = False
    result: GenerationResult | None = None
    error: BaseException | None = None


class RequestHandle:
    """A submitted request: iterate for its Deltas, `result()` to wait, `cancel()` to drop it."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Delta], None] | None = None):
        self.request = request
        self.id = request.request_id
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = self._queue.put
        self._sink = sink
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, delta: Delta) -> None:
        if delta.done:
            self._result, self._error = delta.result, delta.error
            self._done.set()
        try:
            self._sink(delta)
        except RuntimeError:  # the receiving event loop is closed: the client is gone
            self.cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def __iter__(self):
        if self._queue is None:
            raise RuntimeError("this handle reports to a custom sink; iterate that instead")
        while True:
            d = self._queue.get()
            yield d
            if d.done:
                return


@dataclass
class PreparedAdapter:
    """An adapter in the layout the device slots take: per wrapped layer, A (r, d_in),
    B (d_out, r) and its scale (alpha / r, or alpha / sqrt(r) with rsLoRA)."""

    name: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    nbytes: int


@dataclass
class _Row:
    handle: RequestHandle
    slot: int
    arrived: float
    deadline: float
    admitted: float = 0.0
    first_token: float = 0.0
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    generator: torch.Generator | None = None
    load: object = None  # Future of the PreparedAdapter while waiting

    @property
    def req(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    """Base model + adapter slots + the decode loop. Thread-safe `submit`; call `start()` (or use
    `with Engine(...) as e:`) to run the loop in its thread, `stop()` to end it."""

    def __init__(self, cfg: EngineConfig, registry: AdapterRegistry | None = None, *, model=None, tokenizer=None):
        self.cfg = cfg
        self.registry = registry if registry is not None else AdapterRegistry()
        self.device = torch.device(cfg.device)
        self.model = model if model is not None else load_model(cfg.model, device=self.device)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        self.base_hash = getattr(self.model, "base_hash", None)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        rank, targets = self._slot_shape()
        self.max_rank = rank
        self.patch = apply_multi_lora(self.model, cfg.adapters_on_device, rank, targets, impl=cfg.lora_impl)
        with torch.no_grad():  # empty slots: zero (a fresh MultiLoRALinear has random A)
            for layer in self.patch.layers.values():
                layer.lora_A.zero_()
                layer.lora_B.zero_()
                layer._row_index = _shared_row_index(layer)
        self.target_modules = sorted({n.rpartition(".")[2] for n in self.patch.layers})
        plain_head_input(self.model)  # a model passed in was not loaded by load_model
        self.stop_token_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._cv = threading.Condition()
        self.cache = AdapterCache(self.registry, self.base_hash, device_slots=cfg.adapters_on_device,
                                  cpu_adapters=cfg.cpu_adapters, cpu_bytes=int(cfg.cpu_adapter_mb * 2**20),
                                  prepare=self.prepare_adapter, on_loaded=self._wake, load_threads=cfg.load_threads)
        self._waiting: list[_Row] = []
        self._rows: list[_Row] = []
        self._kv = None  # DynamicCache of the running batch (B, H, T, D) per layer
        self._mask = None  # (B, T) long, 1 = real token
        self._pos = None  # (B,) position of the next token
        self._last = None  # (B,) token fed at the next step
        self._idx = None  # (B,) adapter slot per row, -1 = core
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitted: list[_Row] = []  # admitted this step, not yet in the batch
        self._holds = 0  # > 0: admit nothing (see hold())
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.counters = {"requests": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0, "prompt_tokens": 0,
                         "generated_tokens": 0, "decode_steps": 0, "decode_rows": 0, "prefills": 0,
                         "max_running": 0}
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps: throughput for Retry-After

    # ------------------------------------------------------------------ setup

    def _slot_shape(self) -> tuple[int, list[str]]:
        """Rank and target layers of the device slots: configured, else what the registry holds."""
        ranks, targets = [], set(DEFAULT_TARGETS)
        for art in self.registry.list():
            cfg = _peft_config(art)
            ranks.append(int(cfg.get("r") or 0))
            ranks.extend(int(v) for v in (cfg.get("rank_pattern") or {}).values())
            tm = cfg.get("target_modules") or []
            targets.update([tm] if isinstance(tm, str) else tm)
        rank = self.cfg.max_rank or max(ranks + [16])
        if self.cfg.target_modules:
            targets = set(self.cfg.target_modules)
        present = {n.rpartition(".")[2] for n, m in self.model.named_modules() if hasattr(m, "in_features")}
        chosen = sorted(targets & present)
        if not chosen:
            raise CogcoreError(f"none of the target modules {sorted(targets)} is a linear layer of this model "
                               f"(it has {sorted(present)})")
        return rank, chosen

    def _stop_ids(self) -> set[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None),
                    getattr(self.model.config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        vocab = self.tokenizer.get_vocab()
        specials = set(self.tokenizer.all_special_tokens)
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in specials)
        return ids

    def prepare_adapter(self, art: AdapterArtifact, weights: dict[str, torch.Tensor]) -> PreparedAdapter:
        """PEFT tensors -> per-layer (A, B, scale), checked against this server's slots (runs in a load thread)."""
        cfg = _peft_config(art)
        if cfg.get("use_dora"):
            raise CogcoreError(f"adapter {art.name} is a DoRA adapter; the server serves plain LoRA only: "
                               "refresh it with use_dora=false")
        alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 1)
        rslora = bool(cfg.get("use_rslora"))
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in weights.items():
            name = key.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], {})[part] = t
                    break
            else:
                raise CogcoreError(f"adapter {art.name} holds {key!r}, which the server cannot apply (only lora_A / "
                                   "lora_B weights of linear layers are served)")
        layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        rank, nbytes = 0, 0
        dtype = next(iter(self.patch.layers.values())).lora_A.dtype
        for module, ab in pairs.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise CogcoreError(f"adapter {art.name}: {module} has {sorted(ab)} but needs both lora_A and lora_B")
            layer = self.patch.layers.get(module)
            if layer is None:
                missing = sorted({m.rpartition(".")[2] for m in pairs if m not in self.patch.layers})
                raise CogcoreError(f"adapter {art.name} adapts {', '.join(missing)}, which have no adapter slot on this "
                                   f"server (slots on {', '.join(self.target_modules)}): restart the server with "
                                   f"--target-modules {','.join(sorted(set(self.target_modules) | set(missing)))}")
            A, B = ab["lora_A"], ab["lora_B"]
            r = A.shape[0]
            if r > self.max_rank:
                raise CogcoreError(f"adapter {art.name} has rank {r}, above the server's slot rank {self.max_rank}: "
                                   f"restart the server with --max-rank {r} or higher")
            if A.shape != (r, layer.in_features) or B.shape != (layer.out_features, r):
                raise CogcoreError(f"adapter {art.name}: {module} weights A {tuple(A.shape)} / B {tuple(B.shape)} do "
                                   f"not fit the layer ({layer.in_features} -> {layer.out_features})")
            a = float(_pattern(alpha_pattern, module, alpha))
            r_cfg = int(_pattern(rank_pattern, module, r))
            scale = a / math.sqrt(r_cfg) if rslora else a / r_cfg
            layers[module] = (A.to(dtype).contiguous(), B.to(dtype).contiguous(), scale)
            rank = max(rank, r)
            nbytes += (A.numel() + B.numel()) * A.element_size()
        if not layers:
            raise CogcoreError(f"adapter {art.name} holds no LoRA weights")
        return PreparedAdapter(art.name, rank, layers, nbytes)

    def _write_slot(self, slot: int, prepared: PreparedAdapter) -> None:
        """Copy an adapter into device slot `slot` of every wrapped layer (engine thread, between steps)."""
        with torch.no_grad():
            for name, layer in self.patch.layers.items():
                entry = prepared.layers.get(name)
                if entry is None:  # a layer this adapter does not adapt: zero delta
                    layer.lora_A[slot].zero_()
                    layer.lora_B[slot].zero_()
                else:
                    A, B, scale = entry
                    layer.set_adapter_weights(slot, A.to(layer.lora_A.device), B.to(layer.lora_B.device), scale)

    # ------------------------------------------------------------------ public API

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="cogcore-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.cache.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def hold(self):
        """Admit no new request inside this block (running rows keep decoding): requests submitted
        in it start together, in one prefill and one batch."""
        with self._cv:
            self._holds += 1
        try:
            yield self
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()

    def resolve(self, model: str) -> ModelTarget:
        """`core`, `core:<user>` (LIVE version, now) or `<user>@vN` -> what a request runs on."""
        return self.cache.resolve(model)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def retry_after(self) -> float:
        """Seconds until a queue place is likely free: queue length over recent finishes per second."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 10]
        rate = sum(n for _, n in recent) / 10 if recent else 0.0
        return max(1.0, min(60.0, (len(self._waiting) / rate) if rate > 0 else 5.0))

    def full(self) -> bool:
        """Whether a request submitted now would be refused (checked again, exactly, in submit)."""
        return len(self._waiting) - max(0, self.cfg.max_batch - len(self._rows)) >= self.cfg.max_queue

    def busy_error(self) -> QueueFull:
        self.counters["rejected"] += 1
        return QueueFull(f"the server is busy: {len(self._rows)} requests decoding and {len(self._waiting)} "
                         f"waiting (limit {self.cfg.max_queue}); retry later", self.retry_after())

    def submit(self, request: GenerationRequest, sink: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Queue a request; raises BadRequest (400) or QueueFull (429) at once, else returns its handle."""
        self._check(request)
        handle = RequestHandle(request, sink)
        now = time.monotonic()
        timeout = request.timeout if request.timeout is not None else self.cfg.request_timeout
        row = _Row(handle, -1, now, now + timeout)
        if request.temperature > 0:
            row.generator = torch.Generator().manual_seed(
                request.seed if request.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "little"))
        with self._cv:
            if self.full():  # a free batch row takes a request at the next step: only the excess queues
                raise self.busy_error()
            self._waiting.append(row)
            self.counters["requests"] += 1
            self._cv.notify_all()
        ref = request.adapter
        if ref is not None and self.cache.device_slot_peek(ref) is None:
            row.load = self.cache.fetch(ref)  # start the load now, off the engine thread
        return handle

    def generate(self, prompt: str | list[int], model: str = "core", **params) -> GenerationResult:
        """Blocking convenience: one completion for a prompt (text or token ids)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        return self.submit(GenerationRequest(ids, self.resolve(model), **params)).result()

    def _check(self, r: GenerationRequest) -> None:
        if not r.prompt_ids:
            raise BadRequest("the prompt is empty")
        if not 1 <= r.max_tokens <= self.cfg.max_tokens_limit:
            raise BadRequest(f"max_tokens must be between 1 and {self.cfg.max_tokens_limit}, got {r.max_tokens}")
        if len(r.prompt_ids) >= self.max_positions:
            raise BadRequest(f"the prompt has {len(r.prompt_ids)} tokens; this model's context holds "
                             f"{self.max_positions}: shorten it")
        if not (0 <= r.temperature <= 2):
            raise BadRequest(f"temperature must be between 0 and 2, got {r.temperature}")
        if not (0 < r.top_p <= 1):
            raise BadRequest(f"top_p must be in (0, 1], got {r.top_p}")
        vocab = self.model.config.vocab_size
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab:
            raise BadRequest(f"prompt token ids must be in [0, {vocab})")

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._rows and not self._ready_to_admit():
                    self._cv.wait(timeout=0.05)
                    self._expire_waiting()
                if self._stopping:
                    break
            self._admitted = []
            try:
                with torch.no_grad():  # not inference_mode: the LoRA plan cache reads tensor versions
                    self._step()
            except Exception as e:  # a bug or OOM: fail what is in flight, keep serving
                log.exception("engine step failed")
                for row in self._rows + self._admitted:
                    self._finish(row, error=CogcoreError(f"the engine failed during decoding: {e!r}"))
                self._reset_batch()
            self._admitted = []
        for row in self._rows + self._waiting:
            self._finish(row, error=CogcoreError("the server is shutting down"))
        self._rows, self._waiting = [], []

    def _ready_to_admit(self) -> bool:
        if self._holds:
            return False
        for row in self._waiting:
            if row.handle.cancelled or row.req.adapter is None or row.load is None or row.load.done():
                return True
            if self.cache.device_slot_peek(row.req.adapter) is not None:
                return True
        return False

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for row in list(self._waiting):
            if row.handle.cancelled or now > row.deadline:
                self._waiting.remove(row)
                self._finish(row, error=None if row.handle.cancelled else RequestTimeout(
                    f"request timed out after {now - row.arrived:.1f} s waiting for a batch row"))

    def _step(self) -> None:
        now = time.monotonic()
        for row in list(self._rows):  # cancelled / timed-out running rows
            if row.handle.cancelled or now > row.deadline:
                self._finish(row, error=None if row.handle.cancelled else RequestTimeout(
                    f"request timed out after {now - row.arrived:.1f} s ({len(row.tokens)} tokens generated)"))
        self._drop_finished()
        with self._cv:
            self._expire_waiting()
            admitted = self._admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._decode()

    def _admit(self) -> list[_Row]:
        """Waiting rows that can run now (FIFO, skipping those whose adapter is still loading)."""
        admitted: list[_Row] = []
        if self._holds:
            return admitted
        free_rows = self.cfg.max_batch - len(self._rows)
        budget = self.cfg.prefill_tokens
        longest = 0
        for row in list(self._waiting):
            if len(admitted) >= free_rows:
                break
            longest_next = max(longest, len(row.req.prompt_ids))
            if admitted and longest_next * (len(admitted) + 1) > budget:
                break
            ref = row.req.adapter
            if ref is not None:
                slot = self.cache.device_slot(ref)
                if slot is None:
                    if row.load is None:
                        row.load = self.cache.fetch(ref)
                    if not row.load.done():
                        continue  # its own load is still running; others go ahead
                    err = row.load.exception()
                    if err is not None:
                        self._waiting.remove(row)
                        self._finish(row, error=err)
                        continue
                    slot = self.cache.place(ref, row.load.result(), self._write_slot)
                    if slot is None:
                        continue  # every slot is in use by running rows
                row.slot = slot
            row.load = None
            row.admitted = time.monotonic()
            self._waiting.remove(row)
            admitted.append(row)
            longest = longest_next
        return admitted

    def _set_index(self, idx: torch.Tensor) -> None:
        self.patch.set_adapter_index(idx if bool((idx >= 0).any()) else None)

    def _prefill(self, rows: list[_Row]) -> None:
        """Prefill newly admitted rows together (left-padded), sample their first token, merge."""
        from transformers import DynamicCache

        n, L = len(rows), max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, L, dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.req.prompt_ids
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        idx = torch.tensor([r.slot for r in rows], dtype=torch.long, device=self.device)
        self._set_index(idx)
        kv = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: kv})
        if not bool(mask.all()):  # padding positions: zero K/V so no NaN can leak through a 0 weight
            pad = (mask == 0)[:, None, :, None]
            for layer in kv.layers:
                layer.keys.masked_fill_(pad, 0.0)
                layer.values.masked_fill_(pad, 0.0)
        self.counters["prefills"] += 1
        self.counters["prompt_tokens"] += int(mask.sum())
        tokens = self._sample(out.logits[:, -1, :], rows)
        for r in rows:
            r.first_token = time.monotonic()
        self._merge(rows, kv, mask, pos[:, -1] + 1, tokens, idx)
        self._after_tokens(rows, tokens)

    def _merge(self, rows, kv, mask, next_pos, last, idx) -> None:
        from transformers import DynamicCache

        if not self._rows:
            self._rows, self._kv, self._mask, self._pos, self._last, self._idx = list(rows), kv, mask, next_pos, last, idx
            return
        T1, T2 = self._mask.shape[1], mask.shape[1]
        T = max(T1, T2)
        layers = []
        for old, new in zip(self._kv.layers, kv.layers):
            k = torch.cat([F.pad(old.keys, (0, 0, T - T1, 0)), F.pad(new.keys, (0, 0, T - T2, 0))], 0)
            v = torch.cat([F.pad(old.values, (0, 0, T - T1, 0)), F.pad(new.values, (0, 0, T - T2, 0))], 0)
            layers.append((k, v))
        self._kv = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([F.pad(self._mask, (T - T1, 0)), F.pad(mask, (T - T2, 0))], 0)
        self._pos = torch.cat([self._pos, next_pos])
        self._last = torch.cat([self._last, last])
        self._idx = torch.cat([self._idx, idx])
        self._rows.extend(rows)

    def _decode(self) -> None:
        """One forward for every running row, whatever its adapter."""
        B = len(self._rows)
        self.counters["max_running"] = max(self.counters["max_running"], B)
        self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], 1)
        self._set_index(self._idx)
        out = self.model(input_ids=self._last[:, None], attention_mask=self._mask, position_ids=self._pos[:, None],
                         use_cache=True, **{self._cache_kw: self._kv})
        self._pos = self._pos + 1
        tokens = self._sample(out.logits[:, -1, :], self._rows)
        self._last = tokens
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += B
        self._after_tokens(self._rows, tokens)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Greedy rows by argmax; the others by temperature / top-p with their own generator."""
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.req.temperature > 0]
        if sampled:
            tokens = tokens.cpu()
            for i in sampled:
                r = rows[i].req
                probs = torch.softmax(logits[i].float().cpu() / r.temperature, -1)
                if r.top_p < 1:
                    sp, order = probs.sort(descending=True)
                    keep = sp.cumsum(0) - sp < r.top_p  # smallest prefix whose mass reaches top_p
                    probs = torch.zeros_like(probs).scatter_(0, order[keep], sp[keep])
                tokens[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
            tokens = tokens.to(logits.device)
        return tokens

    def _after_tokens(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Append each row's new token, stream its text, finish the rows that stop here."""
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t < 10]
        for row, t in zip(list(rows), tokens.tolist()):
            if row.handle.done():
                continue
            req = row.req
            if t in self.stop_token_ids and not req.ignore_eos:
                self._finish(row, "stop")
                continue
            row.tokens.append(t)
            self.counters["generated_tokens"] += 1
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            reason = None
            if req.stop:
                start = max(0, row.emitted - max(len(s) for s in req.stop))
                hits = [(text.find(s, start), s) for s in req.stop if s and text.find(s, start) >= 0]
                if hits:
                    text = text[: min(hits)[0]]
                    reason = "stop"
            if reason is None and (len(row.tokens) >= req.max_tokens or
                                   len(req.prompt_ids) + len(row.tokens) >= self.max_positions):
                reason = "length"
            if reason is None:
                safe = len(text) - _holdback(text, req.stop)
                if safe > row.emitted:
                    row.handle._emit(Delta(text[row.emitted:safe]))
                    row.emitted = safe
            else:
                self._finish(row, reason, text)
        self._drop_finished()

    def _finish(self, row: _Row, reason: str | None = None, text: str | None = None,
                error: BaseException | None = None) -> None:
        if row.handle.done():
            return
        if row.slot >= 0 and row.req.adapter is not None:
            self.cache.release(row.req.adapter)
            row.slot = -1
        now = time.monotonic()
        if error is not None or reason is None:
            self.counters["failed" if error is not None else "cancelled"] += 1
            row.handle._emit(Delta(done=True, error=error or CogcoreError("cancelled")))
            return
        if text is None:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        self.counters["finished"] += 1
        self._recent.append((now, 1))
        result = GenerationResult(row.handle.id, text, list(row.tokens), reason, len(row.req.prompt_ids),
                                  row.req.target.adapter_name if row.req.target else "core",
                                  row.admitted - row.arrived, (row.first_token or now) - row.arrived, now - row.arrived)
        row.handle._emit(Delta(text[row.emitted:], done=True, result=result))
        row.emitted = len(text)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.handle.done()]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        sel = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._pos, self._last, self._idx = (t.index_select(0, sel) for t in
                                                        (self._mask, self._pos, self._last, self._idx))
        first = int(self._mask.any(0).nonzero()[0])  # columns that are padding for every row left
        for layer in self._kv.layers:
            layer.keys = layer.keys.index_select(0, sel)[:, :, first:]
            layer.values = layer.values.index_select(0, sel)[:, :, first:]
        self._mask = self._mask[:, first:]

    def _reset_batch(self) -> None:
        self._rows = []
        self._kv = self._mask = self._pos = self._last = self._idx = None

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict:
        c = dict(self.counters)
        c["running"], c["waiting"] = self.running, self.waiting
        c["mean_batch"] = c["decode_rows"] / c["decode_steps"] if c["decode_steps"] else 0.0
        return c


def _shared_row_index(layer: MultiLoRALinear):
    """Per-instance override of MultiLoRALinear._row_index: a decode step's (B,) index goes to the
    kernel as the very tensor all layers share. The class method returns `idx.reshape(-1)`, a new
    tensor object per call, so the kernel's identity-keyed segment-plan cache missed in each of the
    L x 7 layers of every step (~0.2 ms each on CPU: ~45 ms a step on SmolLM2)."""
    def row_index(x: torch.Tensor) -> torch.Tensor:
        idx = layer.adapter_index
        if idx.dim() == 1 and idx.numel() * layer.in_features == x.numel():
            return idx
        return MultiLoRALinear._row_index(layer, x)
    return row_index


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not to stream yet: an incomplete UTF-8 character, or
    the start of a stop string that the next tokens may complete."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                hold = max(hold, k)
                break
    return hold


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the key that matches the module name's end."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _peft_config(art: AdapterArtifact) -> dict:
    """The adapter's full PEFT config (adapter_config.json), falling back to what cogcore.json records."""
    path = Path(art.path) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return dict(art.peft_config)


__all__ = ["BadRequest", "Delta", "Engine", "EngineConfig", "GenerationRequest", "GenerationResult", "PreparedAdapter",
           "QueueFull", "RequestHandle", "RequestTimeout"]
