"""``prefixtune serve``: load a base model and some prefixes, then serve them over HTTP.

Kept light at import (``prefixtune --help`` imports it): torch, transformers, starlette
and uvicorn are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from ..config import Checked, _opt

SUMMARY = "serve a base model and many prefixes over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve --model (default: the bundled SmolLM2-135M-Instruct) with every --prefix NAME=DIR over an "
    "OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models). A request picks a prefix with "
    '"model": "NAME"; the base model\'s own name means no prefix. Concurrent requests are decoded together, '
    "one forward pass per step whatever their prefixes. With --api-key, /v1 needs 'Authorization: Bearer KEY' "
    "and prefixes can be added or removed at run time (POST/DELETE /v1/prefixes/NAME). A playground is at /, "
    "health at /health, Prometheus metrics at /metrics. See docs/serving.md."
)


@dataclass
class ServeConfig(Checked):
    """What ``prefixtune serve`` serves, and its limits (checked like every other command's options)."""

    model: str | None = _opt(None, "base model: Hub id or folder (default: the bundled model)")
    prefix: tuple[str, ...] = _opt((), "serve the prefix saved in DIR as model NAME (repeatable)", repeat=True,
                                   metavar="NAME=DIR")
    host: str = _opt("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)")
    port: int = _opt(8000, "port to listen on", ge=0, le=65535)
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on /v1 routes; also enables prefix "
                               "management (default: $PREFIXTUNE_API_KEY if set)")
    served_model_name: str | None = _opt(None, "name of the base model in the API (default: the model's name_or_path)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str | None = _opt(None, "weights dtype, e.g. float32, bfloat16 (default: the model's)")
    attn_implementation: str = _opt("sdpa", "attention kernel of the base model", choices=("sdpa", "eager"))
    max_batch: int = _opt(32, "most requests decoded together", ge=1)
    max_queue: int = _opt(256, "most requests waiting; more get 429", ge=1)
    max_tokens: int = _opt(512, "largest max_tokens a request may ask", ge=1)
    max_prompt_tokens: int = _opt(2048, "longest prompt accepted (413 above)", ge=1)
    max_body_mb: float = _opt(1.0, "largest request body in MiB (413 above)", gt=0)
    body_timeout: float = _opt(30.0, "seconds a client may take to send its request body (408 after)", gt=0)
    log_level: str = _opt("info", "server log level", choices=("critical", "error", "warning", "info", "debug"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import options

    options.add_options(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from .. import options

    cfg = options.build(ServeConfig, args)
    app = build_app(cfg, api_key=cfg.api_key or os.environ.get("PREFIXTUNE_API_KEY") or None)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", ", ".join(app.state.batcher.model_names()),
                                     cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0


def build_app(args: ServeConfig, api_key: str | None = None):
    """Load the model and prefixes ``args`` names and build the app (no server started)."""
    from ..base_models import load_model
    from ..model import PrefixModel
    from ..runtime import pick_device
    from .app import ServerOptions, create_app
    from .batcher import Batcher, Limits
    from .metrics import Metrics
    from .protocol import ServeLimits

    prefixes = parse_prefixes(args.prefix)
    model, tokenizer = load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation)
    model.to(pick_device(args.device))
    pm = PrefixModel(model, tokenizer=tokenizer)
    for name, directory in prefixes.items():
        pm.load_prefix(directory, name=name)
    base = args.served_model_name or model.config.name_or_path or "base"
    if base in prefixes:
        raise ValueError(f"prefix name {base!r} is the base model's name; pick another")
    metrics = Metrics()
    batcher = Batcher(pm, tokenizer, base, Limits(max_batch=args.max_batch, max_queue=args.max_queue),
                      on_step=metrics.step)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    limits = ServeLimits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, context_length=context)
    server = ServerOptions(api_key=api_key, limits=limits, max_body_bytes=int(args.max_body_mb * 2**20),
                           body_seconds=args.body_timeout)
    return create_app(batcher, server, metrics)


def parse_prefixes(items: list[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}``; refuses bad or repeated names."""
    from .batcher import NAME

    out = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not directory:
            raise ValueError(f"--prefix {item!r}: expected NAME=DIR")
        if not NAME.match(name):
            raise ValueError(f"--prefix {item!r}: NAME may use letters, digits and . _ : - (at most 128)")
        if name in out:
            raise ValueError(f"--prefix {name!r} given twice")
        out[name] = directory
    return out
