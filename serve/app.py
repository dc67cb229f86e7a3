"""The OpenAI-compatible HTTP app: parse, authorise, hand to the engine, stream back.

    POST /v1/completions        POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models             GET /health                 GET /metrics (Prometheus)
    POST /v1/feedback           (with --log-experience: the environment's answer to a reply)

`model` is `core` (the base), `core:<user>` (the user's LIVE adapter, resolved when the request
arrives) or `<user>@vN`. API keys map to users: a user's key reaches `core` and that user's
adapters (403 otherwise), an admin key everything; with no keys configured the server is open
(local use). Every error is an OpenAI-style JSON body with the status a client expects:
400 bad JSON or parameters, 401 missing/unknown key, 403 another user's model, 404 unknown
model, 429 queue full (with Retry-After), 504 timed out. Nothing a client sends crashes the server.

Nothing here touches tensors: batching, KV cache and adapters belong to the Engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # module level: FastAPI reads the handlers' (postponed) annotations here

from cogcore.memory.formats import notes_block, render_prompt
from cogcore.train.config import CogcoreError
from cogcore.train.config import field as cfg_field

from .adapters import CORE, ModelTarget, UnknownModel
from .engine import (
    BadRequest,
    Delta,
    Engine,
    EngineConfig,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestTimeout,
)

log = logging.getLogger("cogcore.serve")


@dataclass
class ServeConfig:
    """The HTTP server around an engine."""

    engine: EngineConfig = cfg_field(default_factory=EngineConfig, help="model, batching and adapter tiers")
    host: str = cfg_field("127.0.0.1", help="address to listen on")
    port: int = cfg_field(8000, help="TCP port (0 = a free port, printed when ready)")
    keys: str = cfg_field("", help="API keys file (YAML/JSON); COGCORE_API_KEYS='key:user,...' adds more; "
                                   "none at all = open server")
    log_experience: bool = cfg_field(False, help="append each exchange (and /v1/feedback) to the experience log")
    experience_url: str = cfg_field("", help="experience log location (default: the workspace's)")
    notes: bool = cfg_field(False, help="put the user's notes from the experience log before chat prompts")
    notes_tokens: int = cfg_field(256, help="token budget of the notes block (newest notes kept first)")
    default_max_tokens: int = cfg_field(256, help="max_tokens of a chat request that gives none "
                                                  "(completions default to 16, as OpenAI's)")

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise CogcoreError(f"port must be 0..65535, got {self.port}")
        if self.notes_tokens < 0:
            raise CogcoreError(f"notes_tokens must be >= 0, got {self.notes_tokens}")


# ---------------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (None on an open server) and whether they may reach every model."""

    user: str | None
    admin: bool = False


OPEN = Principal(None, True)


