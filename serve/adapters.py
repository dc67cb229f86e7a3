"""Adapters for serving, in three tiers: device slots <-> CPU memory <-> the registry on disk.

    registry (disk)  --load thread-->  CPU tier (LRU, count/bytes limit)  --engine thread-->  device slot
                                                                                              (LRU, pinned
                                                                                               while in use)

A model name a request gives resolves to an :class:`AdapterRef` (user, version) *once*, when
the request arrives; the request keeps that version until it finishes. ``core:<user>`` reads
the user's LIVE file, re-read only when its mtime/inode changes, so a publish or a rollback
reaches new requests without a restart while in-flight ones finish on their version.

Loading (read + sha256 + base-hash check in ``AdapterRegistry.load_weights``, then the
engine's ``prepare``) runs on background threads: a cold adapter's first request waits for its
own load only; the engine keeps decoding everyone else meanwhile. Device slots are written by
the engine thread between decode steps (``write(slot, prepared)``), never during a forward.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cogcore.lora.registry import LIVE, AdapterArtifact, AdapterRegistry, check_user
from cogcore.train.config import CogcoreError

CORE = "core"
_VERSIONED = re.compile(r"^(?P<user>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})@v(?P<version>\d+)$")


class UnknownModel(CogcoreError):
    """The requested model name is not `core`, `core:<user>` or a published `<user>@vN` (HTTP 404)."""


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version: what a request is pinned to from arrival to its last token."""

    user: str
    version: int

    @property
    def name(self) -> str:
        return f"{self.user}@v{self.version}"


@dataclass(frozen=True)
class ModelTarget:
    """What a request's `model` field resolved to: the user it belongs to (None for plain
    `core`) and the adapter version to run (None = the base model)."""

    model: str
    user: str | None
    adapter: AdapterRef | None

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter else CORE


def parse_model_name(model: str) -> tuple[str | None, int | None, bool]:
    """`core` -> (None, None, False); `core:alice` -> ("alice", None, True); `alice@v3` -> ("alice", 3, False).

    Raises UnknownModel for anything else.
    """
    if not isinstance(model, str) or not model:
        raise UnknownModel("model must be 'core', 'core:<user>' or '<user>@v<N>'")
    if model == CORE:
        return None, None, False
    if model.startswith(CORE + ":"):
        user = model[len(CORE) + 1:]
        try:
            check_user(user)
        except CogcoreError:
            raise UnknownModel(f"model {model!r}: {user!r} is not a valid user id") from None
        return user, None, True
    m = _VERSIONED.match(model)
    if m and ".." not in m.group("user"):
        return m.group("user"), int(m.group("version")), False
    raise UnknownModel(f"model {model!r} does not exist: use 'core', 'core:<user>' (the user's live adapter) "
                       "or '<user>@v<N>' (GET /v1/models lists them)")


@dataclass
class CacheStats:
    device_hits: int = 0  # a request's adapter was already in a device slot
    device_misses: int = 0  # ... had to be copied into a slot
    device_evictions: int = 0
    cpu_hits: int = 0  # a load found the adapter in CPU memory
    cpu_misses: int = 0  # ... read it from the registry on disk
    cpu_evictions: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0  # registry read + checks + prepare, summed over loads
    slot_write_seconds: float = 0.0  # CPU tier -> device slot copies, summed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _CpuEntry:
    prepared: object
    nbytes: int


@dataclass
class _Live:
    stamp: tuple | None
    version: int | None


def _nbytes(prepared) -> int:
    return int(getattr(prepared, "nbytes", 0))


