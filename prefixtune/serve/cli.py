"""``prefixtune serve``: load a base model and some prefixes, then serve them over HTTP.

The options are :class:`~prefixtune.serve.setup.ServeConfig`'s, and the server is assembled by
:mod:`.setup`. Kept light at import (``prefixtune --help`` imports it): torch, transformers,
starlette and uvicorn are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import logging

from .setup import ServeConfig

log = logging.getLogger(__name__)

SUMMARY = "serve a base model and many prefixes over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve --model (default: the bundled SmolLM2-135M-Instruct) with every --prefix NAME=DIR, and every prefix "
    "folder under each --prefix-dir (by folder name, loaded on first use, within --prefix-cache-mb), over an "
    "OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models). A request picks a prefix with "
    '"model": "NAME"; the base model\'s own name means no prefix. Concurrent requests are decoded together, '
    "one forward pass per step whatever their prefixes. With --api-key, /v1 needs 'Authorization: Bearer KEY'; "
    "with --admin-key, that key may add or remove prefixes at run time (POST/DELETE /v1/prefixes/NAME), from "
    "folders inside a --prefix-dir only. --ray --replicas N serves the same API from N replicas on Ray Serve, "
    "routing each prefix's requests to replicas that hold it. A playground is at /, health at /health, "
    "Prometheus metrics at /metrics. See docs/serving.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import options

    options.add_options(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    from .. import options
    from . import setup
    from .connections import open_file_limit

    cfg = options.build(ServeConfig, args)
    open_file_limit(cfg.limits.max_connections)
    if cfg.ray:
        from . import ray_serve

        app = ray_serve.build_front(cfg)
        return setup.serve(app, cfg)
    with setup.listen(cfg.host, cfg.port) as sock:  # before the model loads: a port in use is told at once
        app = setup.build_app(cfg)
        log.info("serving %s on http://%s:%d", _shown(app.state.backend.model_names()), cfg.host, cfg.port)
        return setup.serve(app, cfg, sock)


def _shown(names: list[str], most: int = 8) -> str:
    """The first names of a list that may hold thousands, for a log line."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
