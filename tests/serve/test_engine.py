"""Engine (no HTTP): a request in a mixed-adapter batch decodes exactly as it does alone, and as
PEFT does for its adapter; continuous batching, sampling, stops, timeouts, queue limits."""

from __future__ import annotations

import time

import pytest
import torch
from serve_helpers import ADAPTERS, PROMPTS, SPEC, fresh_model, peft_greedy

from cogcore.serve.engine import (
    BadRequest,
    Engine,
    EngineConfig,
    GenerationRequest,
    QueueFull,
    RequestTimeout,
)

N_NEW = 16


@pytest.fixture(scope="module")
def engine(registry):
    torch.set_num_threads(1)
    eng = Engine(EngineConfig(model=SPEC, adapters_on_device=4, max_batch=16), registry, model=fresh_model())
    eng.start()
    yield eng
    eng.stop()


def _ids(eng, text):
    return eng.tokenizer(text, add_special_tokens=False)["input_ids"]


def _idle(eng, timeout=5.0) -> bool:
    """A result arrives a moment before the engine thread drops the finished row."""
    deadline = time.monotonic() + timeout
    while eng.running and time.monotonic() < deadline:
        time.sleep(0.005)
    return eng.running == 0


def _cases():
    """Every adapter (and the core) with every prompt: prompts of different lengths exercise left padding."""
    models = ["core"] + [f"{u}@v1" for u, *_ in ADAPTERS] + [f"core:{ADAPTERS[0][0]}"]
    return [(m, p) for m in models for p in PROMPTS[:2]] + [(m, PROMPTS[(i + 2) % 4]) for i, m in enumerate(models)]


@pytest.fixture(scope="module")
def alone(engine):
    """Each case served alone (one request in the engine at a time)."""
    out = {}
    for model, prompt in _cases():
        res = engine.generate(prompt, model, max_tokens=N_NEW)
        assert _idle(engine)
        out[model, prompt] = res.token_ids
    return out


def test_adapters_change_the_output(alone):
    """Otherwise the equality tests below would prove nothing."""
    for prompt in PROMPTS[:2]:
        outs = {tuple(alone[m, prompt]) for m in ["core"] + [f"{u}@v1" for u, *_ in ADAPTERS]}
        assert len(outs) == 1 + len(ADAPTERS), f"adapters should all give different outputs for {prompt!r}"
    assert any(len(set(v)) > 3 for v in alone.values()), "some output should vary token to token"


def test_mixed_batch_equals_alone(engine, alone):
    """All cases submitted at once: they decode in one batch (one forward per step) and every row's
    greedy tokens equal the same request served alone."""
    refs = [engine.resolve(m).adapter for m, _ in _cases()]
    engine.cache.preload({r for r in refs if r is not None})
    steps0 = engine.counters["decode_steps"]
    engine.counters["max_running"] = 0
    with engine.hold():
        handles = [engine.submit(GenerationRequest(_ids(engine, p), engine.resolve(m), max_tokens=N_NEW))
                   for m, p in _cases()]
    got = {case: h.result(60).token_ids for case, h in zip(_cases(), handles)}
    assert got == alone
    assert engine.counters["max_running"] == len(handles)  # >4 adapters' rows shared each forward
    assert engine.counters["decode_steps"] - steps0 < N_NEW  # one step for all rows, not one per row


def test_equals_peft(engine, alone, base, registry):
    """The engine's adapter math (padding to the slot rank, per-layer scale, rsLoRA, untargeted
    modules and decoder layers) is PEFT's: greedy tokens equal PeftModel.generate's for every adapter."""
    for (model, prompt), tokens in alone.items():
        ref = engine.resolve(model).adapter
        path = registry.get(ref.user, ref.version).path if ref else None
        expected = peft_greedy(base, path, _ids(engine, prompt), N_NEW, engine.stop_token_ids, engine.pad_id)
        assert tokens == expected, f"{model} on {prompt!r}"


def test_requests_join_between_decode_steps(engine, alone):
    """Continuous batching: requests arriving while others decode join the running batch
    (their cache merged in) and still match their solo outputs; the early ones are undisturbed."""
    (m1, p1), (m2, p2), (m3, p3) = ("bob@v1", PROMPTS[0]), ("core", PROMPTS[1]), ("carol@v1", PROMPTS[0])
    long = engine.submit(GenerationRequest(_ids(engine, p1), engine.resolve(m1), max_tokens=N_NEW))
    stream = iter(long)
    next(stream), next(stream)  # the first request has decoded a few tokens
    engine.counters["max_running"] = 0
    second = engine.submit(GenerationRequest(_ids(engine, p2), engine.resolve(m2), max_tokens=N_NEW))
    third = engine.submit(GenerationRequest(_ids(engine, p3), engine.resolve(m3), max_tokens=N_NEW))
    assert long.result(60).token_ids == alone[m1, p1]
    assert second.result(60).token_ids == alone[m2, p2]
    assert third.result(60).token_ids == alone[m3, p3]
    assert engine.counters["max_running"] >= 2


