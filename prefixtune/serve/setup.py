"""What ``prefixtune serve`` serves (:class:`ServeConfig`) and the server's assembly from it.

Both entry points build from here: :mod:`.cli` (one process) and :mod:`.ray_serve` (a front and
its replicas, each replica assembling what one process would). Kept light at import (``prefixtune
--help`` imports it through :mod:`.cli`): torch, transformers and starlette are imported inside the
functions that need them.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..config import Checked, device_problem, names, option_field
from .limits import Limits

log = logging.getLogger(__name__)


@dataclass
class ServeConfig(Checked):
    """What ``prefixtune serve`` serves, where, and under which :class:`Limits` (checked like every
    other command's options; the limits' fields are options of their own, ``--max-batch`` and so on)."""

    model: str | None = option_field(None, "base model: Hub id or folder (default: the bundled model)",
                                     check=names("a model folder or a Hub id"))
    prefix: tuple[str, ...] = option_field((), "serve the prefix saved in DIR as model NAME (repeatable)", repeat=True,
                                   metavar="NAME=DIR")
    host: str = option_field("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)",
                             check=names("an address (127.0.0.1: this machine only; 0.0.0.0: every interface)"))
    port: int = option_field(8000, "port to listen on", ge=0, le=65535)
    prefix_dir: tuple[str, ...] = option_field((), "serve every prefix folder under DIR by its folder name, loaded on its "
                                       "first request (repeatable; the first DIR that has a name wins); admin "
                                       "loads may read only inside these", repeat=True, metavar="DIR")
    prefix_cache_mb: float = option_field(1024.0, "most MiB of prefix key/values held on the model's device; prefixes no "
                                  "request holds are evicted least recently used first", gt=0, le=1 << 24)
    prefix_host_cache_mb: float = option_field(0.0, "with a GPU: MiB of host memory that keeps evicted prefixes ready to "
                                       "copy back (0: none)", ge=0, le=1 << 24)
    api_key: tuple[str, ...] = option_field((), "an inference key: /v1 routes need 'Authorization: Bearer KEY' with one of "
                                    "them (repeatable; default: $PREFIXTUNE_API_KEY if set)", repeat=True,
                                    metavar="KEY")
    api_key_file: str | None = option_field(None, "a file of inference keys, one per line (# starts a comment)",
                                            check=names("a file of keys"))
    admin_key: str | None = option_field(None, "the key for prefix management (POST/DELETE /v1/prefixes/NAME); an "
                                 "inference key there gets 403 (default: $PREFIXTUNE_ADMIN_KEY if set; none: "
                                 "management is off)")
    served_model_name: str | None = option_field(None, "name of the base model in the API (default: the model's name_or_path)")
    device: str = option_field("auto", "auto, cpu, cuda, cuda:1, mps", check=device_problem)
    dtype: str | None = option_field(None, "weights dtype, e.g. float32, bfloat16 (default: the model's)")
    attn_implementation: str = option_field("sdpa", "attention kernel of the base model", choices=("sdpa", "eager"))
    limits: Limits = option_field(factory=Limits)
    log_level: str = option_field("info", "server log level", choices=("critical", "error", "warning", "info", "debug"))
    ray: bool = option_field(False, "serve from --replicas replicas on Ray Serve (pip install 'prefixtune[ray]'), each with "
                     "the model, a batcher and its own prefix store; requests are routed by prefix name")
    replicas: int = option_field(1, "with --ray: replicas, each holding one copy of the base model", ge=1, le=4096)
    ray_address: str | None = option_field(None, "with --ray: the Ray cluster to join (default: start a local one)")
    ray_prefixes_per_replica: int = option_field(64, "with --ray: prefixes a replica advertises as held, for routing "
                                         "(Ray Serve's max_num_models_per_replica)", ge=1, le=1 << 20)

    def problems(self):
        """``(option, message)`` for each rule between options that is broken."""
        if self.dtype is not None and not _is_dtype(self.dtype):
            yield "dtype", f"must be auto or a torch dtype (float32, bfloat16, float16), got {self.dtype!r}"
        if self.prefix_host_cache_mb and self.device == "cpu":
            yield "prefix_host_cache_mb", "the host tier keeps evicted prefixes off a GPU; on --device cpu it has none"
        if not self.ray:
            for name in ("replicas", "ray_address"):
                if getattr(self, name) != ServeConfig.__dataclass_fields__[name].default:
                    yield name, "needs --ray"


def _is_dtype(name: str) -> bool:
    import torch

    return name == "auto" or isinstance(getattr(torch, name, None), torch.dtype)


# ---------------------------------------------------------------- assembly
def build_app(cfg: ServeConfig, loaded=None):
    """Load the model and prefixes ``cfg`` names and build the app (no server started); ``loaded``,
    a ``(model, tokenizer)`` already loaded, is served instead of ``--model``."""
    from .app import create_app
    from .prometheus import Metrics

    api_keys, admin_key = keys(cfg)  # a bad key or key file is told before the model loads
    metrics = Metrics()
    batcher = build_batcher(cfg, on_step=metrics.step, loaded=loaded)
    return create_app(batcher, metrics, api_keys=api_keys, admin_key=admin_key, host=cfg.host)


def build_batcher(cfg: ServeConfig, on_step=None, loaded=None):
    """The model, its prefix store (``--prefix``, ``--prefix-dir``, the budgets) and the batcher over them."""
    from ..base_models import load_model
    from ..model import PrefixModel
    from ..runtime import pick_device
    from .batcher import Batcher
    from .loader import key_value_loader
    from .store import PrefixStore

    prefixes = parse_prefixes(cfg.prefix)
    missing = [d for d in cfg.prefix_dir if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"--prefix-dir {missing[0]!r}: not a folder")
    device = pick_device(cfg.device)  # before the model loads: a machine without it is told at once
    model, tokenizer = loaded or load_model(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    model.to(device)
    pm = PrefixModel(model, tokenizer=tokenizer)
    for name, directory in prefixes.items():
        pm.load_prefix(directory, name=name)
    base = cfg.served_model_name or model.config.name_or_path or "base"
    if base in prefixes:
        raise ValueError(f"prefix name {base!r} is the base model's name; pick another")
    host = int(cfg.prefix_host_cache_mb * 2**20) if pm.device.type != "cpu" else 0
    if cfg.prefix_host_cache_mb and not host:
        log.warning("--prefix-host-cache-mb is not used: the model is on the CPU, where evicted prefixes would "
                    "stay in the same memory")
    store = PrefixStore(key_value_loader(pm.shape), pm.device, cfg.prefix_dir,
                        budget_bytes=int(cfg.prefix_cache_mb * 2**20), host_budget_bytes=host)
    return Batcher(pm, tokenizer, base, cfg.limits, on_step=on_step, store=store)


def listen(host: str, port: int) -> socket.socket:
    """The socket :func:`serve` answers on, bound to ``--host``/``--port`` before the model loads: an address
    in use, or one that is not this machine's, is one line naming the options at once, not after a minute
    of loading (uvicorn would say it in its own log, and exit)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ValueError(f"--host {host}: not an address this machine can resolve ({err})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart may reuse the port
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); "
                         "choose another --port, or stop what listens there") from None
    return sock


