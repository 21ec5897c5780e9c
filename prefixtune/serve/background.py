"""The server in a background thread of this process: for tests, notebooks and benchmarks.

``prefixtune serve`` is the way to run a server; this gives the same app on a free
loopback port while the caller keeps its own thread, and stops it cleanly (the batcher
thread too) when the ``with`` block ends.
"""

from __future__ import annotations

import threading
import time


class BackgroundServer:
    """Serve ``app`` (from :func:`~prefixtune.serve.app.create_app`) with uvicorn on ``host:port``
    (0 = a free port) in a daemon thread, under the same connection bounds as ``prefixtune serve``
    (its backend's limits).

    Use as a context manager; ``url`` is ``http://host:port`` once started.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        from .connections import uvicorn_config

        self.app = app
        config = uvicorn_config(app, app.state.backend.limits, host, port, log_level=log_level,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="prefixtune-http", daemon=True)
        self.host, self.url = host, None

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
