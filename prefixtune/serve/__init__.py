"""Serving many prefixes over one frozen base model.

``prefixtune serve`` runs :func:`create_app` (an OpenAI-compatible HTTP API) over a
:class:`Batcher` (continuous batching: one forward per decoding step for every request,
whatever its prefix), or over the Ray front; both implement :class:`Backend`. :class:`Limits`
bounds the server; :class:`ServeConfig` is the command's options. All are usable from Python
too; see ``docs/serving.md``.

The names below are imported on first use: ``prefixtune --help`` imports
``prefixtune.serve.cli`` and must not pay for torch, transformers or starlette.
"""

import importlib

_EXPORTS = {
    "Backend": "backend", "Batcher": "batcher", "Event": "batcher", "Request": "batcher", "Limits": "limits",
    "SamplingParams": "sampling", "Metrics": "prometheus", "ServeConfig": "setup", "create_app": "app",
    "BackgroundServer": "background",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
