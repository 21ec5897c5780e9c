"""``prefixtune serve --ray``: the same API in front of N replicas on Ray Serve.

Each replica is a Ray Serve deployment replica holding what one ``prefixtune serve`` holds: the
base model, a batcher and its own prefix store (``--prefix``, ``--prefix-dir``, the budgets).
The front is this process: the same Starlette app as a single server (keys, body limits,
request checks, streaming, errors), over :class:`RayBackend`, which implements the same
:class:`~prefixtune.serve.backend.Backend` as the local batcher and hands each request's rows to a
replica through a deployment handle.

Routing is Ray Serve's model multiplexing: a request for prefix ``NAME`` is sent with
``multiplexed_model_id=NAME``, and Ray routes it to a replica that has loaded ``NAME`` (each
replica reports the prefixes its ``@serve.multiplexed`` loader holds), so a prefix's requests
keep landing where it is warm. No router or cluster manager is written here.

Ray Serve's own HTTP proxy is not started (``proxy_location="Disabled"``): the front is the
HTTP server, and a proxy would be one more actor whose health checks can fail on a loaded
machine, while deployment handles do not depend on it.

Prefix folders must be visible at the same path to the front (which lists them) and to every
replica (which loads them): a shared volume on a multi-machine cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from concurrent.futures import Future

from . import errors
from .backend import Backend
from .batcher import Event, Request
from .store import PrefixFolders, StoreStats

log = logging.getLogger(__name__)
APP_NAME = "prefixtune"


def build_front(cfg, handle=None):
    """Start Ray Serve with ``cfg.replicas`` replicas (unless ``handle`` to a running deployment is
    given) and build the front app over them."""
    from ..base_models import load_tokenizer
    from .app import create_app
    from .prometheus import Metrics
    from .setup import keys, parse_prefixes

    api_keys, admin_key = keys(cfg)  # a bad key or key file is told before any replica starts
    _, tokenizer = load_tokenizer(cfg.model)
    if handle is None:
        handle = deploy(cfg)
    info = handle.info.remote().result(timeout_s=600)
    metrics = Metrics()
    backend = RayBackend(handle, tokenizer, info, cfg, list(parse_prefixes(cfg.prefix)), metrics)
    return create_app(backend, metrics, api_keys=api_keys, admin_key=admin_key, host=cfg.host)


def deploy(cfg):
    """Start (or join, with ``--ray-address``) a Ray cluster and run the replicas; their handle."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--ray needs Ray Serve: pip install 'prefixtune[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and _has_cuda())
    deployment = replica_class(cfg.ray_prefixes_per_replica).options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.limits.max_batch + cfg.limits.max_queue,
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0})
    return serve.run(deployment.bind(cfg), name=APP_NAME, route_prefix=None)


def replica_class(prefixes_per_replica: int):
    """The Ray Serve deployment of one replica; ``prefixes_per_replica`` is how many prefix names it
    reports as held for routing (its ``@serve.multiplexed`` cache, not a memory bound: the store has that)."""
    from ray import serve

    @serve.deployment
    class PrefixReplica:
        def __init__(self, cfg):
            from .setup import build_batcher

            self.batcher = build_batcher(cfg).start()
            self.id = f"{socket.gethostname()}:{os.getpid()}"

        def info(self) -> dict:
            return {"base": self.batcher.base_name, "replica": self.id, "context_length": self.batcher.context_length}

        @serve.multiplexed(max_num_models_per_replica=prefixes_per_replica)
        async def prefix(self, name: str) -> str:
            """Bring ``name`` onto this replica's device; Ray records that this replica holds it."""
            entry = await asyncio.wrap_future(self.batcher.store.acquire(name))
            self.batcher.store.release(entry)
            return name

        async def generate(self, payload: list[tuple[list[int], object]]):
            """Decode one HTTP request's rows here; yields ``("queued", replica, hit)``, then
            ``("event", index, Event)`` items, then ``("stats", replica, StoreStats)``, or
            ``("error", fields)`` at any point."""
            model = serve.get_multiplexed_model_id() or self.batcher.base_name
            hit = model == self.batcher.base_name or self.batcher.store.resident(model)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            requests = [Request(ids, model, params, sink=_sink(loop, events, i)) for i, (ids, params) in
                        enumerate(payload)]
            try:
                if model != self.batcher.base_name:
                    await self.prefix(model)
                await asyncio.wrap_future(self.batcher.submit(requests))
            except errors.APIError as err:
                yield ("error", _fields(err))
                return
            yield ("queued", self.id, hit)
            try:
                pending = len(requests)
                while pending:
                    index, event = await events.get()
                    if event.error is not None:
                        yield ("error", _fields(event.error))
                        return
                    pending -= event.finish_reason is not None
                    yield ("event", index, event)
                yield ("stats", self.id, dataclasses.replace(self.batcher.store.stats))
            finally:
                for request in requests:
                    request.cancelled = True

    return PrefixReplica