class KeyRing:
    """API key -> Principal. Keys are kept hashed in memory; no keys = open server."""

    def __init__(self, keys: dict[str, Principal] | None = None):
        keys = keys or {}
        self._by_hash = {_hash_key(k): p for k, p in keys.items()}
        # the vLLM bridge can pass on one admin key (vLLM checks a single key, no users)
        self.sole_admin_key = next(iter(keys)) if len(keys) == 1 and next(iter(keys.values())).admin else None

    @property
    def open(self) -> bool:
        return not self._by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: str | None = None) -> KeyRing:
        """Keys from a YAML/JSON file and/or `key:user[:admin],...` (the COGCORE_API_KEYS format).

        File forms: ``{"sk-1": "alice"}``, or ``keys: [{key: sk-1, user: alice, role: admin}]``.
        The user named ``admin`` (or role ``admin``) may reach every model.
        """
        keys: dict[str, Principal] = {}
        if path:
            import yaml
            p = Path(path).expanduser()
            try:
                data = yaml.safe_load(p.read_text())
            except FileNotFoundError:
                raise CogcoreError(f"API keys file {p} does not exist") from None
            except yaml.YAMLError as e:
                raise CogcoreError(f"API keys file {p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
            entries = data.get("keys", data) if isinstance(data, dict) else data
            if isinstance(entries, dict):
                entries = [{"key": k, "user": v} for k, v in entries.items()]
            if not isinstance(entries, list):
                raise CogcoreError(f"API keys file {p}: expected a mapping key -> user or a list under 'keys'")
            for e in entries:
                if not isinstance(e, dict) or not e.get("key") or not e.get("user"):
                    raise CogcoreError(f"API keys file {p}: every entry needs 'key' and 'user', got {e!r}"[:200])
                keys[str(e["key"])] = _principal(str(e["user"]), str(e.get("role", "")))
        for item in (env or "").split(","):
            item = item.strip()
            if not item:
                continue
            parts = item.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
                raise CogcoreError(f"COGCORE_API_KEYS entry {item[:4]}... is not 'key:user' or 'key:user:admin'")
            keys[parts[0]] = _principal(parts[1], parts[2] if len(parts) == 3 else "")
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return OPEN
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        p = self._by_hash.get(_hash_key(authorization[7:].strip()))
        if p is None:
            raise ApiError(401, "unknown API key", "invalid_api_key")
        return p


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _principal(user: str, role: str) -> Principal:
    from cogcore.lora.registry import check_user
    if user != "admin":
        check_user(user)
    return Principal(user, admin=(role == "admin" or user == "admin"))


def may_use(p: Principal, target: ModelTarget) -> bool:
    return p.admin or target.user is None or target.user == p.user


# ---------------------------------------------------------------------------- errors and parsing


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error", 504: "timeout_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(msg: str, param: str | None = None) -> ApiError:
    return ApiError(400, msg, "invalid_request", param)


def _get(body: dict, name: str, types, default=None, *, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(f"'{name}' must be {what or types}, got {json.dumps(v)}", name)
    if not isinstance(v, types):
        raise _bad(f"'{name}' must be {what or getattr(types, '__name__', types)}, got {json.dumps(v)[:60]}", name)
    if check is not None and not check(v):
        raise _bad(f"'{name}' must be {what}, got {json.dumps(v)[:60]}", name)
    return v


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    user: str | None
    ignore_eos: bool = False


def parse_sampling(body: dict, default_max_tokens: int, limit: int) -> Sampling:
    """The OpenAI parameters the engine honours; unsupported ones that change semantics are refused."""
    n = _get(body, "n", int, 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of is not supported", "best_of")
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _bad("logprobs are not supported", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools / function calling are not supported", "tools")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if mt is None else mt
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise _bad(f"'max_tokens' must be an integer from 1 to {limit}, got {json.dumps(mt)}", "max_tokens")
    number = (int, float)
    temperature = float(_get(body, "temperature", number, 1.0, check=lambda v: 0 <= v <= 2,
                             what="a number from 0 to 2"))
    top_p = float(_get(body, "top_p", number, 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
    seed = _get(body, "seed", int, None, what="an integer")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    stream = _get(body, "stream", bool, False, what="true or false")
    opts = _get(body, "stream_options", dict, {}, what="an object")
    user = _get(body, "user", str, None, what="a string")
    ignore_eos = _get(body, "ignore_eos", bool, False, what="true or false")  # vLLM's extension
    return Sampling(max_tokens, temperature, top_p, seed, stop, stream, bool(opts.get("include_usage")), user,
                    ignore_eos)


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where}: content must be a string or a list of text parts", "messages")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}]: role must be system, user or assistant", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")})
    return out


# ---------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
        from prometheus_client.core import CounterMetricFamily

        disable_created_metrics()  # no *_created series: counters and histograms only

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cogcore_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("cogcore_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("cogcore_generated_tokens", "tokens generated for finished requests",
                                        registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("cogcore_request_latency_seconds", "arrival to last token", ["endpoint"],
                                 buckets=buckets, registry=r)
        self.ttft = Histogram("cogcore_time_to_first_token_seconds", "arrival to first token", buckets=buckets,
                              registry=r)
        self.queued = Histogram("cogcore_queue_wait_seconds", "arrival to a batch row", buckets=buckets, registry=r)
        Gauge("cogcore_queue_depth", "requests waiting for a batch row", registry=r).set_function(
            lambda: engine.waiting)
        Gauge("cogcore_running_requests", "requests in the decode batch", registry=r).set_function(
            lambda: engine.running)

        class _Engine:
            def collect(self):
                s = engine.cache.stats
                for tier in ("device", "cpu"):
                    for what in ("hits", "misses", "evictions"):
                        c = CounterMetricFamily(f"cogcore_adapter_cache_{what}", f"adapter cache {what} by tier",
                                                labels=["tier"])
                        c.add_metric([tier], getattr(s, f"{tier}_{what}"))
                        yield c
                c = CounterMetricFamily("cogcore_adapter_load_errors", "adapter loads that failed")
                c.add_metric([], s.load_errors)
                yield c
                c = CounterMetricFamily("cogcore_decode_steps", "decode forwards (one per step for all rows)")
                c.add_metric([], engine.counters["decode_steps"])
                yield c
                c = CounterMetricFamily("cogcore_decode_rows", "rows decoded summed over steps (/ steps = batch)")
                c.add_metric([], engine.counters["decode_rows"])
                yield c

        r.register(_Engine())

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------- experience log


class ExperienceSink:
    """Writes exchanges and feedback to the experience log from one thread (SQLite: one
    connection per thread), and reads notes. Episode ids map back to their user for feedback."""

    def __init__(self, url: str = "", log_exchanges: bool = True):
        self.url = url or None
        self.log_exchanges = log_exchanges
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experience-log")
        self._log = None
        self._episodes: dict[str, str] = {}  # episode id -> user (recent ones, bounded)

    def _open(self):
        if self._log is None:
            from cogcore.memory.log import ExperienceLog
            self._log = ExperienceLog.open(self.url)
        return self._log

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def remember(self, episode: str, user: str) -> None:
        self._episodes[episode] = user
        if len(self._episodes) > 100_000:
            for k in list(self._episodes)[:10_000]:
                del self._episodes[k]

    def owner(self, episode: str) -> str | None:
        return self._episodes.get(episode)

    def append_exchange(self, user: str, episode: str, context: str, action: str, meta: dict) -> None:
        from cogcore.memory.events import Event
        now = time.time()
        events = [Event.from_dict({"episode_id": episode, "ts": now, "kind": "context", "text": context or " ",
                                   "meta": meta}, user=user)]
        if action.strip():
            events.append(Event.from_dict({"episode_id": episode, "ts": now, "kind": "action", "text": action,
                                           "meta": meta}, user=user))
        self._open().append(events)

    def append_feedback(self, user: str, episode: str, kind: str, text: str, reward: float | None,
                        meta: dict) -> int:
        from cogcore.memory.events import Event
        d = {"episode_id": episode, "ts": time.time(), "kind": kind, "text": text, "meta": meta}
        if reward is not None:
            d["reward"] = reward
        events = [Event.from_dict(d, user=user)]
        return self._open().append(events)[0]

    def notes(self, user: str) -> list[str]:
        return self._open().notes(user)

    def close(self) -> None:
        def _close():
            if self._log is not None:
                self._log.close()
        try:
            self._pool.submit(_close).result(timeout=5)
        except Exception:
            pass
        self._pool.shutdown(wait=False)


# ---------------------------------------------------------------------------- the app


def create_app(engine: Engine, cfg: ServeConfig | None = None, keys: KeyRing | None = None,
               experience: ExperienceSink | None = None):
    """The FastAPI app over a started or not-yet-started engine (its lifespan starts and stops it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    cfg = cfg or ServeConfig(engine=engine.cfg)
    keys = keys if keys is not None else KeyRing()
    if experience is None and (cfg.log_experience or cfg.notes):
        experience = ExperienceSink(cfg.experience_url, log_exchanges=cfg.log_experience)
    metrics = Metrics(engine)
    tok = engine.tokenizer
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            if experience is not None:
                experience.close()

    app = FastAPI(title="cogcore", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.keys = engine, metrics, keys

    def error_response(e: ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def resolve(body: dict, principal: Principal) -> ModelTarget:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required: 'core', 'core:<user>' or '<user>@v<N>'", "model")
        try:
            target = engine.resolve(model)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found", "model") from None
        if not may_use(principal, target):
            raise ApiError(403, f"this API key (user {principal.user}) may not use model {model!r}: it reaches "
                                f"'core' and its own user's adapters only", "forbidden", "model")
        return target

    def user_of(target: ModelTarget, principal: Principal, s: Sampling) -> str | None:
        """Whose experience this is: the adapter's user, else the key's, else the request's `user`."""
        if target.user:
            return target.user
        if principal.user and not principal.admin:
            return principal.user
        from cogcore.memory.events import EventError, validate_user_id
        try:
            return validate_user_id(s.user) if s.user else None
        except EventError:
            return None

    def submit(req: GenerationRequest) -> tuple[asyncio.Queue, object]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(req, sink=lambda d: loop.call_soon_threadsafe(q.put_nowait, d))
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(int(round(e.retry_after)))}) from None
        except BadRequest as e:
            raise _bad(str(e)) from None
        return q, handle

    def failure(err: BaseException) -> ApiError:
        if isinstance(err, RequestTimeout):
            return ApiError(504, str(err), "timeout")
        return ApiError(500, str(err) if isinstance(err, CogcoreError) else f"internal error: {err!r}", "server_error")

    def observe(endpoint: str, res: GenerationResult) -> None:
        metrics.requests.labels(endpoint, "200").inc()
        metrics.prompt_tokens.inc(res.prompt_tokens)
        metrics.generated_tokens.inc(res.completion_tokens)
        metrics.latency.labels(endpoint).observe(res.total_s)
        metrics.ttft.observe(res.first_token_s)
        metrics.queued.observe(res.queued_s)

    async def log_exchange(user, rid, context, res: GenerationResult, target, endpoint):
        if experience is None or not experience.log_exchanges or user is None:
            return
        experience.remember(rid, user)
        meta = {"request_id": rid, "model": target.model, "adapter": res.adapter, "endpoint": endpoint}
        try:
            await experience.run(experience.append_exchange, user, rid, context, res.text, meta)
        except Exception as e:  # logging must never fail the answer
            log.warning("could not log exchange %s for %s: %s", rid, user, e)

    async def notes_messages(user: str | None, messages: list[dict]) -> list[dict]:
        if experience is None or not cfg.notes or user is None or cfg.notes_tokens == 0:
            return messages
        try:
            notes = await experience.run(experience.notes, user)
        except Exception as e:
            log.warning("could not read notes of %s: %s", user, e)
            return messages
        kept: list[str] = []
        for note in reversed(notes):  # newest first, while the block fits the budget
            trial = [note, *kept]
            if len(tok(notes_block(trial), add_special_tokens=False)["input_ids"]) > cfg.notes_tokens:
                break
            kept = trial
        if not kept:
            return messages
        if messages[0]["role"] == "system":  # one system message: notes first, then the caller's
            return [{"role": "system", "content": notes_block(kept) + "\n\n" + messages[0]["content"]}, *messages[1:]]
        return [{"role": "system", "content": notes_block(kept)}, *messages]  # = memory.formats.policy_messages

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    async def generate(endpoint: str, body: dict, request: Request, chat: bool):
        principal = keys.authenticate(request.headers.get("authorization"))
        target = resolve(body, principal)
        s = parse_sampling(body, cfg.default_max_tokens if chat else 16, engine.cfg.max_tokens_limit)
        if engine.full():  # refuse before templating and tokenizing: a flood of 429s stays cheap
            e = engine.busy_error()
            raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(int(round(e.retry_after)))})
        user = user_of(target, principal, s)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if chat:
            messages = parse_messages(body)
            context = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
            messages = await notes_messages(user, messages)
            prompts = [render_prompt(tok, messages)]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                prompts = [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = prompt
            else:
                raise _bad("'prompt' must be a string or a non-empty list of strings", "prompt")
            if len(prompts) > engine.cfg.max_queue:
                raise _bad(f"at most {engine.cfg.max_queue} prompts per request", "prompt")
            if s.stream and len(prompts) > 1:
                raise _bad("stream: true takes a single prompt", "prompt")
            context = prompts[0]
        reqs = [GenerationRequest(encode(p), target, s.max_tokens, s.temperature, s.top_p, s.seed, s.stop,
                                  ignore_eos=s.ignore_eos, request_id=f"{rid}-{i}") for i, p in enumerate(prompts)]
        headers = {"X-Cogcore-Adapter": target.adapter_name, "X-Request-Id": rid}
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if s.stream:
            q, handle = submit(reqs[0])
            # wait for the first event before committing to a 200 stream: a failed adapter load or a
            # timeout in the queue still gets its own status
            try:
                first: Delta = await q.get()
            except BaseException:
                handle.cancel()
                raise
            if first.done and first.error is not None:
                raise failure(first.error)
            return StreamingResponse(stream(endpoint, q, handle, rid, created, body["model"], chat, s, target, user,
                                            context, first), media_type="text/event-stream", headers=headers)
        submitted = []
        try:
            for r in reqs:
                submitted.append(submit(r))
            results = []
            for q, _ in submitted:
                while True:
                    d: Delta = await q.get()
                    if d.done:
                        if d.error is not None:
                            raise failure(d.error)
                        results.append(d.result)
                        break
        finally:
            for _, h in submitted:
                if not h.done():
                    h.cancel()
        choices = []
        for i, res in enumerate(results):
            observe(endpoint, res)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": res.text},
                                "finish_reason": res.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None})
        await log_exchange(user, rid, context, results[0], target, endpoint)
        usage = {"prompt_tokens": sum(r.prompt_tokens for r in results),
                 "completion_tokens": sum(r.completion_tokens for r in results)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": body["model"],
                             "system_fingerprint": target.adapter_name, "choices": choices, "usage": usage},
                            headers=headers)

    async def stream(endpoint, q, handle, rid, created, model, chat, s, target, user, context, first: Delta):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, opening: bool = False) -> str:
            if chat:
                delta = {} if text is None else ({"role": "assistant", "content": text} if opening else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                          "system_fingerprint": target.adapter_name, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk("", None, opening=True)
            d = first
            while True:
                if d is None:
                    d = await q.get()
                if d.text:
                    yield chunk(d.text, None)
                if d.done:
                    break
                d = None
            if d.error is not None:
                err = failure(d.error)
                metrics.requests.labels(endpoint, str(err.status)).inc()
                yield "data: " + json.dumps(err.body()) + "\n\n"
            else:
                res = d.result
                observe(endpoint, res)
                yield chunk(None, res.finish_reason)
                if s.include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                                 "choices": [], "usage": {
                                                     "prompt_tokens": res.prompt_tokens,
                                                     "completion_tokens": res.completion_tokens,
                                                     "total_tokens": res.prompt_tokens + res.completion_tokens}}) + "\n\n"
                await log_exchange(user, rid, context, res, target, endpoint)
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done():
                handle.cancel()  # the client went away: free its batch row

    def endpoint_handler(endpoint: str, chat: bool):
        async def handler(request: Request):
            try:
                return await generate(endpoint, await read_json(request), request, chat)
            except ApiError as e:
                return error_response(e, endpoint)
            except Exception as e:  # never let one request take the server down
                log.exception("unexpected error in %s", endpoint)
                return error_response(ApiError(500, f"internal error: {e!r}", "server_error"), endpoint)
        return handler

    app.post("/v1/completions")(endpoint_handler("completions", chat=False))
    app.post("/v1/chat/completions")(endpoint_handler("chat", chat=True))

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            principal = keys.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return error_response(e, "models")
        data = [{"id": CORE, "object": "model", "created": int(started), "owned_by": "cogcore"}]
        reg = engine.registry
        users = await asyncio.to_thread(reg.users)
        for user in users:
            if not (principal.admin or principal.user == user):
                continue
            versions = await asyncio.to_thread(reg.versions, user)
            live = engine.cache.live_version(user)
            if live is not None:
                data.append({"id": f"{CORE}:{user}", "object": "model", "created": int(started), "owned_by": user,
                             "root": f"{user}@v{live}"})
            for art in versions:
                data.append({"id": art.name, "object": "model", "created": int(art.created), "owned_by": user,
                             "parent": CORE})
        metrics.requests.labels("models", "200").inc()
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "base_hash": engine.base_hash, "model": engine.cfg.model.source,
                "uptime_s": round(time.time() - started, 1), **engine.stats(),
                "adapters": engine.cache.state()}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        """{"id": <response id>, "text": "...", "reward": 1.0, "kind": "observation"|"feedback"}"""
        try:
            principal = keys.authenticate(request.headers.get("authorization"))
            body = await read_json(request)
            if experience is None or not experience.log_exchanges:
                raise ApiError(404, "feedback needs the server started with --log-experience", "not_enabled")
            episode = body.get("id") or body.get("episode_id") or body.get("request_id")
            if not isinstance(episode, str) or not episode:
                raise _bad("'id' (the response id the feedback is about) is required", "id")
            kind = body.get("kind") or ("observation" if body.get("text") else "reward")
            if kind not in ("observation", "feedback", "reward"):
                raise _bad("'kind' must be observation, feedback or reward", "kind")
            text = body.get("text", "")
            reward = body.get("reward")
            if not isinstance(text, str):
                raise _bad("'text' must be a string", "text")
            if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
                raise _bad("'reward' must be a number", "reward")
            user = experience.owner(episode) or body.get("user")
            if not isinstance(user, str) or not user:
                raise ApiError(404, f"unknown id {episode[:80]!r}: give the id of a response from this server "
                                    "(or 'user' with it)", "unknown_episode", "id")
            if not (principal.admin or principal.user == user):
                raise ApiError(403, "this API key may not give feedback on another user's exchange", "forbidden")
            meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
            from cogcore.memory.events import EventError
            try:
                added = await experience.run(experience.append_feedback, user, episode, kind, text, reward, meta)
            except EventError as e:
                raise _bad(str(e)) from None
            metrics.requests.labels("feedback", "200").inc()
            return {"ok": True, "added": added, "user": user, "episode_id": episode}
        except ApiError as e:
            return error_response(e, "feedback")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {exc!r}").body(), status_code=500)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", "not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(ApiError(405, f"method {request.method} is not allowed on {request.url.path}",
                                     "method_not_allowed").body(), status_code=405)

    return app