def serve(app, cfg: ServeConfig, sock: socket.socket | None = None) -> int:
    """Run ``app`` with uvicorn on ``sock`` (:func:`listen`), else on ``--host``/``--port``, under ``cfg.limits``
    until Ctrl-C; the exit code."""
    import contextlib

    import uvicorn

    from .connections import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, cfg.limits, cfg.host, cfg.port, log_level=cfg.log_level))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock] if sock else None)
    return 0 if server.started else 1


# ---------------------------------------------------------------- keys and prefixes
def keys(cfg: ServeConfig) -> tuple[tuple[str, ...], str | None]:
    """The inference keys (``--api-key`` values, then the lines of ``--api-key-file``;
    ``$PREFIXTUNE_API_KEY`` when neither is given) and the admin key (``--admin-key`` or
    ``$PREFIXTUNE_ADMIN_KEY``). An empty or blank one, wherever it comes from, is refused naming its
    source: an unset shell variable (``--api-key "$KEY"``) must not open the server to an empty token."""
    from .app import check_keys

    found = [(key, "--api-key") for key in cfg.api_key] + _file_keys(cfg.api_key_file)
    if not found and "PREFIXTUNE_API_KEY" in os.environ:
        found.append((os.environ["PREFIXTUNE_API_KEY"], "$PREFIXTUNE_API_KEY"))
    admin, source = cfg.admin_key, "--admin-key"
    if admin is None and "PREFIXTUNE_ADMIN_KEY" in os.environ:
        admin, source = os.environ["PREFIXTUNE_ADMIN_KEY"], "$PREFIXTUNE_ADMIN_KEY"
    for key, where in found:
        check_keys((key,), None, names=(where, source))
    api_keys = tuple(key.strip() for key, _ in found)
    check_keys(api_keys, admin, names=("an inference key", source))
    return api_keys, None if admin is None else admin.strip()


def _file_keys(path: str | None) -> list[tuple[str, str]]:
    """``(key, source)`` for each line of a key file that is neither blank nor a ``#`` comment."""
    if not path:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--api-key-file {path!r}: cannot read it ({err})") from None
    found = [(line.strip(), f"--api-key-file {path!r}") for line in lines
             if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise ValueError(f"--api-key-file {path!r}: holds no key")
    return found


def parse_prefixes(items: list[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}``; refuses bad or repeated names."""
    from .store import NAME_RULE, valid_name

    out = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not directory:
            raise ValueError(f"--prefix {item!r}: expected NAME=DIR")
        if not valid_name(name):
            raise ValueError(f"--prefix {item!r}: NAME may use {NAME_RULE}")
        if name in out:
            raise ValueError(f"--prefix {name!r} given twice")
        out[name] = directory
    return out