class RayBackend(Backend):
    """The :class:`~prefixtune.serve.backend.Backend` of the front: each request's rows go to a Ray Serve
    replica behind ``handle``; the prefix names are listed here (:class:`PrefixFolders`), and the store
    counters are the replicas', summed from what each reported last."""

    def __init__(self, handle, tokenizer, info: dict, cfg, static: list[str], metrics):
        self.handle, self.tokenizer, self.metrics = handle, tokenizer, metrics
        self.base_name, self.context_length, self.limits = info["base"], info["context_length"], cfg.limits
        self.folders, self.static = PrefixFolders(cfg.prefix_dir), static
        self.replicas: dict[str, StoreStats] = {}
        self.started, self.alive = False, True
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> "RayBackend":
        self.started = True
        return self

    def close(self) -> None:
        self.alive = False
        for task in self._tasks:
            task.cancel()

    def model_names(self) -> list[str]:
        return list(dict.fromkeys([self.base_name, *self.static, *self.folders.names()]))

    def queue_depth(self) -> int:
        return self._in_flight

    def active_rows(self) -> int:
        return self._in_flight

    def prefix_stats(self) -> StoreStats:
        return StoreStats.total(list(self.replicas.values()))

    def check_folder(self, path: str):
        raise _per_replica()

    def add_prefix(self, name: str, directory: str):
        raise _per_replica()

    def remove_prefix(self, name: str):
        raise _per_replica()

    def submit(self, requests: list[Request]) -> Future:
        """Send ``requests`` (one HTTP request's rows, one model) to a replica; the future is done
        once that replica has queued them. Called on the event loop."""
        if not self.alive:
            raise errors.unavailable()
        model = requests[0].model
        if model != self.base_name and model not in self.static and self.folders.folder(model) is None:
            raise errors.unknown_model(model)
        queued: Future = Future()
        task = asyncio.get_running_loop().create_task(self._relay(requests, queued))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return queued

    async def _relay(self, requests: list[Request], queued: Future) -> None:
        model = requests[0].model
        options = {"stream": True} if model == self.base_name else {"stream": True, "multiplexed_model_id": model}
        response = self.handle.options(**options).generate.remote([(r.prompt_ids, r.params) for r in requests])
        self._in_flight += len(requests)
        try:
            async for item in response:
                if not self._take(item, requests, queued):
                    break
                if all(r.cancelled for r in requests):  # the client left: stop the replica's rows too
                    response.cancel()
                    break
        except Exception as err:  # noqa: BLE001 - a replica that died or was cancelled: tell the client
            log.warning("replica call failed: %s", err)  # a remote traceback: for the log, not the client
            self._fail(requests, queued, errors.unavailable("the replica serving this request failed; retry"))
        finally:
            self._in_flight -= len(requests)

    def _take(self, item: tuple, requests: list[Request], queued: Future) -> bool:
        """Act on one item of a replica's stream; False when the stream is over."""
        kind = item[0]
        if kind == "queued":
            self.metrics.route(item[1], item[2])
            queued.set_result(None if requests[0].model == self.base_name else "hit" if item[2] else "miss")
        elif kind == "event":
            requests[item[1]].sink(item[2])
        elif kind == "stats":
            self.replicas[item[1]] = item[2]
            return False
        else:
            self._fail(requests, queued, errors.APIError(**item[1]))
            return False
        return True

    @staticmethod
    def _fail(requests: list[Request], queued: Future, error: errors.APIError) -> None:
        if not queued.done():
            queued.set_exception(error)
            return
        for request in requests:
            request.sink(Event(error=error))


def _per_replica() -> errors.APIError:
    return errors.APIError(501, "with --ray, each replica has its own prefix store: add the prefix's folder under a "
                           "--prefix-dir instead (every replica serves it on first use)", code="not_supported")


def _sink(loop, events: asyncio.Queue, index: int):
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))


def _fields(err: errors.APIError) -> dict:
    """An error as plain fields: it crosses a process boundary and is rebuilt on the other side."""
    return {"status": err.status, "message": err.message, "type": err.type, "param": err.param, "code": err.code}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