# ---------------------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CogcoreError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0 = any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """The whole server in this process: engine + app + uvicorn on a background thread.

        with Server(ServeConfig(engine=EngineConfig(model=ModelSpec("tiny-llama")), port=0)) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key="x").completions.create(model="core", prompt="Hi")

    `start()` returns once the socket accepts requests; `url` is http://HOST:PORT.
    """

    def __init__(self, cfg: ServeConfig, *, engine: Engine | None = None, keys: KeyRing | None = None, registry=None):
        self.cfg = cfg
        self.keys = keys if keys is not None else KeyRing.load(cfg.keys or None, os.environ.get("COGCORE_API_KEYS"))
        self.engine = engine if engine is not None else Engine(cfg.engine, registry)
        self.app = create_app(self.engine, cfg, self.keys)
        self._sock: socket.socket | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.cfg.port

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.port}"

    def _uvicorn(self):
        import uvicorn
        return uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                             timeout_graceful_shutdown=5))

    def start(self, timeout: float = 60.0) -> Server:
        self._sock = bind_socket(self.cfg.host, self.cfg.port)
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="cogcore-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise CogcoreError("the HTTP server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise CogcoreError(f"the HTTP server did not start within {timeout:g} s")
            time.sleep(0.02)
        return self

    def serve_forever(self, on_ready=None) -> None:
        """Run in this thread until SIGINT/SIGTERM; `on_ready(url)` once the socket accepts requests."""
        self._sock = bind_socket(self.cfg.host, self.cfg.port)
        self._server = self._uvicorn()

        async def main():
            task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
            while not self._server.started and not task.done():
                await asyncio.sleep(0.02)
            if self._server.started and on_ready is not None:
                on_ready(self.url)
            await task

        asyncio.run(main())

    def stop(self, timeout: float = 15.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ApiError", "ExperienceSink", "KeyRing", "Metrics", "Principal", "ServeConfig", "Server", "bind_socket",
           "create_app", "may_use", "parse_sampling"]
