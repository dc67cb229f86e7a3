"""A real `cogcore serve` subprocess on a free loopback port (tiny-llama core, two published
adapters, API keys, experience log and notes on), driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import PROMPTS, SPEC, fresh_model, make_adapter

from cogcore.lora.registry import AdapterRegistry
from cogcore.memory.log import ExperienceLog
from cogcore.serve.cli import spawn_server
from cogcore.serve.engine import Engine, EngineConfig

KEYS = {"admin": "sk-admin-0", "alice": "sk-alice-1", "bob": "sk-bob-2"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("serve-http")
    reg = AdapterRegistry(tmp / "adapters")
    for i, user in enumerate(["alice", "bob"]):
        reg.publish(user, make_adapter(base, tmp / user, seed=20 + i, r=4 + 4 * i), base_hash=base.base_hash)
    log_path = tmp / "log.sqlite"
    env = {"COGCORE_API_KEYS": ",".join(f"{k}:{u}" for u, k in KEYS.items())}
    args = ["--model", "tiny-llama", "--port", "0", "--threads", "1", "--max-batch", "4", "--max-queue", "2",
            "--adapters", str(reg.root), "--log-experience", "--notes", "--experience-url", f"sqlite:///{log_path}",
            "--timeout", "60"]
    srv = spawn_server(args, timeout=90, env=env)
    try:
        yield srv, reg, log_path, tmp
    finally:
        rc = srv.stop()
        assert rc in (0, -15), "\n".join(srv.lines[-20:])  # uvicorn re-raises SIGTERM after a clean shutdown


def client(srv, who="admin", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS.get(who, who), max_retries=0, timeout=60, **kw)


def test_completions_chat_and_stream(setup, base):
    srv, reg, *_ = setup
    c = client(srv)
    r = c.completions.create(model="core:alice", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert r.system_fingerprint == "alice@v1" and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    # the same answer as the engine in this process gives alone
    torch.set_num_threads(1)
    with Engine(EngineConfig(model=SPEC), reg, model=fresh_model()) as eng:
        assert r.choices[0].text == eng.generate(PROMPTS[1], "alice@v1", max_tokens=12).text
    chat = c.chat.completions.create(model="bob@v1", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    assert chat.id.startswith("chatcmpl-") and chat.model == "bob@v1"
    chunks = list(c.chat.completions.create(model="bob@v1", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    pieces = list(c.completions.create(model="core:alice", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                       stream=True))
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    # the raw event stream ends the OpenAI way
    with httpx.stream("POST", srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEYS['admin']}"},
                      json={"model": "core", "prompt": "ab", "max_tokens": 3, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    # sampled with a seed: reproducible
    kw = dict(model="bob@v1", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=5)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_models_and_keys(setup):
    srv, *_ = setup
    ids = lambda who: sorted(m.id for m in client(srv, who).models.list())  # noqa: E731
    assert ids("admin") == ["alice@v1", "bob@v1", "core", "core:alice", "core:bob"]
    assert ids("alice") == ["alice@v1", "core", "core:alice"]
    assert ids("bob") == ["bob@v1", "core", "core:bob"]
    alice = client(srv, "alice")
    assert alice.completions.create(model="core", prompt="ab", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'bob@v1'"):
        alice.completions.create(model="bob@v1", prompt="ab", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        alice.chat.completions.create(model="core:bob", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        client(srv, "sk-wrong").models.list()
    assert httpx.get(srv.url + "/v1/models").status_code == 401


def test_errors_are_answers_not_crashes(setup):
    srv, *_ = setup
    c = client(srv)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="published versions of alice: alice@v1"):
        c.completions.create(model="alice@v7", prompt="x", max_tokens=2)
    bad = [dict(max_tokens=0), dict(max_tokens=10**6), dict(n=2), dict(temperature=3), dict(top_p=0),
           dict(stop=["a", "b", "c", "d", "e"]), dict(prompt=123), dict(seed="x"), dict(logprobs=2)]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            c.completions.create(**{"model": "core", "prompt": "x", "max_tokens": 2, **extra})
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="core", messages=[{"role": "wizard", "content": "x"}])
    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    for raw in [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"model": "core", "messages": "hi"}', b'{"prompt": "x"}']:
        r = httpx.post(srv.url + "/v1/chat/completions", content=raw, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["message"], raw
    assert httpx.get(srv.url + "/v1/nothing-here").status_code == 404
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_adapter_for_another_base_fails_clearly(setup, base):
    """A version published for another base: 500 with the registry's reason, streamed or not (the
    stream is not started before the adapter loaded); the server keeps serving."""
    srv, reg, _, tmp = setup
    reg.publish("zoe", make_adapter(base, tmp / "zoe", seed=7), base_hash="ab" * 32)
    c = client(srv)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError, match="trained for base abababababab"):
            c.completions.create(model="core:zoe", prompt="x", max_tokens=2, stream=stream)
    assert c.completions.create(model="core", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_queue_full_is_429(setup):
    """4 rows decoding + 2 waiting fill the server: the next request gets 429 with Retry-After, and the
    six accepted ones still finish."""
    srv, *_ = setup
    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    statuses = []

    def long_request():
        r = httpx.post(srv.url + "/v1/completions", timeout=60, headers=auth,
                       json={"model": "core", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0})
        statuses.append(r.status_code)

    threads = [threading.Thread(target=long_request) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = httpx.get(srv.url + "/health").json()
            if (h["running"], h["waiting"]) == (4, 2):
                break
            time.sleep(0.01)
        assert (h["running"], h["waiting"]) == (4, 2), h
        with pytest.raises(openai.RateLimitError, match="busy") as e:
            client(srv).completions.create(model="core", prompt="x", max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        r = httpx.post(srv.url + "/v1/chat/completions", headers=auth,
                       json={"model": "core", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        for t in threads:
            t.join(90)
    assert statuses == [200] * 6


def test_hot_swap_without_restart(setup, base):
    srv, reg, _, tmp = setup
    c = client(srv, "alice")
    before = c.completions.create(model="core:alice", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert before.system_fingerprint == "alice@v1"
    reg.publish("alice", make_adapter(base, tmp / "alice-v2", seed=99, r=8), base_hash=base.base_hash)
    after = c.completions.create(model="core:alice", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert after.system_fingerprint == "alice@v2" and after.choices[0].text != before.choices[0].text
    assert "alice@v2" in {m.id for m in c.models.list()}
    reg.rollback("alice")
    assert c.completions.create(model="core:alice", prompt="x", max_tokens=1).system_fingerprint == "alice@v1"


def test_experience_capture_feedback_and_notes(setup):
    srv, _, log_path, _ = setup
    c = client(srv, "bob")
    msgs = [{"role": "user", "content": "book a table for two"}]
    plain = c.chat.completions.create(model="core:bob", messages=msgs, max_tokens=4, temperature=0)
    with ExperienceLog.open(f"sqlite:///{log_path}") as lg:
        events = [e for e in lg.events("bob") if e.episode_id == plain.id]
        assert [e.kind for e in events] == ["context", "action"]
        assert events[0].text == "book a table for two" and events[1].meta["adapter"] == "bob@v1"
        lg.add_note("bob", "Bob prefers window seats.")
    r = httpx.post(srv.url + "/v1/feedback", headers={"Authorization": f"Bearer {KEYS['bob']}"},
                   json={"id": plain.id, "text": "No tables left at 8pm.", "reward": -1})
    assert r.status_code == 200 and r.json()["added"] == 1
    r = httpx.post(srv.url + "/v1/feedback", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                   json={"id": plain.id, "text": "sneaky"})
    assert r.status_code == 403
    with ExperienceLog.open(f"sqlite:///{log_path}") as lg:
        obs = [e for e in lg.events("bob") if e.episode_id == plain.id and e.kind == "observation"]
        assert len(obs) == 1 and obs[0].text == "No tables left at 8pm." and obs[0].reward == -1
    noted = c.chat.completions.create(model="core:bob", messages=msgs, max_tokens=4, temperature=0)
    assert noted.usage.prompt_tokens > plain.usage.prompt_tokens + len("Bob prefers window seats.")


def test_metrics(setup):
    srv, *_ = setup
    text = httpx.get(srv.url + "/metrics").text
    for name in ['cogcore_requests_total{endpoint="completions",status="200"}',
                 'cogcore_requests_total{endpoint="completions",status="429"}',
                 'cogcore_requests_total{endpoint="completions",status="404"}',
                 "cogcore_generated_tokens_total", "cogcore_request_latency_seconds_bucket",
                 "cogcore_time_to_first_token_seconds_count", "cogcore_queue_depth", "cogcore_running_requests",
                 'cogcore_adapter_cache_hits_total{tier="device"}', 'cogcore_adapter_cache_misses_total{tier="cpu"}',
                 'cogcore_adapter_cache_evictions_total{tier="device"}']:
        assert name in text, name
    hits = next(float(ln.split()[-1]) for ln in text.splitlines()
                if ln.startswith('cogcore_adapter_cache_hits_total{tier="device"}'))
    assert hits > 0
    health = httpx.get(srv.url + "/health").json()
    assert health["finished"] > 10 and health["running"] == 0 and json.dumps(health)


def test_in_process_server(registry):
    """`Server` (what the demo can use): the same app on a thread of this process, port 0."""
    from cogcore.serve.app import ServeConfig, Server
    torch.set_num_threads(1)
    cfg = ServeConfig(engine=EngineConfig(model=SPEC, adapters_on_device=2), port=0)
    with Server(cfg, registry=registry) as srv:
        assert srv.port > 0 and srv.url == f"http://127.0.0.1:{srv.port}"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="open", max_retries=0)
        r = c.chat.completions.create(model="core:bob", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.system_fingerprint == "bob@v1" and r.usage.completion_tokens <= 3
        deadline = time.monotonic() + 5  # the answer can arrive a moment before the row is dropped
        while srv.engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.engine.running == 0
    assert srv.engine._thread is None  # the lifespan stopped the engine
