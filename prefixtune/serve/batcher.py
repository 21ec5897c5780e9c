"""The continuous batcher: one forward pass per decoding step over every live request.

This is the paper's deployment argument made concrete (Li & Liang 2021, section 1: one
frozen model serves many tasks at once, each request carrying its own prefix). One
background thread owns the model. Between two steps it

1. admits waiting requests: their prompts are prefilled together in one forward, each
   row with its own prefix, and their rows join the batch's cache,
2. runs one decoding step for all rows, whatever their prefixes (each row's prefix sits
   in front of its cached keys/values since it joined: ``kvcache``), and
3. lets finished rows leave.

The prefixes come from a :class:`~prefixtune.serve.store.PrefixStore`, folded (the
reparameterization MLP away), so a step only gathers fixed key/values. Prefix changes (load,
replace, remove) go to the store, never through the loop: a request holds its prefix from
:meth:`Batcher.submit` to its end, and the store neither evicts it nor lets a replacement take it
away, so a request always finishes with the prefix it started with. A prefix that is not on the
device yet is loaded by the store's threads while the loop goes on decoding; the requests that
need it join the queue when it is there.

The HTTP side talks to the thread through :meth:`Batcher.submit` (bounded: a full queue
is refused, never buffered without limit) and per-request callbacks (``Request.sink``).
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..base_models import context_length
from ..data import eos_id
from ..prefixes import batch_for_rows
from . import errors
from .backend import Backend
from .kvcache import BatchCache
from .limits import Limits
from .loader import key_value_loader
from .sampling import SamplingParams, next_tokens
from .store import NAME_RULE, Entry, PrefixStore, valid_name
from .text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What the batcher tells a request: new text, and at the end why it ended.

    ``finish_reason`` is ``"stop"`` (end-of-sequence or a stop string), ``"length"``
    (``max_tokens`` reached) or ``None`` while it goes on; ``error`` ends it with an error.
    """

    text: str = ""
    finish_reason: str | None = None
    error: errors.APIError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    """One generation: a tokenized prompt, the model (base or prefix) and how to decode.

    Args:
        prompt_ids: The prompt's token ids.
        model: The public name: the base model's name (no prefix) or a prefix's.
        params: Sampling settings.
        sink: Called from the batcher thread with each :class:`Event`; must not block.
    """

    prompt_ids: list[int]
    model: str
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: bool = False
    prefix: Entry | None = field(default=None, init=False)  # the prefix held from submit to the end
    generated: int = field(default=0, init=False)  # tokens generated so far


@dataclass
class _Row:
    """A request being decoded: its place in the batch and its progress."""

    request: Request
    text: TextStream
    generator: torch.Generator | None
    position: int  # the position of the next token fed (= real tokens so far)
    last: int = -1  # the last generated token (fed at the next step)
    done: bool = False


