"""Reaching the Hugging Face Hub: fail fast, with a clear message, where it cannot be reached.

transformers and datasets retry an unreachable Hub for half a minute or more before they give
up with a long traceback. A model id or dataset name that is neither a local folder nor in the
local cache is checked here first with one short connection attempt.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT = 3.0
"""Seconds the connection attempt may take."""


def require(kind: str, name: str) -> None:
    """Raise ``OSError`` at once if fetching ``name`` (a ``kind``: "model", "dataset") needs the Hub and
    it cannot be reached. A local folder needs no Hub; offline mode (``HF_HUB_OFFLINE=1``), a cached
    model and a proxy (whose reach a direct connection cannot judge) are left to the libraries."""
    if Path(name).expanduser().is_dir() or _offline() or _proxied() or (kind == "model" and _cached_model(name)):
        return
    if reachable():
        return
    raise OSError(f"cannot reach the Hugging Face Hub ({_endpoint()}) to fetch the {kind} {name!r}: this machine is "
                  f"offline or the Hub is blocked. Give a local folder instead, or set HF_HUB_OFFLINE=1 to use what "
                  "is in the local cache")


@functools.cache
def reachable() -> bool:
    """Whether one TCP connection to the Hub's host opens within :data:`TIMEOUT` seconds."""
    url = urlparse(_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), TIMEOUT).close()
    except OSError:
        return False
    return True


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def _proxied() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _cached_model(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id: let transformers say what is wrong with it
        return False