def test_streamed_text_is_the_final_text(engine):
    h = engine.submit(GenerationRequest(_ids(engine, PROMPTS[0]), engine.resolve("bob@v1"), max_tokens=N_NEW))
    deltas = list(h)
    res = h.result()
    assert deltas[-1].done and "".join(d.text for d in deltas) == res.text
    assert res.completion_tokens == len(res.token_ids) <= N_NEW and res.prompt_tokens == len(_ids(engine, PROMPTS[0]))


def _stop_case(engine):
    """A (model, prompt, full result, stop, cut) where a printable 2-character stop string first occurs at `cut`."""
    for model in ("carol@v1", "bob@v1", "alice@v1"):
        for prompt in PROMPTS:
            full = engine.generate(prompt, model, max_tokens=N_NEW)
            text = full.text
            for cut in range(2, len(text) - 1):
                stop = text[cut:cut + 2]
                if stop.isascii() and stop.isprintable() and stop.strip() and text.find(stop) == cut:
                    return model, prompt, full, stop, cut
    raise AssertionError("no adapter output holds a printable 2-character string")


def test_stop_strings_and_length(engine):
    model, prompt, full, stop, cut = _stop_case(engine)
    assert full.finish_reason == "length" and len(full.token_ids) == N_NEW
    res = engine.generate(prompt, model, max_tokens=N_NEW, stop=[stop, "never-there"])
    assert res.finish_reason == "stop" and res.text == full.text[:cut]
    h = engine.submit(GenerationRequest(_ids(engine, prompt), engine.resolve(model), max_tokens=N_NEW, stop=[stop]))
    assert "".join(d.text for d in h) == full.text[:cut]  # the stop string's first characters were never streamed


def test_sampling_is_seeded(engine, alone):
    kw = dict(max_tokens=N_NEW, temperature=1.0)
    a = engine.generate(PROMPTS[0], "bob@v1", seed=7, **kw).token_ids
    b = engine.generate(PROMPTS[0], "bob@v1", seed=7, **kw).token_ids
    others = {tuple(engine.generate(PROMPTS[0], "bob@v1", seed=s, **kw).token_ids) for s in range(8, 12)}
    assert a == b and len(others | {tuple(a)}) > 1
    # top_p so small that only the most likely token survives = greedy
    nucleus = engine.generate(PROMPTS[0], "bob@v1", seed=3, max_tokens=N_NEW, temperature=1.0, top_p=1e-6).token_ids
    assert nucleus == alone["bob@v1", PROMPTS[0]]


def test_timeout_and_cancel_free_the_row(engine):
    h = engine.submit(GenerationRequest(_ids(engine, PROMPTS[0]), None, max_tokens=2000, timeout=0.3))
    with pytest.raises(RequestTimeout, match="timed out"):
        h.result(30)
    c = engine.submit(GenerationRequest(_ids(engine, PROMPTS[0]), None, max_tokens=2000))
    next(iter(c))
    c.cancel()
    deadline = time.monotonic() + 10
    while not c.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.done() and _idle(engine)
    assert engine.generate(PROMPTS[1], "core", max_tokens=4).completion_tokens == 4  # still serving


def test_bad_requests_are_refused_up_front(engine):
    with pytest.raises(BadRequest, match="max_tokens"):
        engine.submit(GenerationRequest(_ids(engine, "x"), None, max_tokens=0))
    with pytest.raises(BadRequest, match="empty"):
        engine.submit(GenerationRequest([], None))
    with pytest.raises(BadRequest, match="context"):
        engine.submit(GenerationRequest([1] * engine.max_positions, None))
    with pytest.raises(BadRequest, match="token ids"):
        engine.submit(GenerationRequest([10**6], None))


def test_queue_limit(registry):
    """max_batch rows + max_queue waiting; the next request is refused with a retry hint."""
    eng = Engine(EngineConfig(model=SPEC, max_batch=1, max_queue=2, adapters_on_device=1), registry,
                 model=fresh_model())
    try:  # not started: nothing leaves the queue
        for _ in range(3):
            eng.submit(GenerationRequest([65, 66], None, max_tokens=2))
        with pytest.raises(QueueFull, match="busy") as e:
            eng.submit(GenerationRequest([65, 66], None, max_tokens=2))
        assert e.value.retry_after >= 1 and eng.counters["rejected"] == 1
        eng.start()  # the queued ones are then served
        deadline = time.monotonic() + 30
        while eng.counters["finished"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.counters["finished"] == 3
    finally:
        eng.stop()


def test_nf4_base_serves_adapters(registry):
    """--quantize nf4: bitsandbytes Linear4bit layers under the adapter slots; mixed batches still
    equal solo runs on the quantized base."""
    from cogcore.train.model import ModelSpec
    eng = Engine(EngineConfig(model=ModelSpec("tiny-llama", quantize="nf4"), adapters_on_device=4), registry)
    assert type(next(iter(eng.patch.layers.values())).base).__name__ == "Linear4bit"
    cases = [("core", PROMPTS[0]), ("bob@v1", PROMPTS[1]), ("carol@v1", PROMPTS[0]), ("alice@v1", PROMPTS[3])]
    with eng:
        alone = [eng.generate(p, m, max_tokens=8).token_ids for m, p in cases]
        with eng.hold():
            hs = [eng.submit(GenerationRequest(_ids(eng, p), eng.resolve(m), max_tokens=8)) for m, p in cases]
        assert [h.result(60).token_ids for h in hs] == alone
