"""`jaxaccel serve`: an OpenAI-compatible HTTP server (starlette on uvicorn, SSE through
sse-starlette, metrics through prometheus_client) over the continuous-batching scheduler.

Routes: POST /v1/completions, /v1/chat/completions, /v1/embeddings; GET /v1/models, /health,
/metrics. Request bodies are checked in openai_api.py; generation runs on the scheduler's
thread and each request's events come back to the event loop through its own asyncio queue.
Speculative decoding (prompt lookup) is per request: the body's "speculative", else the server's
--speculative; its draft counts go to /metrics and to the response's usage.
A client that disconnects mid-stream cancels its request (its slot is freed at the next step).
Shutdown (SIGTERM, Ctrl-C) lets uvicorn finish the open requests, then drains the scheduler.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import signal
import threading
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import openai_api as api
from .generation import _eos_ids
from .openai_api import ApiError
from .scheduler import SPECULATIVE, Observer, QueueFull, Request, Scheduler

DRAIN_S = 120.0  # on SIGTERM, open requests get this long to finish (uvicorn's graceful shutdown)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class Metrics(Observer):
    """The scheduler's hooks as prometheus series, on a registry of the server's own."""

    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("jaxaccel_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("jaxaccel_active_slots", "decode slots in use", registry=r)
        Gauge("jaxaccel_slots", "decode slots (--max-batch)", registry=r).set(slots)
        self.prompt = Counter("jaxaccel_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated = Counter("jaxaccel_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("jaxaccel_time_to_first_token_seconds", "submission to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.per_token = Histogram("jaxaccel_time_per_output_token_seconds", "time between output tokens",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.programs = Gauge("jaxaccel_compiled_programs", "serving programs compiled (prefill buckets + decode)",
                              registry=r)
        self.requests = Counter("jaxaccel_requests", "generation requests by how they ended", ["finish"], registry=r)
        self.http_errors = Counter("jaxaccel_http_errors", "error responses by status", ["status"], registry=r)
        self.drafted = Counter("jaxaccel_speculative_drafted_tokens", "draft tokens proposed (speculative requests)",
                               registry=r)
        self.accepted = Counter("jaxaccel_speculative_accepted_tokens",
                                "draft tokens the model agreed with and the text kept (speculative requests)", registry=r)

    def queue(self, depth: int, active: int) -> None:
        self.queue_depth.set(depth)
        self.active.set(active)

    def started(self, prompt_tokens: int, ttft: float) -> None:
        self.prompt.inc(prompt_tokens)
        self.ttft.observe(ttft)

    def tokens(self, n: int, seconds_per_token: float) -> None:
        self.generated.inc(n)
        for _ in range(n):
            self.per_token.observe(seconds_per_token)

    def finished(self, reason: str) -> None:
        self.requests.labels(reason).inc()

    def speculated(self, drafted: int, accepted: int) -> None:
        self.drafted.inc(drafted)
        self.accepted.inc(accepted)


class ApiKey:
    """Every route but /health answers 401 without `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                err = ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", kind="authentication_error")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The served models and the app. lm / encoder: loaded Models (either may be None).
    speculative: what a request that does not say speculates with ("none" or one of SPECULATIVE)."""

    def __init__(self, lm=None, lm_name: str = "", encoder=None, encoder_name: str = "", slots: int = 8,
                 context: int = 2048, max_queue: int = 64, api_key: str | None = None,
                 chat_template: str | None = None, timeout: float | None = 600.0, speculative: str = "none"):
        if lm is None and encoder is None:
            raise ValueError("nothing to serve: give a generation model, an embedding model or both")
        for what, value, low in (("--max-batch", slots, 1), ("--context", context, 16), ("--max-queue", max_queue, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {timeout!r}")
        if speculative not in SPECULATIVE + ("none",):
            raise ValueError(f"--speculative must be one of {', '.join(SPECULATIVE + ('none',))}, got {speculative!r}")
        self.speculative = speculative
        self.lm, self.encoder, self.timeout = lm, encoder, timeout
        self.served = {**({lm_name: "generate"} if lm is not None else {}),
                       **({encoder_name: "embed"} if encoder is not None else {})}
        self.names = {role: name for name, role in self.served.items()}
        self.metrics = Metrics(slots)
        self.chat_template, self.api_key = chat_template, api_key
        self.scheduler = None
        if lm is not None:
            context = min(context, lm.config.max_position_embeddings)
            self.scheduler = Scheduler(lm, slots, context, max_queue, _eos_ids(lm), self.metrics)
        self._embed_lock = threading.Lock()

    def warm_up(self) -> None:
        if self.scheduler is not None:
            self.scheduler.engine.warm_up((16, 32, 64), verify=self.speculative != "none")

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/metrics", self.prometheus), Route("/v1/models", self.models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"])]
        return Starlette(routes=routes, lifespan=self._lifespan, middleware=[Middleware(ApiKey, key=self.api_key)],
                         exception_handlers={ApiError: self._api_error, HTTPException: self._http_error,
                                             Exception: self._internal_error})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        if self.scheduler is not None:
            self.scheduler.start()
        yield
        if self.scheduler is not None:  # uvicorn has let open requests finish; end the loop
            await asyncio.to_thread(self.scheduler.stop, 60.0)

    # -- errors -----------------------------------------------------------------------------------

    async def _api_error(self, request, exc: ApiError):
        self.metrics.http_errors.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request, exc: HTTPException):
        return await self._api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                                       f"{exc.detail}", code="not_found" if exc.status_code == 404 else None))

    async def _internal_error(self, request, exc: Exception):
        return await self._api_error(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                       kind="server_error"))

    # -- simple routes ----------------------------------------------------------------------------

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        if self.scheduler is not None:
            self.metrics.programs.set(self.scheduler.engine.compiled_programs)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": now,
                                                         "owned_by": "jaxaccel"} for n in self.served]})

    def _role(self, body: dict, role: str) -> None:
        name = body.get("model")
        if name is None and role in self.names:
            return
        if not isinstance(name, str) or name not in self.served:
            raise ApiError(404, f"the model {json.dumps(name)} is not served here; served: {sorted(self.served)} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        if self.served[name] != role:
            other = "/v1/embeddings" if self.served[name] == "embed" else "/v1/completions or /v1/chat/completions"
            raise ApiError(400, f"the model {name!r} is served for {other}", param="model")

    # -- generation -------------------------------------------------------------------------------

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat(self, request):
        return await self._generate(request, chat=True)

    def _prompt(self, body: dict, chat: bool) -> list[int]:
        lm = self.lm
        if not chat:
            return api.prompt_ids(body, lm.tokenizer, lm.config.vocab_size)
        messages = api.check_messages(body)
        if self.chat_template is None:
            raise ApiError(400, f"the model {self.names['generate']!r} has no chat template (a base model): start the "
                           "server with --chat-template FILE (a jinja template), or use /v1/completions",
                           param="messages", code="no_chat_template")
        text = api.render_chat(self.chat_template, messages, lm.tokenizer)
        return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _generate(self, request: HttpRequest, chat: bool):
        body = api.parse_json(await request.body())
        if self.scheduler is None:
            raise ApiError(404, "no generation model is served here", param="model", code="model_not_found")
        self._role(body, "generate")
        f = api.sampling_fields(body, self.lm.config.vocab_size, chat)
        ids = self._prompt(body, chat)
        context = self.scheduler.engine.context
        if len(ids) + f["max_new"] > context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {f['max_new']}: together beyond "
                           f"the context of {context} tokens (--context); shorten the prompt or lower max_tokens",
                           param="max_tokens" if len(ids) < context else "prompt", code="context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        speculative = f["speculative"] or self.speculative
        reqs = [Request(ids, f["max_new"], float(f["temperature"]), f["top_k"], f["top_p"], f["seed"] + i, f["stop"],
                        f["top_logprobs"], self.timeout, speculative=None if speculative == "none" else speculative)
                for i in range(f["n"])]
        for i, r in enumerate(reqs):
            r.on_event = lambda e, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, e))
        try:
            for r in reqs:
                self.scheduler.submit(r)
        except QueueFull as e:
            for r in reqs:
                self.scheduler.cancel(r)
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        kind = "chat" if chat else "text"
        rid, model = api.new_id("chatcmpl" if chat else "cmpl"), self.names["generate"]
        if f["stream"]:
            return EventSourceResponse(self._stream(kind, rid, model, reqs, events, f["include_usage"], len(ids)),
                                       ping=15, shutdown_grace_period=DRAIN_S - 5)  # < uvicorn's: streams finish first
        try:
            return JSONResponse(await self._collect(kind, rid, model, reqs, events, len(ids)))
        finally:
            for r in reqs:
                self.scheduler.cancel(r)

    def _logprobs(self, kind: str, tokens, want) -> Any:
        if want is None:
            return None
        tok = self.lm.tokenizer
        return api.chat_logprobs(tokens, tok) if kind.startswith("chat") else api.completion_logprobs(tokens, tok)

    @staticmethod
    def _usage(reqs, prompt_tokens: int, ends: list) -> dict:
        """The usage of a request's choices from their "done" events."""
        speculative = tuple(sum(getattr(e, n) for e in ends) for n in ("drafted", "accepted")) \
            if reqs[0].speculative is not None else None
        return api.usage(prompt_tokens, sum(e.completion_tokens for e in ends), speculative)

    async def _collect(self, kind, rid, model, reqs, events, prompt_tokens) -> dict:
        texts, tokens, finish, ends = [""] * len(reqs), [[] for _ in reqs], [None] * len(reqs), []
        while len(ends) < len(reqs):
            i, e = await events.get()
            if e.kind == "error":
                raise ApiError(504 if "timeout" in e.message else 500, e.message,
                               kind="timeout" if "timeout" in e.message else "server_error")
            texts[i] += e.text
            tokens[i] += e.tokens
            if e.kind == "done":
                finish[i] = e.finish_reason
                ends.append(e)
        want = reqs[0].top_logprobs
        choices = [api.choice(kind, i, texts[i], finish[i], self._logprobs(kind, tokens[i], want)) for i in range(len(reqs))]
        return api.response(kind, rid, model, choices, self._usage(reqs, prompt_tokens, ends))

    async def _stream(self, kind, rid, model, reqs, events, include_usage, prompt_tokens):
        chunk, want = kind + ".chunk", reqs[0].top_logprobs
        first, ends = [True] * len(reqs), []
        try:
            while len(ends) < len(reqs):
                i, e = await events.get()
                if e.kind == "error":
                    yield json.dumps(ApiError(504 if "timeout" in e.message else 500, e.message,
                                              kind="server_error").body())
                    return
                if e.kind == "done":
                    ends.append(e)
                c = api.choice(chunk, i, e.text, e.finish_reason, self._logprobs(chunk, e.tokens, want) if e.tokens else None,
                               first=first[i] and kind == "chat")
                first[i] = False
                yield json.dumps(api.response(chunk, rid, model, [c], None))
            if include_usage:
                yield json.dumps(api.response(chunk, rid, model, [], self._usage(reqs, prompt_tokens, ends)))
            yield "[DONE]"
        finally:  # a client gone mid-stream: its slots are freed at the next step
            for r in reqs:
                self.scheduler.cancel(r)

    # -- embeddings -------------------------------------------------------------------------------

    async def embeddings(self, request):
        body = api.parse_json(await request.body())
        if self.encoder is None:
            raise ApiError(404, "no embedding model is served here (start with --embed-model)", param="model",
                           code="model_not_found")
        self._role(body, "embed")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ApiError(400, "'input' must be a non-empty string or list of non-empty strings", param="input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
        if body.get("dimensions") is not None:
            raise ApiError(400, "'dimensions' is not supported: the model's embeddings have a fixed size",
                           param="dimensions")
        from .encoder_tasks import EncodeStats, embed

        stats = EncodeStats()

        def run():
            with self._embed_lock:
                return embed(self.encoder, texts, truncate=True, stats=stats)

        vectors = await asyncio.to_thread(run)
        # base64: the float32 values' little-endian bytes (what OpenAI's client asks for by default)
        as_json = (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if encoding == "base64" else \
            (lambda v: v.tolist())
        data = [{"object": "embedding", "index": i, "embedding": as_json(v)} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.names["embed"],
                             "usage": {"prompt_tokens": stats.tokens, "total_tokens": stats.tokens}})


def serve(server: Server, host: str, port: int, log=print) -> None:
    """Compile the programs, then serve until SIGTERM / Ctrl-C (open requests finish first)."""
    import uvicorn

    t = time.perf_counter()
    server.warm_up()
    log(f"compiled the serving programs in {time.perf_counter() - t:.1f}s; serving {sorted(server.served)} "
        f"on http://{host}:{port}/v1")
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again for the handler it found:
    # a handler that does nothing makes a drained shutdown exit 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(DRAIN_S))