class AdapterCache:
    """Tiered LRU adapter cache over an :class:`AdapterRegistry`.

    ``prepare(artifact, weights) -> prepared`` turns PEFT tensors into what the engine writes
    into a slot (and validates them against the model); ``on_loaded()`` is called from the load
    thread after each load (the engine wakes up to admit the waiting request).
    """

    def __init__(self, registry: AdapterRegistry, base_hash: str | None, *, device_slots: int,
                 cpu_adapters: int = 64, cpu_bytes: int = 0,
                 prepare: Callable[[AdapterArtifact, dict], object] | None = None,
                 on_loaded: Callable[[], None] | None = None, load_threads: int = 2):
        if device_slots < 1:
            raise CogcoreError(f"adapters on device must be >= 1, got {device_slots}")
        if cpu_adapters < 1:
            raise CogcoreError(f"CPU adapter cache size must be >= 1, got {cpu_adapters}")
        self.registry = registry
        self.base_hash = base_hash
        self.prepare = prepare or (lambda art, weights: weights)
        self.on_loaded = on_loaded or (lambda: None)
        self.cpu_adapters = cpu_adapters
        self.cpu_bytes = cpu_bytes
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._cpu: OrderedDict[AdapterRef, _CpuEntry] = OrderedDict()  # LRU: first = oldest
        self._loading: dict[AdapterRef, Future] = {}
        self._slots: list[AdapterRef | None] = [None] * device_slots
        self._device: OrderedDict[AdapterRef, int] = OrderedDict()  # ref -> slot, LRU order
        self._pins: dict[AdapterRef, int] = {}
        self._live: dict[str, _Live] = {}
        self._pool = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="adapter-load")

    # ------------------------------------------------------------------ names -> versions

    def live_version(self, user: str) -> int | None:
        """The user's LIVE version; the LIVE file is re-read only when its stat changes."""
        path = self.registry.root / user / LIVE
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            known = self._live.get(user)
            if known is not None and known.stamp == stamp and stamp is not None:
                return known.version
        version = self.registry.live_version(user) if stamp is not None else None
        with self._lock:
            self._live[user] = _Live(stamp, version)
        return version

    def resolve(self, model: str) -> ModelTarget:
        """The adapter version a request for `model` runs on, fixed now for its whole life.

        `core:<user>` for a user with nothing published yet serves the core itself (the user's
        personal core is the plain core until the first refresh).
        """
        user, version, live = parse_model_name(model)
        if user is None:
            return ModelTarget(model, None, None)
        if live:
            v = self.live_version(user)
            return ModelTarget(model, user, AdapterRef(user, v) if v is not None else None)
        ref = AdapterRef(user, version)
        with self._lock:
            known = ref in self._cpu or ref in self._device or ref in self._loading
        if not known:
            try:
                self.registry.get(user, version)
            except CogcoreError:
                have = ", ".join(a.name for a in self.registry.versions(user)) or "none"
                raise UnknownModel(f"model {model!r} does not exist (published versions of {user}: {have})") from None
        return ModelTarget(model, user, ref)

    # ------------------------------------------------------------------ CPU tier

    def fetch(self, ref: AdapterRef) -> Future:
        """A future of the prepared adapter: done at once from the CPU tier, else loaded in the background."""
        with self._lock:
            entry = self._cpu.get(ref)
            if entry is not None:
                self._cpu.move_to_end(ref)
                self.stats.cpu_hits += 1
                fut: Future = Future()
                fut.set_result(entry.prepared)
                return fut
            fut = self._loading.get(ref)
            if fut is not None:
                return fut
            self.stats.cpu_misses += 1
            fut = self._pool.submit(self._load, ref)
            self._loading[ref] = fut
            return fut

    def _load(self, ref: AdapterRef):
        t0 = time.perf_counter()
        try:
            art = self.registry.get(ref.user, ref.version)
            weights = self.registry.load_weights(art, self.base_hash)
            prepared = self.prepare(art, weights)
        except BaseException:
            with self._lock:
                self._loading.pop(ref, None)
                self.stats.load_errors += 1
            self.on_loaded()
            raise
        with self._lock:
            self._loading.pop(ref, None)
            self._cpu[ref] = _CpuEntry(prepared, _nbytes(prepared))
            self._cpu.move_to_end(ref)
            self._evict_cpu()
            self.stats.load_seconds += time.perf_counter() - t0
        self.on_loaded()
        return prepared

    def _evict_cpu(self) -> None:
        def over() -> bool:
            total = sum(e.nbytes for e in self._cpu.values())
            return len(self._cpu) > self.cpu_adapters or (self.cpu_bytes > 0 and total > self.cpu_bytes)
        while len(self._cpu) > 1 and over():
            self._cpu.popitem(last=False)
            self.stats.cpu_evictions += 1

    def preload(self, refs, wait: bool = True) -> list:
        """Load adapters into the CPU tier ahead of their first request."""
        futs = [self.fetch(r) for r in refs]
        return [f.result() for f in futs] if wait else futs

    # ------------------------------------------------------------------ device tier (engine thread)

    def device_slot_peek(self, ref: AdapterRef) -> int | None:
        """Slot holding `ref`, without pinning or counting."""
        with self._lock:
            return self._device.get(ref)

    def device_slot(self, ref: AdapterRef) -> int | None:
        """Slot already holding `ref` (pinned for the caller's request), or None."""
        with self._lock:
            slot = self._device.get(ref)
            if slot is None:
                return None
            self._device.move_to_end(ref)
            self._pins[ref] = self._pins.get(ref, 0) + 1
            self.stats.device_hits += 1
            return slot

    def place(self, ref: AdapterRef, prepared, write: Callable[[int, object], None]) -> int | None:
        """Copy `ref` into a free slot, or the least recently used unpinned one; pin it.

        None when every slot is pinned by running requests (the request waits).
        """
        with self._lock:
            slot = self._device.get(ref)
            if slot is not None:  # placed meanwhile by an earlier request of the same step
                return self.device_slot(ref)
            if None in self._slots:
                slot = self._slots.index(None)
            else:
                victim = next((r for r in self._device if self._pins.get(r, 0) == 0), None)
                if victim is None:
                    return None
                slot = self._device.pop(victim)
                self._slots[slot] = None
                self.stats.device_evictions += 1
            t0 = time.perf_counter()
            write(slot, prepared)
            self.stats.slot_write_seconds += time.perf_counter() - t0
            self._slots[slot] = ref
            self._device[ref] = slot
            self._pins[ref] = self._pins.get(ref, 0) + 1
            self.stats.device_misses += 1
            return slot

    def release(self, ref: AdapterRef) -> None:
        """A request on `ref` finished: its slot may be evicted again once no one uses it."""
        with self._lock:
            n = self._pins.get(ref, 0) - 1
            if n > 0:
                self._pins[ref] = n
            else:
                self._pins.pop(ref, None)

    def has_free_slot(self) -> bool:
        with self._lock:
            return None in self._slots or any(self._pins.get(r, 0) == 0 for r in self._device)

    # ------------------------------------------------------------------ introspection

    def state(self) -> dict:
        with self._lock:
            return {
                "device": {r.name: s for r, s in self._device.items()},
                "pinned": {r.name: n for r, n in self._pins.items()},
                "cpu": [r.name for r in self._cpu],
                "cpu_bytes": sum(e.nbytes for e in self._cpu.values()),
                "loading": [r.name for r in self._loading],
                "slots": len(self._slots),
                **self.stats.as_dict(),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["CORE", "AdapterCache", "AdapterRef", "CacheStats", "ModelTarget", "UnknownModel", "parse_model_name"]
