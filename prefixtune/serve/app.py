"""The HTTP side: an OpenAI-compatible API over a :class:`~prefixtune.serve.batcher.Batcher`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events), ``GET /v1/models``, ``POST``/``DELETE /v1/prefixes/NAME``,
``GET /health``, ``GET /metrics`` and the playground at ``/``.

Handlers never touch the model: they check a request (:mod:`.protocol`), hand it to the
batcher, and turn the batcher's events (delivered from its thread with
``call_soon_threadsafe``) into a response. Every refusal is an :class:`~.errors.APIError`
rendered in OpenAI's error format; a client that goes away cancels its rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from . import errors, protocol
from .batcher import Batcher, Event, Request
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """Options of the HTTP layer.

    Args:
        api_keys: Inference keys: when any is set, every ``/v1`` route needs
            ``Authorization: Bearer KEY`` with one of them (or the admin key), and ``/health``
            without it says only whether the server is up.
        admin_key: The one credential for prefix management (``/v1/prefixes``); an inference key
            there gets 403. Without it, prefix management is off.
        max_body_bytes: Largest request body (a larger one is a 413, read no further).
        body_seconds: How long a client may take to send its body (then 408): a client that
            stops mid-body does not hold a connection open.
        limits: What one request may ask for.
    """

    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    max_body_bytes: int = 1 << 20
    body_seconds: float = 30.0
    limits: protocol.ServeLimits = None

    def __post_init__(self):
        self.limits = self.limits or protocol.ServeLimits()


def create_app(batcher: Batcher, options: ServerOptions | None = None, metrics: Metrics | None = None) -> Starlette:
    """The Starlette app; it starts the batcher's thread on startup and stops it on shutdown."""
    options = options or ServerOptions()
    metrics = metrics or Metrics()
    api = _API(batcher, options, metrics)
    routes = [
        Route("/", api.playground, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/prefixes/{name}", api.prefix, methods=["POST", "DELETE"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not batcher.started:
            batcher.start()
        yield
        batcher.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        errors.APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _gone, Exception: _crash})
    app.state.batcher, app.state.metrics = batcher, metrics
    return app


def _unauthenticated() -> errors.APIError:
    return errors.APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")


async def _api_error(request, err: errors.APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request, err: HTTPException):
    kind = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
    message = f"{request.method} {request.url.path}: {err.detail}"
    return JSONResponse(errors.APIError(err.status_code, message, code=kind).body(), status_code=err.status_code)


async def _crash(request, err: Exception):
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(errors.internal(f"internal error: {type(err).__name__}").body(), status_code=500)


async def _gone(request, err: ClientDisconnect):
    """The client left before its body arrived: nobody reads an answer, and nothing went wrong here."""
    return Response(status_code=499)


