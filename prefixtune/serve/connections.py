"""HTTP connections under bounds: header size, time to send headers, idle time, how many at once.

uvicorn holds the settings: ``h11_max_incomplete_event_size`` bounds the request line and headers
(h11 refuses a larger one), ``timeout_keep_alive`` closes a connection idle after a response, and
``limit_concurrency`` answers 503 to every request while more connections are open. They apply to
uvicorn's h11 protocol (its httptools one, chosen by default when installed, has no header bound),
so the server always runs h11, as :class:`BoundedH11Protocol`, which adds the two things uvicorn
leaves out: the status h11 asks for when headers are too large (431, where uvicorn sends 400) and
a deadline on the headers themselves (uvicorn times nothing before a connection's first request,
so a client that connects and sends nothing, or half its headers, would hold the connection).
:func:`uvicorn_config` sets all of it from :class:`~prefixtune.serve.limits.Limits`.
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import Limits

log = logging.getLogger(__name__)

TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
             b"connection: close\r\ncontent-length: 31\r\n\r\nRequest header fields too large")
TOO_SLOW = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with 431 for oversized headers and a deadline for sending them."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request; when the cause is the header bound, say so with 431 and close."""
        if len(self.conn.trailing_data[0]) <= self.config.h11_max_incomplete_event_size:
            return super().send_400_response(msg)
        self.logger.warning("Request headers over %d bytes", self.config.h11_max_incomplete_event_size)
        self.transport.write(TOO_LARGE)
        self.transport.close()

    def _watch_headers(self) -> None:
        """A deadline runs while the connection waits for a request's line and headers (h11's ``IDLE``):
        from the connection's opening, or from the end of the previous response."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        elif not waiting:
            self._stop_deadline()

    def _stop_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(TOO_SLOW)
            self.transport.close()


def uvicorn_config(app, limits: Limits, host: str = "127.0.0.1", port: int = 8000, **settings) -> uvicorn.Config:
    """uvicorn's config for ``app`` with ``limits``' header, connection and idle bounds (``settings``:
    any other of uvicorn's, e.g. ``log_level``)."""
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,), {"header_timeout": limits.header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol,
                          h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections,
                          **settings)


FILES_BESIDES_CONNECTIONS = 256
"""Open files a server needs besides its connections: the model's, logs, pipes, Ray's sockets."""


def open_file_limit(max_connections: int) -> None:
    """Raise this process's soft limit on open files to what ``max_connections`` needs (each connection is
    a file): beyond the soft limit, ``accept`` fails and new clients wait unanswered, which is worse than
    the 503 the connection bound gives. Where the hard limit is lower, it is raised that far and a warning
    says so."""
    try:
        import resource
    except ImportError:  # not a Unix: the system's own limit applies
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FILES_BESIDES_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning("--max-connections %d: this process may open at most %d files (ulimit -Hn), so clients beyond "
                    "about %d connections wait unanswered instead of getting a 503", max_connections, hard,
                    hard - FILES_BESIDES_CONNECTIONS)
        needed = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
