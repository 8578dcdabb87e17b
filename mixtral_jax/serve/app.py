"""The HTTP server: OpenAI's completion endpoints over the engine, as a Starlette app.

  POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events)
  GET /v1/models, GET /health, GET /metrics

The engine runs on its own thread and tells the event loop of a stream's new events through
`Stream.listen` (`call_soon_threadsafe` setting the run's asyncio event): no thread waits per
stream. Each wake-up takes every event waiting and sends them as one chunk (a loop running behind
the engine under load sends fewer, larger chunks rather than falling further behind). A client that goes away cancels its stream at once: for a streamed answer
sse-starlette sees the disconnect and cancels the generator (whose `finally` calls
`stream.cancel()`); for a whole answer the loop polls `request.is_disconnected()`.

Security: with an API key every path but /health needs `Authorization: Bearer KEY` (compared in
constant time; /health stays open for load balancers' probes and tells nothing about the model);
bodies over `max_body_bytes` are a 413 before they are read whole; prompts over
`max_prompt_tokens` a 400. Request fields only become numbers, strings to tokenise and token ids:
nothing reaches a shell, a path or a pickle.

Draining (SIGTERM, see __main__): new requests get a 503; running streams go on for up to
`drain_timeout_s`, then are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import secrets
import time

import anyio
import anyio.to_thread
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mixtral_jax.config import ConfigError
from mixtral_jax.serve import protocol
from mixtral_jax.serve.detok import TextStream
from mixtral_jax.serve.engine import EngineClosed, Event, QueueFull, Request, TooLong
from mixtral_jax.serve.metrics import Metrics
from mixtral_jax.serve.protocol import ApiError, Generation

log = logging.getLogger("mixtral_jax.serve")

MAX_BODY_BYTES = 4 << 20  # a 32k-token prompt is ~130 kB of text: room for long chats
OPEN_PATHS = frozenset({"/health"})
RETRY_AFTER_S = 1


class _Auth:
    """ASGI middleware: every HTTP path but OPEN_PATHS needs `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        self.app, self._expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                error = ApiError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    status=401,
                    code="invalid_api_key",
                    kind="authentication_error",
                )
                response = JSONResponse(
                    error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _waiting_events(stream) -> list:
    """Every event already waiting on the stream, up to and including a finish."""
    events = []
    while not events or events[-1].finish is None:
        try:
            events.append(stream.get(timeout=0))
        except queue.Empty:
            break
    return events


def _merged(events: list) -> Event:
    """Consecutive events as one: their tokens and routing in order, the last one's finish."""
    if len(events) == 1:
        return events[0]
    has_routing = any(e.routing is not None for e in events)
    routing = [r for e in events for r in (e.routing or [])] if has_routing else None
    last = events[-1]
    return Event([t for e in events for t in e.tokens], routing, last.finish, last.error)


class _Run:
    """One request's generation as the HTTP side sees it: text (cut at stop strings), tokens,
    routing, finish reason and latency metrics."""

    def __init__(self, server: _Server, gen: Generation, stream, arrival: float):
        self.server, self.gen, self.stream, self.arrival = server, gen, stream, arrival
        self.text = TextStream(server.tokenizer, gen.stop)
        self.routing: list = []
        self.finish: str | None = None
        self.error: str | None = None
        self._engine_done = False
        self._last: float | None = None

    def _take(self, event) -> tuple[list[int], list]:
        """Applies one engine event -> (its kept token ids, their routing)."""
        kept = self.text.add(event.tokens)
        ids, routing = list(event.tokens[:kept]), list((event.routing or [])[:kept])
        if not self.gen.stream:  # a whole answer returns it all at the end
            self.routing += routing
        self._observe(len(ids))
        if event.finish is not None:
            self._engine_done = True
        if self.text.stopped:
            self.finish = "stop"
        elif event.finish is not None:
            self.finish, self.error = event.finish, event.error
            self.text.finish()
        return ids, routing

    def _observe(self, n: int) -> None:
        if not n:
            return
        now = time.monotonic()
        metrics = self.server.metrics
        metrics.tokens(n, now)
        if self._last is None:
            metrics.ttft.observe(now - self.arrival)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                metrics.itl.observe(gap)
        self._last = now

    async def events(self, request: HttpRequest | None):
        """Yields (new token ids, their routing) until the run finishes; with `request`, a
        disconnected client ends it. The engine stream is cancelled unless it finished."""
        server, loop, ready = self.server, asyncio.get_running_loop(), asyncio.Event()
        self.stream.listen(lambda: loop.call_soon_threadsafe(ready.set))
        try:
            while self.finish is None:
                ready.clear()  # set again by any event delivered after this point
                events = _waiting_events(self.stream)
                if events:
                    yield self._take(_merged(events))
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ready.wait(), server.poll_s)
                if request is not None and self.finish is None and await request.is_disconnected():
                    self.finish = "cancelled"
        finally:
            if not self._engine_done:
                self.stream.cancel()
            server.metrics.finished.labels(self.finish or "cancelled").inc()
            server.metrics.duration.observe(time.monotonic() - self.arrival)


class _Server:
    """The app's state and handlers (one per app)."""

    def __init__(self, engine, tokenizer, limits, *, api_key, max_body_bytes, drain_s, poll_s):
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.drain_s, self.poll_s = drain_s, poll_s
        self.metrics = Metrics(engine.stats)
        self.draining = False
        self.created = int(time.time())

    # ---- plain endpoints -----------------------------------------------------------------
    async def health(self, request):
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request):
        card = {
            "id": self.limits.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "mixtral_jax",
            "max_model_len": self.limits.context,
            "vocab_size": self.limits.vocab_size,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics_page(self, request):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- generation ----------------------------------------------------------------------
    async def completions(self, request):
        return await self._generate(request, protocol.parse_completion, "completions")

    async def chat(self, request):
        return await self._generate(request, protocol.parse_chat, "chat")

    async def _generate(self, request, parse, endpoint: str):
        status = 500
        try:
            response = await self._answer(request, parse)
            status = response.status_code
            return response
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    async def _answer(self, request, parse):
        arrival = time.monotonic()
        if self.draining:
            raise ApiError("the server is shutting down", status=503, code="unavailable")
        body = await self._body(request)
        gen = await anyio.to_thread.run_sync(parse, body, self.tokenizer, self.limits)
        stream = self._submit(gen)
        self.metrics.prompt_tokens.inc(len(gen.prompt))
        run = _Run(self, gen, stream, arrival)
        request_id = ("chatcmpl-" if gen.chat else "cmpl-") + secrets.token_hex(12)
        head = protocol.envelope(gen, request_id, int(time.time()), self.limits.model_name, True)
        if gen.stream:
            return EventSourceResponse(
                self._chunks(run, head),
                ping=15,
                shutdown_grace_period=self.drain_s,
            )
        return await self._whole(run, request, head)

    def _submit(self, gen: Generation):
        try:
            return self.engine.submit(
                Request(
                    prompt=gen.prompt,
                    max_tokens=gen.max_tokens,
                    sampling=gen.sampling,
                    seed=gen.seed,
                    routing=gen.routing,
                    stop_ids=gen.stop_ids,
                    ignore_eos=gen.ignore_eos,
                )
            )
        except QueueFull:
            raise ApiError(
                "the request queue is full: retry later",
                status=429,
                code="queue_full",
                kind="rate_limit_error",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except EngineClosed:
            raise ApiError("the server is shutting down", status=503, code="unavailable") from None
        except TooLong as e:
            raise ApiError(str(e), param="max_tokens", code="context_length_exceeded") from None
        except ConfigError as e:
            raise ApiError(str(e)) from None

    async def _body(self, request) -> dict:
        """The JSON object of the body; 413 past max_body_bytes (read no further), 400 if not
        JSON (NaN and Infinity are not JSON)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _too_large(length, limit) if length.isdigit() else ApiError("bad Content-Length")
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise _too_large(f"more than {limit}", limit)
        try:
            body = json.loads(bytes(data), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ApiError(f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError("the body must be a JSON object", code="invalid_json")
        return body

    async def _whole(self, run: _Run, request, head: dict) -> Response:
        ids: list[int] = []
        async for new, _ in run.events(request):
            ids += new
        if run.finish == "error":
            raise ApiError(
                f"generation failed: {run.error}",
                status=500,
                code="engine_error",
                kind="server_error",
            )
        gen = run.gen
        text = run.text.take(final=True)
        choice = protocol.choice(gen, text, run.finish, ids, run.routing)
        body = {
            **protocol.envelope(gen, head["id"], head["created"], head["model"], False),
            "choices": [choice],
            "usage": protocol.usage(len(gen.prompt), len(ids)),
        }
        if gen.return_token_ids:
            body["prompt_token_ids"] = gen.prompt
        return JSONResponse(body)

    async def _chunks(self, run: _Run, head: dict):
        """The server-sent events of a streamed answer: OpenAI's chunks, then [DONE]."""
        gen, count = run.gen, 0
        if gen.chat:
            yield json.dumps(protocol.role_chunk(gen, head))
        if gen.return_token_ids:
            yield json.dumps({**head, "choices": [], "prompt_token_ids": gen.prompt})
        async for new, routing in run.events(None):
            count += len(new)
            text = run.text.take()
            if text or (new and (gen.routing or gen.return_token_ids)):
                choice = protocol.choice(gen, text, None, new, routing, delta=True)
                yield json.dumps({**head, "choices": [choice]})
        if run.finish == "error":
            error = ApiError(f"generation failed: {run.error}", code="engine_error")
            yield json.dumps({"error": {**error.body()["error"], "type": "server_error"}})
        else:
            last = protocol.choice(gen, run.text.take(final=True), run.finish, [], [], delta=True)
            yield json.dumps({**head, "choices": [last]})
            if gen.include_usage:
                usage = protocol.usage(len(gen.prompt), count)
                yield json.dumps({**head, "choices": [], "usage": usage})
        yield "[DONE]"

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Serving between start-up and shut-down; draining (503s) from the shut-down on."""
        yield
        self.draining = True


def _too_large(size, limit: int) -> ApiError:
    return ApiError(
        f"request body of {size} bytes exceeds the limit of {limit} bytes",
        status=413,
        code="body_too_large",
    )


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _api_error(request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request, exc: HTTPException):
    error = ApiError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request, exc: Exception):
    log.exception("internal error on %s", request.url.path, exc_info=exc)
    error = ApiError("internal server error", status=500, code="internal", kind="server_error")
    return JSONResponse(error.body(), status_code=500)


def create_app(
    engine,
    tokenizer,
    *,
    model_name: str,
    context: int,
    vocab_size: int | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_tokens: int | None = None,
    drain_timeout_s: float = 30.0,
    poll_s: float = 0.25,
) -> Starlette:
    """The Starlette app serving `engine` (started and shut down by the caller).

    Args:
      engine: a started `serve.engine.Engine` (or one started before the first request).
      tokenizer: the checkpoint's `Tokenizer`.
      model_name: the name /v1/models shows and requests' `model` must match.
      context: the model's context in tokens (prompt + max_tokens may not exceed it).
      vocab_size: the model's vocabulary (token-id prompts are checked against it).
      api_key: when set, every path but /health needs `Authorization: Bearer <api_key>`.
      max_body_bytes: larger request bodies are a 413.
      max_prompt_tokens: longer prompts are a 400 (default: the context less one).
      drain_timeout_s: on shutdown, how long running streams may go on before they are cancelled.
      poll_s: longest wait of a run for an event (also the disconnect check of whole answers).
    """
    if max_prompt_tokens is None:
        max_prompt_tokens = context - 1
    if not 1 <= max_prompt_tokens < context:
        raise ConfigError(f"max_prompt_tokens={max_prompt_tokens} must be in [1, {context})")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes={max_body_bytes} must be >= 1")
    limits = protocol.Limits(
        model_name, context, vocab_size or tokenizer.vocab_size, max_prompt_tokens
    )
    server = _Server(
        engine,
        tokenizer,
        limits,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        drain_s=drain_timeout_s,
        poll_s=poll_s,
    )
    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_Auth, key=api_key)] if api_key else [],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=server.lifespan,
    )
    app.state.server = server
    return app