class Batcher(Backend):
    """Owns a :class:`~prefixtune.model.PrefixModel` and serves requests in a background thread.

    Args:
        model: The wrapped base model; its existing prefixes are served under their names.
        tokenizer: The base model's tokenizer.
        base_name: The name that selects no prefix.
        limits: Batch and queue sizes (and the bounds the HTTP app checks).
        on_step: Called after each step with ``(kind, rows, new_tokens, seconds)`` (metrics).
        store: Where the prefixes come from (default: a store without budget or folders, for the
            model's own prefixes and those added with :meth:`add_prefix`).
    """

    def __init__(self, model, tokenizer, base_name: str, limits: Limits | None = None,
                 on_step: Callable[[str, int, int, float], None] | None = None, store: PrefixStore | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.limits = limits or Limits()
        self.on_step = on_step
        self.context_length = context_length(model.config)
        self.eos = _eos_ids(model, tokenizer)
        accepted = inspect.signature(model.model.forward).parameters
        # transformers 5.x renamed past_key_values to cache; take whichever this version has
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"
        self._keep_logits = "logits_to_keep" in accepted  # prefill: logits of the last position only
        self._cond = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._cache = BatchCache()
        self._awaiting_prefix = 0  # requests waiting for their prefix to load (they count against the queue)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.store = store or PrefixStore(key_value_loader(model.shape), model.device)
        for name in list(model.prefixes):  # the model's own prefixes, folded, served under their names
            self.model.materialize(name)
            self.store.add(name, model.prefixes[name])
            del model.prefixes[name]

    # ---------------------------------------------------------------- public
    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._loop, name="prefixtune-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running end with a 503 error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:  # never started: no loop to tell the waiting requests
            self._fail_all(errors.unavailable())
        self.store.close()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def model_names(self) -> list[str]:
        """The base model's name, then every prefix's (none is loaded to list it)."""
        return [self.base_name, *self.store.names()]

    def queue_depth(self) -> int:
        """Requests waiting for a row, including those waiting for their prefix to load."""
        return len(self._pending) + self._awaiting_prefix

    def prefix_stats(self):
        """The store's counters (``/metrics``)."""
        return self.store.stats

    def check_folder(self, path: str):
        """The path rule of an admin load (the store's)."""
        return self.store.check_folder(path)

    def active_rows(self) -> int:
        return len(self._rows)

    def cached_rows(self) -> int:
        """Rows in the batch's key/value cache: equal to :meth:`active_rows` between steps."""
        return self._cache.rows

    def held_prefixes(self) -> dict[str, int]:
        """Requests waiting or running, per prefix they hold (by the store's entry key); a prefix
        replaced or removed stays loaded until its count is 0."""
        return self.store.held()

    def running(self) -> list[Request]:
        """The requests being decoded now (their ``generated`` counts their tokens so far)."""
        return [row.request for row in list(self._rows)]

    def submit(self, requests: list[Request]) -> Future:
        """Queue ``requests`` (all or none), each holding its prefix until it ends.

        Returns a future that is done when they are queued: at once when their prefixes are on
        the device, else once the store has loaded them (if that fails, the future and every
        request's sink get the error, and nothing is queued). Its result says which: ``"hit"``,
        ``"miss"`` (a prefix had to be loaded), or ``None`` for the base model alone.

        Raises:
            APIError: 404 for an unknown model, 429 when the queue is full, 503 when closed.
        """
        with self._cond:
            if self._closed:
                raise errors.unavailable()
            if len(self._pending) + self._awaiting_prefix + len(requests) > self.limits.max_queue:
                raise errors.queue_full(self.limits.max_queue)
            self._awaiting_prefix += len(requests)
        try:
            holds = self._hold(requests)
        except BaseException:
            with self._cond:
                self._awaiting_prefix -= len(requests)
            raise
        queued: Future = Future()
        waiting = [f for f in holds if f is not None]
        cache = None if not waiting else "hit" if all(f.done() for f in waiting) else "miss"
        left = [len(waiting)]

        def arrived(_=None):
            with self._cond:
                left[0] -= 1
                if left[0] > 0:
                    return
            self._enqueue(requests, holds, queued, cache)

        for future in waiting:
            future.add_done_callback(arrived)
        if not waiting:
            self._enqueue(requests, holds, queued, cache)
        return queued

    def _hold(self, requests: list[Request]) -> list[Future | None]:
        """Per request, the store's future of its prefix (``None`` for the base model); a 404 for an
        unknown name lets go of those already held."""
        holds = []
        try:
            for request in requests:
                holds.append(None if request.model == self.base_name else self.store.acquire(request.model))
        except errors.APIError as err:
            if err.status == 404:
                err = errors.unknown_model(request.model)
            self._let_go(holds)
            raise err from None
        return holds

    def _enqueue(self, requests: list[Request], holds: list[Future | None], queued: Future, cache: str | None) -> None:
        """Every prefix of ``requests`` is loaded (or failed): queue them all, or fail them all."""
        failed = next((e for e in (_failure(f) for f in holds if f is not None) if e is not None), None)
        with self._cond:
            self._awaiting_prefix -= len(requests)
            if failed is None and self._closed:
                failed = errors.unavailable()
            if failed is None:
                for request, hold in zip(requests, holds):
                    request.prefix = None if hold is None else hold.result()
                    self._pending.append(request)
                self._cond.notify_all()
        if failed is None:
            queued.set_result(cache)
            return
        if not isinstance(failed, errors.APIError):
            failed = errors.internal(f"cannot load the prefix: {failed}")
        self._let_go(holds)
        for request in requests:
            request.sink(Event(error=failed))
        queued.set_exception(failed)

    def _let_go(self, holds: list[Future | None]) -> None:
        for hold in holds:
            if hold is not None:
                hold.add_done_callback(lambda f: _failure(f) is None and self.store.release(f.result()))

    def add_prefix(self, name: str, directory: str) -> Future:
        """Load the prefix saved in ``directory`` as ``name`` (replacing one of that name) on the
        store's loader thread; the future holds what was loaded, or the error."""
        if not valid_name(name) or name == self.base_name:
            raise errors.bad_request(f"invalid prefix name {name[:200]!r}: use {NAME_RULE}, not the base model's name",
                                     param="name", code="invalid_name")
        return self.store.load(name, directory)

    def remove_prefix(self, name: str) -> Future:
        """Stop serving ``name``; requests already using it finish with it."""
        future: Future = Future()
        _settle(future, lambda: self.store.remove(name))
        return future

    # ------------------------------------------------------------ prefixes
    def _release(self, request: Request) -> None:
        if request.prefix is not None:
            self.store.release(request.prefix)

    # ---------------------------------------------------------------- loop
    def _loop(self) -> None:
        try:
            while self._turn():
                pass
        except Exception as err:  # noqa: BLE001 - the loop must tell every client before it dies
            log.exception("batcher loop died")
            self._fail_all(errors.internal(f"the batcher stopped: {err}"))
        else:
            self._fail_all(errors.unavailable())

    def _turn(self) -> bool:
        """One round: admissions, one step. False when closed."""
        with self._cond:
            while not (self._pending or self._rows or self._closed):
                self._cond.wait()
            if self._closed:
                return False
            admitted = self._admit()
        with torch.inference_mode():
            if admitted:
                self._prefill_all(admitted)
            if self._rows:
                try:
                    self._decode()
                except Exception as err:  # noqa: BLE001 - fail this step's rows, keep serving
                    log.exception("decoding step failed")
                    self._fail_rows(errors.internal(f"generation failed: {err}"))
        return True

    def _fail_rows(self, error: errors.APIError) -> None:
        for row in self._rows:
            if not row.done:
                row.done = True
                self._release(row.request)
                row.request.sink(Event(error=error))
        self._rows = []
        self._cache = BatchCache()

    def _admit(self) -> list[Request]:
        """Waiting requests that fit in the batch and the prefill budget (lock held)."""
        admitted, longest = [], 0
        while self._pending and len(self._rows) + len(admitted) < self.limits.max_batch:
            request = self._pending[0]
            if request.cancelled:
                self._release(self._pending.popleft())
                continue
            longest = max(longest, len(request.prompt_ids))
            if admitted and longest * (len(admitted) + 1) > self.limits.max_prefill_tokens:
                break
            admitted.append(self._pending.popleft())
        return admitted

    def _fail_all(self, error: errors.APIError) -> None:
        with self._cond:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
        for request in waiting + [row.request for row in self._rows if not row.done]:
            self._release(request)
            request.sink(Event(error=error))
        self._rows = []
        self._cache = BatchCache()

    # ------------------------------------------------------------- prefill
    def _prefill_all(self, requests: list[Request]) -> None:
        """Prefill ``requests`` together; if that fails, one by one, so that only the
        request that causes an error gets it."""
        try:
            self._prefill(requests)
        except Exception as err:  # noqa: BLE001 - isolate the request at fault
            if len(requests) == 1:
                log.exception("prefill failed")
                self._release(requests[0])
                requests[0].sink(Event(error=errors.internal(f"generation failed: {err}")))
                return
            for request in requests:
                self._prefill_all([request])

    def _prefill(self, requests: list[Request]) -> None:
        start = time.perf_counter()
        device = self.model.device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n:] = torch.tensor(request.prompt_ids)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        encoders = [None if r.prefix is None else r.prefix.encoder for r in requests]
        batch = self.model.prefix_batch(batch_for_rows(encoders, self.model.shape.num_layers, device), len(requests))
        cache, prefix = BatchCache.open(batch, self.model.shape.num_layers)  # the prefixes go in once, here
        extra = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         prefix=prefix, **{self._cache_kwarg: cache}, **extra)
        rows = [_Row(r, TextStream(self.tokenizer, r.params.stop), r.params.generator(device), len(r.prompt_ids))
                for r in requests]
        self._advance(rows, out.logits[:, -1])
        self._cache.join(cache, mask, batch)
        self._rows.extend(rows)
        self._drop_finished()
        self._report("prefill", len(rows), int(mask.sum()), start)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else min(self.eos, default=0)

    # -------------------------------------------------------------- decode
    def _decode(self) -> None:
        """One step: every row's last token in, one new token per row out."""
        start = time.perf_counter()
        device = self.model.device
        for row in self._rows:
            if row.request.cancelled:
                self._finish(row, None)
        self._drop_finished()
        if not self._rows:
            return
        ids = torch.tensor([[row.last] for row in self._rows], device=device)
        positions = torch.tensor([[row.position] for row in self._rows], device=device)
        mask = self._cache.step_mask()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         prefix=self._cache.prefix_batch(), **{self._cache_kwarg: self._cache.cache})
        self._cache.mask = mask
        for row in self._rows:
            row.position += 1
        rows = len(self._rows)
        self._advance(self._rows, out.logits[:, -1])
        self._drop_finished()
        self._report("decode", rows, rows, start)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token and tell its request."""
        chosen = next_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
        for row, token in zip(rows, chosen):
            row.last = token
            row.request.generated += 1
            params = row.request.params
            if token in self.eos and not params.ignore_eos:
                self._finish(row, "stop")
                continue
            piece = row.text.push(token)
            if row.text.stopped:
                self._finish(row, "stop", piece)
            elif row.request.generated >= params.max_tokens:
                self._finish(row, "length", piece + row.text.flush())
            elif piece:
                row.request.sink(Event(text=piece, completion_tokens=row.request.generated))

    def _finish(self, row: _Row, reason: str | None, piece: str = "") -> None:
        row.done = True
        self._release(row.request)
        if reason is not None:
            row.request.sink(Event(text=piece, finish_reason=reason, prompt_tokens=len(row.request.prompt_ids),
                                   completion_tokens=row.request.generated))

    def _drop_finished(self) -> None:
        """Finished rows leave the batch (and its cache)."""
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        self._cache.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _report(self, kind: str, rows: int, tokens: int, start: float) -> None:
        if self.on_step is not None:
            self.on_step(kind, rows, tokens, time.perf_counter() - start)


def _failure(future: Future) -> BaseException | None:
    """The error of a done future; a load cancelled because the server is closing is a 503."""
    return errors.unavailable() if future.cancelled() else future.exception()


def _settle(future: Future, action: Callable) -> None:
    try:
        future.set_result(action())
    except Exception as err:  # noqa: BLE001 - handed to the caller
        future.set_exception(err if isinstance(err, errors.APIError) else errors.internal(str(err)))


def _eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation: the tokenizer's end of sequence (:func:`prefixtune.data.eos_id`,
    the one training appends), and every one the model's configs name (a chat model may end a turn
    with a token of its own)."""
    ids = {eos_id(tokenizer)}
    for source in (getattr(model.model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids
