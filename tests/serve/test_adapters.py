"""The adapter cache: device <-> CPU <-> registry tiers with LRU limits, pinning, background
loads, hot swap of `core:<user>` on publish / rollback, and loads refused with a clear reason."""

from __future__ import annotations

import os
import time

import pytest
import torch
from serve_helpers import ADAPTERS, PROMPTS, SPEC, fresh_model, make_adapter

from cogcore.lora.registry import AdapterRegistry
from cogcore.serve.adapters import AdapterCache, AdapterRef, UnknownModel, parse_model_name
from cogcore.serve.engine import Engine, EngineConfig, GenerationRequest


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ids(eng, text):
    return eng.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_model_names():
    assert parse_model_name("core") == (None, None, False)
    assert parse_model_name("core:alice") == ("alice", None, True)
    assert parse_model_name("alice@v3") == ("alice", 3, False)
    for bad in ["", "gpt-4o", "core:", "core:../x", "alice@3x", "al ice@v1", "a..b@v1", "core:bob@v1"]:
        with pytest.raises(UnknownModel):
            parse_model_name(bad)


def test_device_tier_lru_and_pins(registry):
    """2 device slots, 3 adapters: the least recently used unpinned adapter leaves; the CPU tier
    still holds it, so coming back costs a copy, not a disk read."""
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=2, cpu_adapters=8), registry, model=fresh_model())
    with eng:
        a, b, c = (f"{u}@v1" for u, *_ in ADAPTERS)
        for m in (a, b, a, c):  # c evicts b (a was used more recently)
            eng.generate(PROMPTS[0], m, max_tokens=2)
        st = eng.cache.state()
        assert set(st["device"]) == {a, c} and st["pinned"] == {}
        assert (st["device_misses"], st["device_hits"], st["device_evictions"]) == (3, 1, 1)
        assert (st["cpu_misses"], st["cpu_hits"]) == (3, 0)
        eng.generate(PROMPTS[0], b, max_tokens=2)  # back from the CPU tier: evicts a now
        st = eng.cache.state()
        assert set(st["device"]) == {b, c} and st["cpu_hits"] == 1 and st["cpu_misses"] == 3

        # a running request pins its slot: with both slots pinned a third adapter waits, then runs
        ids = _ids(eng, PROMPTS[1])
        with eng.hold():
            hb = eng.submit(GenerationRequest(ids, eng.resolve(b), max_tokens=12))
            hc = eng.submit(GenerationRequest(ids, eng.resolve(c), max_tokens=12))
            ha = eng.submit(GenerationRequest(ids, eng.resolve(a), max_tokens=12))
        rb, rc, ra = hb.result(60), hc.result(60), ha.result(60)
        assert ra.queued_s >= min(rb.total_s, rc.total_s) * 0.5  # a waited for a free slot
        assert ra.token_ids == eng.generate(PROMPTS[1], a, max_tokens=12).token_ids


def test_cpu_tier_lru_by_count_and_bytes(registry):
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=1, cpu_adapters=2), registry, model=fresh_model())
    try:
        refs = [AdapterRef(u, 1) for u, *_ in ADAPTERS]
        for r in refs:  # 3 loads into a 2-entry tier, one after the other
            eng.cache.preload([r])
        st = eng.cache.state()
        assert st["cpu"] == [refs[1].name, refs[2].name] and st["cpu_evictions"] == 1
        sizes = {r.name: eng.cache.fetch(r).result().nbytes for r in refs[1:]}
        assert st["cpu_bytes"] == sum(sizes.values())
        # a byte limit below two adapters keeps one
        cache = AdapterCache(registry, eng.base_hash, device_slots=1, cpu_adapters=8,
                             cpu_bytes=max(sizes.values()) + 1, prepare=eng.prepare_adapter)
        for r in refs[1:]:
            cache.preload([r])
        assert len(cache.state()["cpu"]) == 1 and cache.stats.cpu_evictions == 1
        cache.close()
    finally:
        eng.stop()


class SlowDiskRegistry(AdapterRegistry):
    """The real registry on a disk that takes `delay` seconds per adapter read (a cold NFS mount)."""

    delay = 1.5

    def load_weights(self, artifact, expected_base_hash):
        time.sleep(self.delay)
        return super().load_weights(artifact, expected_base_hash)


def test_cold_load_blocks_only_its_own_request(registry):
    """While bob's adapter loads in the background, requests for the core and for an adapter
    already on the device are served; bob's request runs once its load is done."""
    slow = SlowDiskRegistry(registry.root)
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=2), slow, model=fresh_model())
    with eng:
        eng.cache.preload([AdapterRef("alice", 1)])  # warm (pays the slow read once, before the clock)
        t0 = time.monotonic()
        cold = eng.submit(GenerationRequest(_ids(eng, PROMPTS[0]), eng.resolve("bob@v1"), max_tokens=4))
        warm = eng.submit(GenerationRequest(_ids(eng, PROMPTS[0]), eng.resolve("alice@v1"), max_tokens=4))
        core = eng.submit(GenerationRequest(_ids(eng, PROMPTS[0]), eng.resolve("core"), max_tokens=4))
        rw, rc = warm.result(30), core.result(30)
        done_others = time.monotonic() - t0
        rb = cold.result(30)
        assert done_others < slow.delay * 0.8
        assert rw.total_s < slow.delay and rc.total_s < slow.delay
        assert rb.queued_s >= slow.delay * 0.9 and rb.completion_tokens == 4


def test_hot_swap_on_publish_and_rollback(registry, base, tmp_path):
    """`core:<user>` follows LIVE per request: a publish reaches the next request without a restart,
    a request in flight finishes on the version it started with, and a rollback goes back."""
    reg = AdapterRegistry(tmp_path / "adapters")
    reg.publish("dave", make_adapter(base, tmp_path / "d1", seed=11, r=4), base_hash=base.base_hash)
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=2), reg, model=fresh_model())
    n = 24
    with eng:
        v1 = eng.generate(PROMPTS[1], "dave@v1", max_tokens=n).token_ids
        assert eng.resolve("core:dave").adapter == AdapterRef("dave", 1)
        inflight = eng.submit(GenerationRequest(_ids(eng, PROMPTS[1]), eng.resolve("core:dave"), max_tokens=n))
        stream = iter(inflight)
        next(stream)
        reg.publish("dave", make_adapter(base, tmp_path / "d2", seed=12, r=8), base_hash=base.base_hash)
        new = eng.submit(GenerationRequest(_ids(eng, PROMPTS[1]), eng.resolve("core:dave"), max_tokens=n))
        assert new.request.adapter == AdapterRef("dave", 2)
        assert inflight.result(30).token_ids == v1 and inflight.result().adapter == "dave@v1"
        v2 = new.result(30)
        assert v2.adapter == "dave@v2" and v2.token_ids == eng.generate(PROMPTS[1], "dave@v2", max_tokens=n).token_ids
        assert v2.token_ids != v1
        reg.rollback("dave")
        back = eng.generate(PROMPTS[1], "core:dave", max_tokens=n)
        assert back.adapter == "dave@v1" and back.token_ids == v1
        # a user with nothing published is served by the plain core
        assert eng.resolve("core:erin").adapter is None
        with pytest.raises(UnknownModel, match="published versions of dave: dave@v1, dave@v2"):
            eng.resolve("dave@v9")


def test_loads_refused_with_reasons(registry, base, tmp_path):
    """Wrong base, corrupt weights, too high a rank: the request fails with the registry's / the
    engine's one-line reason and the engine keeps serving."""
    reg = AdapterRegistry(tmp_path / "adapters")
    reg.publish("frank", make_adapter(base, tmp_path / "f", seed=3), base_hash="0" * 64)
    reg.publish("gina", make_adapter(base, tmp_path / "g", seed=4, r=32), base_hash=base.base_hash)
    reg.publish("hal", make_adapter(base, tmp_path / "h", seed=5), base_hash=base.base_hash)
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=2, max_rank=16), reg, model=fresh_model())
    with eng:
        with pytest.raises(Exception, match="trained for base 000000000000"):
            eng.generate(PROMPTS[0], "frank@v1", max_tokens=2)
        with pytest.raises(Exception, match="rank 32, above the server's slot rank 16: restart the server with --max-rank 32"):
            eng.generate(PROMPTS[0], "gina@v1", max_tokens=2)
        weights = reg.get("hal").weights_path
        os.chmod(weights, 0o644)
        with open(weights, "r+b") as f:  # flip bytes at the end of the tensor data
            f.seek(-8, 2)
            f.write(b"\x00" * 8)
        with pytest.raises(Exception, match="corrupt"):
            eng.generate(PROMPTS[0], "hal@v1", max_tokens=2)
        assert eng.cache.stats.load_errors == 3
        assert eng.generate(PROMPTS[0], "core", max_tokens=3).completion_tokens == 3


def test_slot_shape_follows_the_registry(registry):
    """Slots get the registry's largest rank and the union of its target modules."""
    eng = Engine(EngineConfig(model=SPEC), registry, model=fresh_model())
    assert eng.max_rank == 16  # max(8, the default 16)
    eng2 = Engine(EngineConfig(model=SPEC, max_rank=8, target_modules=["q_proj", "v_proj"]), registry,
                  model=fresh_model())
    assert eng2.max_rank == 8 and eng2.target_modules == ["q_proj", "v_proj"]
    with eng2, pytest.raises(Exception, match="adapts down_proj, gate_proj, k_proj, o_proj, up_proj, which have no adapter slot on this server .*"
                                            "--target-modules down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"):
        eng2.generate(PROMPTS[0], "bob@v1", max_tokens=2)
    eng.cache.close()
