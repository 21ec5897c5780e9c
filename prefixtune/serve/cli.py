"""``prefixtune serve``: load a base model and some prefixes, then serve them over HTTP.

Kept light at import (``prefixtune --help`` imports it): torch, transformers, starlette
and uvicorn are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Checked, option_field

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


@dataclass
class ServeConfig(Checked):
    """What ``prefixtune serve`` serves, and its limits (checked like every other command's options)."""

    model: str | None = option_field(None, "base model: Hub id or folder (default: the bundled model)")
    prefix: tuple[str, ...] = option_field((), "serve the prefix saved in DIR as model NAME (repeatable)", repeat=True,
                                   metavar="NAME=DIR")
    host: str = option_field("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)")
    port: int = option_field(8000, "port to listen on", ge=0, le=65535)
    prefix_dir: tuple[str, ...] = option_field((), "serve every prefix folder under DIR by its folder name, loaded on its "
                                       "first request (repeatable; the first DIR that has a name wins); admin "
                                       "loads may read only inside these", repeat=True, metavar="DIR")
    prefix_cache_mb: float = option_field(1024.0, "most MiB of prefix key/values held on the model's device; prefixes no "
                                  "request holds are evicted least recently used first", gt=0)
    prefix_host_cache_mb: float = option_field(0.0, "with a GPU: MiB of host memory that keeps evicted prefixes ready to "
                                       "copy back (0: none)", ge=0)
    api_key: tuple[str, ...] = option_field((), "an inference key: /v1 routes need 'Authorization: Bearer KEY' with one of "
                                    "them (repeatable; default: $PREFIXTUNE_API_KEY if set)", repeat=True,
                                    metavar="KEY")
    api_key_file: str | None = option_field(None, "a file of inference keys, one per line (# starts a comment)")
    admin_key: str | None = option_field(None, "the key for prefix management (POST/DELETE /v1/prefixes/NAME); an "
                                 "inference key there gets 403 (default: $PREFIXTUNE_ADMIN_KEY if set; none: "
                                 "management is off)")
    served_model_name: str | None = option_field(None, "name of the base model in the API (default: the model's name_or_path)")
    device: str = option_field("auto", "auto, cpu, cuda, cuda:1, mps")
    dtype: str | None = option_field(None, "weights dtype, e.g. float32, bfloat16 (default: the model's)")
    attn_implementation: str = option_field("sdpa", "attention kernel of the base model", choices=("sdpa", "eager"))
    max_batch: int = option_field(32, "most requests decoded together", ge=1)
    max_queue: int = option_field(256, "most requests waiting; more get 429", ge=1)
    max_tokens: int = option_field(512, "largest max_tokens a request may ask", ge=1)
    max_prompt_tokens: int = option_field(2048, "longest prompt accepted (413 above)", ge=1)
    max_body_mb: float = option_field(1.0, "largest request body in MiB (413 above)", gt=0)
    body_timeout: float = option_field(30.0, "seconds a client may take to send its request body (408 after)", gt=0)
    log_level: str = option_field("info", "server log level", choices=("critical", "error", "warning", "info", "debug"))
    ray: bool = option_field(False, "serve from --replicas replicas on Ray Serve (pip install 'prefixtune[ray]'), each with "
                     "the model, a batcher and its own prefix store; requests are routed by prefix name")
    replicas: int = option_field(1, "with --ray: replicas, each holding one copy of the base model", ge=1)
    ray_address: str | None = option_field(None, "with --ray: the Ray cluster to join (default: start a local one)")
    ray_prefixes_per_replica: int = option_field(64, "with --ray: prefixes a replica advertises as held, for routing "
                                         "(Ray Serve's max_num_models_per_replica)", ge=1)

    def problems(self):
        """``(option, message)`` for each rule between options that is broken."""
        if self.prefix_host_cache_mb and self.device == "cpu":
            yield "prefix_host_cache_mb", "the host tier keeps evicted prefixes off a GPU; on --device cpu it has none"
        if not self.ray:
            for name in ("replicas", "ray_address"):
                if getattr(self, name) != ServeConfig.__dataclass_fields__[name].default:
                    yield name, "needs --ray"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import options

    options.add_options(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .. import options

    cfg = options.build(ServeConfig, args)
    log = logging.getLogger(__name__)
    if cfg.ray:
        from . import ray_serve

        app = ray_serve.build_front(cfg)
    else:
        app = build_app(cfg)
        log.info("serving %s on http://%s:%d", _shown(app.state.batcher.model_names()), cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return 0


def build_app(args: ServeConfig, loaded=None):
    """Load the model and prefixes ``args`` names and build the app (no server started); ``loaded``,
    a ``(model, tokenizer)`` already loaded, is served instead of ``--model``."""
    from .app import create_app
    from .metrics import Metrics

    keys = inference_keys(args)  # a bad key file is told before the model loads
    metrics = Metrics()
    batcher = build_batcher(args, on_step=metrics.step, loaded=loaded)
    return create_app(batcher, server_options(args, context_length(batcher.model.config), keys), metrics)


def build_batcher(args: ServeConfig, on_step=None, loaded=None):
    """The model, its prefix store (``--prefix``, ``--prefix-dir``, the budgets) and the batcher over them."""
    from .. import artifacts
    from ..base_models import load_model
    from ..model import PrefixModel
    from ..runtime import pick_device
    from .batcher import Batcher, Limits
    from .store import PrefixStore

    prefixes = parse_prefixes(args.prefix)
    missing = [d for d in args.prefix_dir if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"--prefix-dir {missing[0]!r}: not a folder")
    model, tokenizer = loaded or load_model(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation)
    model.to(pick_device(args.device))
    pm = PrefixModel(model, tokenizer=tokenizer)
    for name, directory in prefixes.items():
        pm.load_prefix(directory, name=name)
    base = args.served_model_name or model.config.name_or_path or "base"
    if base in prefixes:
        raise ValueError(f"prefix name {base!r} is the base model's name; pick another")
    host = int(args.prefix_host_cache_mb * 2**20) if pm.device.type != "cpu" else 0
    if args.prefix_host_cache_mb and not host:
        logging.getLogger(__name__).warning("--prefix-host-cache-mb is not used: the model is on the CPU, "
                                            "where evicted prefixes would stay in the same memory")
    store = PrefixStore(lambda folder: artifacts.load_key_values(folder, pm.shape), pm.device, args.prefix_dir,
                        budget_bytes=int(args.prefix_cache_mb * 2**20), host_budget_bytes=host)
    return Batcher(pm, tokenizer, base, Limits(max_batch=args.max_batch, max_queue=args.max_queue),
                   on_step=on_step, store=store)


def server_options(args: ServeConfig, context: int, keys: tuple[str, ...]):
    """The HTTP layer's options: inference ``keys`` (:func:`inference_keys`), the admin key, limits."""
    from .app import ServerOptions
    from .protocol import ServeLimits

    limits = ServeLimits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, context_length=context)
    return ServerOptions(api_keys=keys, admin_key=args.admin_key or os.environ.get("PREFIXTUNE_ADMIN_KEY") or None,
                         limits=limits, max_body_bytes=int(args.max_body_mb * 2**20), body_seconds=args.body_timeout)


def context_length(model_config) -> int:
    """The longest prompt + completion the model takes (no bound where its config names none)."""
    return getattr(model_config, "max_position_embeddings", None) or 1 << 30


def inference_keys(args: ServeConfig) -> tuple[str, ...]:
    """``--api-key`` values, then the lines of ``--api-key-file``; ``$PREFIXTUNE_API_KEY`` when neither is given."""
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--api-key-file {args.api_key_file!r}: cannot read it ({err})") from None
        keys += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {args.api_key_file!r}: holds no key")
    if not keys and os.environ.get("PREFIXTUNE_API_KEY"):
        keys.append(os.environ["PREFIXTUNE_API_KEY"])
    return tuple(keys)


def _shown(names: list[str], most: int = 8) -> str:
    """The first names of a list that may hold thousands, for a log line."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


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
