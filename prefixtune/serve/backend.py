"""What the HTTP app needs of whatever generates: the one interface of the local batcher and the Ray front.

:func:`~prefixtune.serve.app.create_app` is typed with :class:`Backend` and uses nothing else, so
the same app (keys, limits, request checks, streaming, errors) serves a
:class:`~prefixtune.serve.batcher.Batcher` in this process or a
:class:`~prefixtune.serve.ray_serve.RayBackend` in front of Ray Serve replicas. Both declare it by
subclassing, and a test checks that each implements every member.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

from .limits import Limits


class Backend(Protocol):
    """Generation over one base model and its prefixes, as the HTTP app sees it.

    Attributes:
        tokenizer: The base model's tokenizer (requests are tokenized by the app).
        base_name: The model name that selects no prefix.
        limits: The bounds the app checks before submitting anything.
        context_length: The longest prompt + completion the model takes.
        started: Whether :meth:`start` was called.
        alive: Whether it serves (``/health`` answers 503 otherwise).
    """

    tokenizer: object
    base_name: str
    limits: Limits
    context_length: int
    started: bool
    alive: bool

    def start(self) -> "Backend":
        """Begin serving (the app calls it at startup unless :attr:`started`)."""

    def close(self) -> None:
        """Stop; requests still waiting or running end with a 503."""

    def model_names(self) -> list[str]:
        """The base model's name, then every prefix's, without loading any."""

    def queue_depth(self) -> int:
        """Requests waiting for a batch row."""

    def active_rows(self) -> int:
        """Requests being decoded."""

    def submit(self, requests: list) -> Future:
        """Queue one HTTP request's rows (:class:`~prefixtune.serve.batcher.Request`), all or none.

        Returns a future done once they are queued, whose result is ``"hit"`` or ``"miss"`` (whether
        their prefix was on the device) or ``None`` (the base model). Raises an ``APIError`` (404, 429,
        503) for what can be refused at once; later failures reach each request's sink."""

    def check_folder(self, path: str) -> Path:
        """The path rule of an admin load: ``path`` resolved, or an ``APIError`` (403, 400; 501 where
        prefixes cannot be managed)."""

    def add_prefix(self, name: str, directory: str) -> Future:
        """Serve the prefix saved in ``directory`` as ``name``; the future holds the answer of
        ``POST /v1/prefixes/NAME``."""

    def remove_prefix(self, name: str) -> Future:
        """Stop serving ``name``; the future holds the answer of ``DELETE /v1/prefixes/NAME``."""

    def prefix_stats(self):
        """The prefix store's counters (:class:`~prefixtune.serve.store.StoreStats`), for ``/metrics``."""
