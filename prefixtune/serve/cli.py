"""``prefixtune serve``: load a base model and some prefixes, then serve them over HTTP.

Kept light at import (``prefixtune --help`` imports it): torch, transformers, starlette
and uvicorn are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import logging

SUMMARY = "serve a base model and many prefixes over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve --model (default: the bundled SmolLM2-135M-Instruct) with every --prefix NAME=DIR over an "
    "OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models). A request picks a prefix with "
    '"model": "NAME"; the base model\'s own name means no prefix. Concurrent requests are decoded together, '
    "one forward pass per step whatever their prefixes. With --api-key, /v1 needs 'Authorization: Bearer KEY' "
    "and prefixes can be added or removed at run time (POST/DELETE /v1/prefixes/NAME). A playground is at /, "
    "health at /health, Prometheus metrics at /metrics. See docs/serving.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model: Hub id or folder (default: the bundled model)")
    parser.add_argument("--prefix", action="append", default=[], metavar="NAME=DIR",
                        help="serve the prefix saved in DIR as model NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes; "
                        "also enables prefix management (default: $PREFIXTUNE_API_KEY if set)")
    parser.add_argument("--served-model-name", default=None,
                        help="name of the base model in the API (default: the model's name_or_path)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, help="weights dtype, e.g. float32, bfloat16 (default: the model's)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--max-batch", type=int, default=32, help="most requests decoded together")
    parser.add_argument("--max-queue", type=int, default=256, help="most requests waiting; more get 429")
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (413 above)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    app = build_app(args, api_key=args.api_key or os.environ.get("PREFIXTUNE_API_KEY") or None)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", ", ".join(app.state.batcher.model_names()),
                                     args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_app(args: argparse.Namespace, api_key: str | None = None):
    """Load the model and prefixes named in ``args`` and build the app (no server started)."""
    from ..base_models import load_model
    from ..model import PrefixModel
    from ..runtime import pick_device
    from .app import ServerOptions, create_app
    from .batcher import Batcher, Limits
    from .metrics import Metrics
    from .protocol import ServeLimits

    prefixes = parse_prefixes(args.prefix)
    for number, name in [(args.max_batch, "--max-batch"), (args.max_queue, "--max-queue"),
                         (args.max_tokens, "--max-tokens"), (args.max_prompt_tokens, "--max-prompt-tokens")]:
        if number < 1:
            raise ValueError(f"{name} must be at least 1")
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
    return create_app(batcher, ServerOptions(api_key=api_key, limits=limits), metrics)


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
