"""The HTTP side: an OpenAI-compatible API over a :class:`~prefixtune.serve.backend.Backend`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events), ``GET /v1/models``, ``POST``/``DELETE /v1/prefixes/NAME``,
``GET /health``, ``GET /metrics``, ``GET /openapi.json`` and the playground at ``/``.

Handlers never touch the model: they check who asks and what is sent (a JSON body, of bounded
size, within a time), hand the body to the checker thread (:mod:`.protocol`: parsing,
validation, tokenizing, off the event loop), give the rows to the backend, and turn its events
into a response (:mod:`.reply`). Every refusal is an :class:`~.errors.APIError` rendered in
OpenAI's error format.

A server without inference keys is open to whatever can reach it, web pages in the user's browser
included. So the API routes take ``application/json`` bodies only (a page can send other types
without the browser asking the server first), and without keys the ``Host`` header must name this
server (a page that rebinds its own domain to 127.0.0.1 still sends its domain).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import logging
from importlib import resources
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
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
from .backend import Backend
from .prometheus import Metrics
from .reply import Reply

log = logging.getLogger(__name__)

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def create_app(backend: Backend, metrics: Metrics | None = None, *, api_keys: tuple[str, ...] = (),
               admin_key: str | None = None, host: str = "127.0.0.1") -> Starlette:
    """The Starlette app; it starts the backend on startup and closes it on shutdown.

    Args:
        backend: What generates (a :class:`~prefixtune.serve.batcher.Batcher`, or the Ray front); its
            ``limits`` bound every request.
        metrics: The counters ``/metrics`` shows (the batcher's ``on_step`` should feed the same).
        api_keys: Inference keys: when any is set, every ``/v1`` route needs ``Authorization: Bearer
            KEY`` with one of them (or the admin key), and ``/health`` without it says only whether the
            server is up. Without any, the ``Host`` header must name ``host``.
        admin_key: The one credential for prefix management (``/v1/prefixes``); an inference key there
            gets 403. Without it, prefix management is off.
        host: The address the server is bound to (the ``Host`` rule of a server without keys).
    """
    check_keys(api_keys, admin_key)
    metrics = metrics or Metrics()
    api = _API(backend, metrics, api_keys, admin_key)
    routes = [
        Route("/", api.playground, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_page, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.model, methods=["GET"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/prefixes/{name}", api.prefix, methods=["POST", "DELETE"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not backend.started:
            backend.start()
        yield
        backend.close()

    guard = [Middleware(_Guard, max_header_bytes=backend.limits.max_header_bytes, host=None if api_keys else host)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=guard, exception_handlers={
        errors.APIError: _api_error, HTTPException: _http_error, ClientDisconnect: _gone, Exception: _crash})
    app.state.backend, app.state.metrics = backend, metrics
    return app


def check_keys(api_keys: tuple[str, ...], admin_key: str | None, names=("an inference key", "the admin key")) -> None:
    """Refuse an empty or blank key (an empty ``Bearer`` token would match it) and an admin key that is
    also an inference key (its holder could not be told from an inference client); ``ValueError``.
    ``names`` says where each kind came from, for the message (the command line names its option)."""
    named = [(key, names[0]) for key in api_keys] + ([] if admin_key is None else [(admin_key, names[1])])
    for key, name in named:
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"{name} is empty: give a key of visible characters, or none")
    if admin_key is not None and admin_key.strip() in {k.strip() for k in api_keys}:
        raise ValueError(f"{names[1]} is also {names[0]}: give it a key of its own")


def allowed_host(header: str, bound: str) -> bool:
    """Whether a ``Host`` header names this server: a loopback name, the bound address, or (bound to
    every interface) any IP address. A domain name is refused, so a page that rebinds its own domain
    to this machine cannot drive the server."""
    try:
        name = urlsplit("//" + header).hostname
    except ValueError:
        return False
    if not name:
        return False
    if name in LOOPBACK or name == bound.strip("[]").lower():
        return True
    return bound.strip("[]") in WILDCARDS and _is_ip(name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Guard:
    """ASGI middleware, before any route: headers over the bound get a 431 (uvicorn's h11 bounds headers
    that arrive piecemeal, not a complete request read at once), and when ``host`` is set (a server
    without keys), a ``Host`` that does not name it gets a 421."""

    def __init__(self, app, max_header_bytes: int, host: str | None):
        self.app, self.max_header_bytes, self.host = app, max_header_bytes, host

    async def __call__(self, scope, receive, send):
        error = self._refusal(scope) if scope["type"] == "http" else None
        if error is not None:
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, scope) -> errors.APIError | None:
        headers = scope["headers"]
        size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header_bytes:
            return errors.APIError(431, f"the request line and headers take {size} bytes; this server accepts at most "
                                   f"{self.max_header_bytes}", code="headers_too_large")
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.host is not None and not allowed_host(header, self.host):
            return errors.APIError(421, f"Host {header[:100]!r} does not name this server: a server without "
                                   "--api-key answers only to its own address", code="misdirected_request")
        return None


def _unauthenticated() -> errors.APIError:
    return errors.APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")


async def _api_error(request, err: errors.APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request, err: HTTPException):
    kind = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
    message = f"{request.method} {request.url.path[:200]}: {err.detail}"
    return JSONResponse(errors.APIError(err.status_code, message, code=kind).body(), status_code=err.status_code)


async def _crash(request, err: Exception):
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(errors.internal(f"internal error: {type(err).__name__}").body(), status_code=500)


async def _gone(request, err: ClientDisconnect):
    """The client left before its body arrived: nobody reads an answer, and nothing went wrong here."""
    return Response(status_code=499)


class _API:
    def __init__(self, backend: Backend, metrics: Metrics, api_keys: tuple[str, ...], admin_key: str | None):
        self.backend, self.metrics = backend, metrics
        self.limits = backend.limits
        # a token is compared stripped (a pasted key often ends in a newline), so the keys are too
        self.api_keys = tuple(k.strip().encode() for k in api_keys)
        self.admin_key = None if admin_key is None else admin_key.strip().encode()
        # requests are checked and tokenized here, one at a time, off the event loop: a large or deep body
        # never stalls other clients, and the tokenizer is never used by two encodes at once
        self.checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefixtune-check")

    # ------------------------------------------------------------ plumbing
    def _role(self, request: HTTPRequest) -> str | None:
        """``"admin"`` for the admin key, ``"user"`` for an inference key, else ``None`` (every key is
        compared in constant time, so the answer's timing tells nothing about the keys)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip().encode()
        admin = self.admin_key is not None and hmac.compare_digest(token, self.admin_key)
        user = [hmac.compare_digest(token, key) for key in self.api_keys]
        return "admin" if admin else "user" if any(user) else None

    def _authorized(self, request: HTTPRequest) -> bool:
        return not self.api_keys or self._role(request) is not None

    def _authorize(self, request: HTTPRequest) -> None:
        if not self._authorized(request):
            raise _unauthenticated()

    def _authorize_admin(self, request: HTTPRequest) -> None:
        if self.admin_key is None:
            raise errors.APIError(403, "prefix management is disabled: start the server with --admin-key",
                                  type="permission_error", code="admin_disabled")
        role = self._role(request)
        if role is None:
            raise _unauthenticated()
        if role != "admin":
            raise errors.APIError(403, "an inference key cannot manage prefixes: send the admin key",
                                  type="permission_error", code="admin_only")

    async def _body(self, request: HTTPRequest) -> bytes:
        """The raw body of a JSON request: ``application/json`` only (415), read no further than the size
        limit (413) and no longer than ``body_timeout`` (408). It is parsed on the checker thread."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise errors.APIError(415, f"Content-Type must be application/json, got {media[:100]!r}",
                                  code="unsupported_media_type")
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise errors.APIError(413, f"request body over {limit} bytes", code="body_too_large")
        try:
            return await asyncio.wait_for(_read(request, limit), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise errors.APIError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                                  code="body_timeout") from None

    async def _checked(self, check, *args):
        """``check(*args)`` on the checker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.checker, check, *args)

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.request(endpoint, status)

    # -------------------------------------------------------------- pages
    async def playground(self, request):
        page = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    async def health(self, request):
        """Up or not, for anyone; the models and the load only with the key (when the server has one)."""
        alive = self.backend.alive
        body = {"status": "ok" if alive else "unavailable"}
        if self._authorized(request):
            body.update(models=self.backend.model_names(), queue_depth=self.backend.queue_depth(),
                        active_requests=self.backend.active_rows())
        return JSONResponse(body, status_code=200 if alive else 503)

    async def metrics_page(self, request):
        text = self.metrics.render(self.backend.queue_depth(), self.backend.active_rows(),
                                   self.backend.prefix_stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def openapi(self, request):
        return JSONResponse(protocol.openapi())

    async def models(self, request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.backend.model_names()]})

    async def model(self, request):
        self._authorize(request)
        name = request.path_params["name"]
        if name not in self.backend.model_names():
            raise errors.unknown_model(name)
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict:
        base = name == self.backend.base_name
        return {"id": name, "object": "model", "created": 0, "owned_by": "prefixtune",
                "root": self.backend.base_name, "parent": None if base else self.backend.base_name}

    # -------------------------------------------------------- prefix admin
    async def prefix(self, request):
        endpoint = "/v1/prefixes"
        try:
            self._authorize_admin(request)
            name = request.path_params["name"]
            if request.method == "DELETE":
                future = self.backend.remove_prefix(name)
            else:
                path = await self._checked(protocol.prefix_load, await self._body(request))
                folder = await self._checked(self.backend.check_folder, path)
                future = self.backend.add_prefix(name, str(folder))
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
            raw = await self._body(request)
            job = await self._checked(make_job, raw, self.backend.tokenizer, self.limits, self.backend.context_length)
            reply = Reply(job, asyncio.get_running_loop())
            cache = await asyncio.wrap_future(self.backend.submit(reply.requests))  # a cold prefix loads meanwhile
        except errors.APIError as err:
            self._count(endpoint, err.status)
            raise
        if job.stream:  # the status is sent now; a later error is the stream's last event
            self._count(endpoint, 200)
            return StreamingResponse(reply.stream(), media_type="text/event-stream", headers={
                "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_cache_header(cache)})
        try:
            result = await reply.collect_unless_disconnected(request)
        except errors.APIError as err:
            self._count(endpoint, err.status)
            raise
        if result is None:
            self._count(endpoint, 499)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        self._count(endpoint, 200)
        return JSONResponse(reply.answer(*result), headers=_cache_header(cache))


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