class _API:
    def __init__(self, batcher: Batcher, options: ServerOptions, metrics: Metrics):
        self.batcher, self.options, self.metrics = batcher, options, metrics
        self.tokenizer = batcher.tokenizer
        # requests are checked and tokenized here, one at a time, off the event loop: a body of many
        # prompts never stalls other clients, and the tokenizer is never used by two encodes at once
        self.checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefixtune-check")

    # ------------------------------------------------------------ plumbing
    def _role(self, request: HTTPRequest) -> str | None:
        """``"admin"`` for the admin key, ``"user"`` for an inference key, else ``None`` (every key is
        compared in constant time, so the answer's timing tells nothing about the keys)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip().encode()
        admin = self.options.admin_key is not None and hmac.compare_digest(token, self.options.admin_key.encode())
        user = [hmac.compare_digest(token, key.encode()) for key in self.options.api_keys]
        return "admin" if admin else "user" if any(user) else None

    def _authorized(self, request: HTTPRequest) -> bool:
        return not self.options.api_keys or self._role(request) is not None

    def _authorize(self, request: HTTPRequest) -> None:
        if not self._authorized(request):
            raise _unauthenticated()

    def _authorize_admin(self, request: HTTPRequest) -> None:
        if self.options.admin_key is None:
            raise errors.APIError(403, "prefix management is disabled: start the server with --admin-key",
                                  type="permission_error", code="admin_disabled")
        role = self._role(request)
        if role is None:
            raise _unauthenticated()
        if role != "admin":
            raise errors.APIError(403, "an inference key cannot manage prefixes: send the admin key",
                                  type="permission_error", code="admin_only")

    async def _json(self, request: HTTPRequest) -> dict:
        """The body as a JSON object, read no further than the size limit and no longer than
        ``body_seconds``, every string in it valid Unicode (:func:`protocol.check_text`)."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise errors.APIError(413, f"request body over {limit} bytes", code="body_too_large")
        try:
            raw = await asyncio.wait_for(_read(request, limit), self.options.body_seconds)
        except asyncio.TimeoutError:
            raise errors.APIError(408, f"the request body did not arrive within {self.options.body_seconds:g} s",
                                  code="body_timeout") from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise errors.bad_request(f"the body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be a JSON object", code="invalid_json")
        protocol.check_text(body)
        return body

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.request(endpoint, status)

    # -------------------------------------------------------------- pages
    async def playground(self, request):
        page = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    async def health(self, request):
        """Up or not, for anyone; the models and the load only with the key (when the server has one)."""
        alive = self.batcher.alive
        body = {"status": "ok" if alive else "unavailable"}
        if self._authorized(request):
            body.update(models=self.batcher.model_names(), queue_depth=self.batcher.queue_depth(),
                        active_requests=self.batcher.active_rows())
        return JSONResponse(body, status_code=200 if alive else 503)

    async def metrics_page(self, request):
        text = self.metrics.render(self.batcher.queue_depth(), self.batcher.active_rows(), self.batcher.store.stats)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.batcher.model_names()]})

    async def model(self, request):
        self._authorize(request)
        name = request.path_params["name"]
        names = self.batcher.model_names()
        if name not in names:
            raise errors.unknown_model(name, names)
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict:
        base = name == self.batcher.base_name
        return {"id": name, "object": "model", "created": 0, "owned_by": "prefixtune",
                "root": self.batcher.base_name, "parent": None if base else self.batcher.base_name}

    # -------------------------------------------------------- prefix admin
    async def prefix(self, request):
        endpoint = "/v1/prefixes"
        try:
            self._authorize_admin(request)
            name = request.path_params["name"]
            if request.method == "DELETE":
                future = self.batcher.remove_prefix(name)
            else:
                body = await self._json(request)
                path = body.get("path")
                if not isinstance(path, str) or not path:
                    raise errors.bad_request("'path' must name the folder of a saved prefix", param="path")
                folder = await asyncio.get_running_loop().run_in_executor(None, self.batcher.store.check_folder, path)
                future = self.batcher.add_prefix(name, str(folder))
            result = await asyncio.wrap_future(future)
        except errors.APIError as err:
            self._count(endpoint, err.status)
            raise
        self._count(endpoint, 200)
        return JSONResponse(result)

    # --------------------------------------------------------- generation
    async def completions(self, request):
        return await self._generate(request, "/v1/completions", protocol.completion_job)

    async def chat(self, request):
        return await self._generate(request, "/v1/chat/completions", protocol.chat_job)

    async def _generate(self, request, endpoint: str, make_job):
        try:
            self._authorize(request)
            body = await self._json(request)
            protocol.check_count(body, self.options.limits, self.batcher.limits.max_queue)  # before tokenizing
            job = await asyncio.get_running_loop().run_in_executor(
                self.checker, make_job, body, self.tokenizer, self.options.limits)
            run = _Run(job, asyncio.get_running_loop())
            cache = await asyncio.wrap_future(self.batcher.submit(run.requests))  # a cold prefix loads meanwhile
        except errors.APIError as err:
            self._count(endpoint, err.status)
            raise
        if job.stream:  # the status is sent now; a later error is the stream's last event
            self._count(endpoint, 200)
            return StreamingResponse(_stream(run), media_type="text/event-stream", headers={
                "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_cache_header(cache)})
        try:
            result = await _unless_disconnected(request, run)
        except errors.APIError as err:
            self._count(endpoint, err.status)
            raise
        if result is None:
            self._count(endpoint, 499)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        self._count(endpoint, 200)
        texts, reasons = result
        return JSONResponse(protocol.response(job, run.id, texts, reasons, run.usage()), headers=_cache_header(cache))


def _cache_header(cache: str | None) -> dict:
    """``X-Prefix-Cache: hit`` (the prefix was on the device) or ``miss`` (it was loaded for this request)."""
    return {} if cache is None else {"X-Prefix-Cache": cache}


async def _read(request: HTTPRequest, limit: int) -> bytes:
    """The body, or a 413 as soon as it grows past ``limit`` bytes."""
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise errors.APIError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(piece)
    return b"".join(chunks)


async def _unless_disconnected(request: HTTPRequest, run: "_Run"):
    """``run.collect()``, or ``None`` if the client hangs up first: then its rows are
    cancelled at once (otherwise a dropped request would keep them until ``max_tokens``)."""
    collect = asyncio.ensure_future(run.collect())
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()
            run.cancel()
    if not collect.done() or collect.cancelled():
        return None
    return collect.result()


async def _disconnect(request: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Run:
    """The batcher requests of one HTTP request (``n`` choices per prompt) and their events."""

    def __init__(self, job: protocol.Job, loop: asyncio.AbstractEventLoop):
        self.job, self.loop = job, loop
        self.id = protocol.new_id(job.kind)
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = [
            Request(prompt, job.model, job.choice_params(c), sink=self._sink(p * job.n + c))
            for p, prompt in enumerate(job.prompts) for c in range(job.n)
        ]
        self.completion_tokens = [0] * len(self.requests)

    def _sink(self, index: int):
        def sink(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass
        return sink

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    def usage(self) -> dict:
        return protocol.usage(sum(len(p) for p in self.job.prompts), sum(self.completion_tokens))

    def echo(self, index: int) -> str:
        return self.job.echo[index // self.job.n] if self.job.echo else ""

    async def events_until_done(self):
        """Yield ``(index, event)`` until every choice has finished; raise the first error."""
        pending = len(self.requests)
        while pending:
            index, event = await self.events.get()
            if event.error is not None:
                self.cancel()
                raise event.error
            if event.finish_reason is not None:
                pending -= 1
                self.completion_tokens[index] = event.completion_tokens
            yield index, event

    async def collect(self) -> tuple[list[str], list[str]]:
        texts = [self.echo(i) for i in range(len(self.requests))]
        reasons = [""] * len(self.requests)
        async for index, event in self.events_until_done():
            texts[index] += event.text
            if event.finish_reason:
                reasons[index] = event.finish_reason
        return texts, reasons


async def _stream(run: _Run):
    """Server-sent events: OpenAI's chunks, then ``[DONE]``; an error ends the stream with
    an ``{"error": ...}`` event. A client that disconnects cancels its rows."""
    job = run.job
    try:
        for index in range(len(run.requests)):
            if job.kind == "chat":
                yield _sse(protocol.chunk(job, run.id, index, None, None, first=True))
            elif job.echo:
                yield _sse(protocol.chunk(job, run.id, index, run.echo(index), None))
        async for index, event in run.events_until_done():
            if event.text:
                yield _sse(protocol.chunk(job, run.id, index, event.text, None))
            if event.finish_reason:
                yield _sse(protocol.chunk(job, run.id, index, None, event.finish_reason))
        if job.include_usage:
            yield _sse(protocol.usage_chunk(job, run.id, run.usage()))
        yield "data: [DONE]\n\n"
    except errors.APIError as err:
        yield _sse(err.body())
    finally:
        run.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
