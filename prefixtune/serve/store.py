"""The prefixes a server can serve: named at start-up, loaded by an admin, or found on disk.

A deployment with one prefix per customer or per task has thousands of them, most cold. The
store serves them all without holding them all:

* **Discovery.** Every folder under a ``--prefix-dir`` root is servable under its folder name.
  Nothing is read to list them (:meth:`PrefixStore.names` only looks for the config file), and a
  folder added later is served on its first request; one removed is refused (404) from then on.
* **Two rules, here and nowhere else.** The name rule (:data:`NAME`, matched in full on every
  lookup, before any file is looked at) and the path rule (:class:`PrefixFolders`: every folder
  and every file read resolves inside a root), since a folder's files are input from whoever can
  write under the root.
* **Budget.** The folded key/values of the prefixes held on the model's device never take more
  than ``budget_bytes``. A prefix that no waiting or running request holds (its *pins*) may be
  evicted, least recently used first; a held one never is, so a row keeps its prefix to the end.
  Where the device is not the host, a second budget keeps recently evicted prefixes in host
  memory, ready to copy back instead of reading the disk again.
* **Loading off the decoding loop.** A cold prefix is read by a loader thread; only the requests
  that need it wait (:meth:`PrefixStore.acquire` returns a future), and concurrent requests for
  the same cold prefix share one load. A folder that fails to load fails only its own requests,
  and its failure is remembered until one of its files changes.

Prefixes named at start-up (``--prefix``) or loaded by an admin are *static*: held on the device
for as long as they are served, and counted in the budget too. Replacing or removing one while
requests use it retires it: it stays until the last of them ends.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import artifacts
from ..encoder import PrefixEncoder
from . import errors

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
"""Prefix names: they appear in URLs and ``"model"`` fields, and name folders under a ``--prefix-dir``."""
NAME_RULE = "letters, digits and . _ : - (at most 128, the first a letter or digit)"
REMEMBERED_FAILURES = 4096
"""Folders whose failure to load is remembered (until their files change), so a broken folder is
not read again on every request that names it."""
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
"""Histogram bounds (seconds) of prefix loads, disk or host tier to device."""
ROOM_TIMEOUT_S = 60.0
"""How long a load waits for held prefixes to free room in the budget before it fails (503)."""

Loader = Callable[[Path], PrefixEncoder]


@dataclass(eq=False)
class Entry:
    """One served prefix: where it came from, where it is now, and who holds it."""

    key: str  # unique: "NAME#serial"
    name: str
    folder: Path | None  # the folder it was read from (None: handed over in memory)
    signature: tuple | None  # the folder's files' (mtime, size) when read: a changed folder is read again
    encoder: PrefixEncoder | None = None  # on the model's device while resident
    host: PrefixEncoder | None = None  # in host memory while in the host tier
    nbytes: int = 0
    static: bool = False
    retired: bool = False
    pins: int = 0

    @property
    def shape(self) -> dict:
        """What the admin API says of the prefix: its kind, its key/value positions (a memory has none) and layers."""
        prefix = self.encoder or self.host
        length = prefix.config.prefix_length if prefix.kind == "kv" else 0
        return {"kind": prefix.kind, "prefix_length": length, "layers": len(prefix.layers)}


@dataclass
class StoreStats:
    """Counters for ``/metrics``: hits and misses per tier, evictions, resident bytes, load times."""

    hits: int = 0  # on the device already
    host_hits: int = 0  # copied back from host memory
    misses: int = 0  # read from disk
    failures: int = 0
    evictions: collections.Counter = field(default_factory=collections.Counter)  # tier -> count
    resident: dict = field(default_factory=lambda: {"device": 0, "host": 0})  # tier -> bytes
    load_buckets: list = field(default_factory=lambda: [0] * len(LOAD_BUCKETS))
    load_count: int = 0
    load_sum: float = 0.0

    @classmethod
    def total(cls, parts: list["StoreStats"]) -> "StoreStats":
        """The sum of several stores' counters (one per replica, behind one front)."""
        out = cls()
        for part in parts:
            out.hits, out.host_hits = out.hits + part.hits, out.host_hits + part.host_hits
            out.misses, out.failures = out.misses + part.misses, out.failures + part.failures
            out.evictions.update(part.evictions)
            out.resident = {t: out.resident[t] + part.resident[t] for t in out.resident}
            out.load_buckets = [a + b for a, b in zip(out.load_buckets, part.load_buckets)]
            out.load_count, out.load_sum = out.load_count + part.load_count, out.load_sum + part.load_sum
        return out

    def loaded(self, seconds: float) -> None:
        self.load_count += 1
        self.load_sum += seconds
        for i, bound in enumerate(LOAD_BUCKETS):  # the bucket of its own; /metrics accumulates
            if seconds <= bound:
                self.load_buckets[i] += 1
                break


def valid_name(name) -> bool:
    """Whether ``name`` is a prefix name: :data:`NAME` matched in full (a trailing newline too is refused)."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


class PrefixFolders:
    """The ``--prefix-dir`` roots: the prefix folders they hold, and the path rule.

    The path rule: a prefix is read only from a folder whose real path (symlinks followed, ``..``
    resolved) lies inside a root, and every file read from such a folder resolves inside a root
    too, so a link cannot bring a file from elsewhere into a root. Listing reads no prefix (one
    ``stat`` per folder); the Ray front lists with this alone, and its replicas' stores load.
    """

    def __init__(self, roots=()):
        self.roots = [Path(r).resolve() for r in roots]

    def names(self) -> list[str]:
        """Each root's prefix folders by name, sorted per root; the first root that has a name wins."""
        return list(dict.fromkeys(name for root in self.roots for name in sorted(self._listed(root))))

    def folder(self, name: str) -> Path | None:
        """The folder serving ``name`` (the first root that has it), if ``name`` is a prefix name and
        the folder holds a prefix config and lies inside its root."""
        if not valid_name(name):
            return None
        for root in self.roots:
            folder = root / name
            if (folder / artifacts.CONFIG_FILE).is_file() and self._within(folder, root):
                return folder
        return None

    def check(self, path: str) -> Path:
        """``path`` resolved, if it lies inside a root: else a 403 naming the rule (400 for a path that
        cannot be resolved at all: a NUL byte, a symlink loop)."""
        try:
            resolved = Path(path).resolve()
        except (ValueError, OSError, RuntimeError) as err:
            raise errors.bad_request(f"{_shown(path)} is not a usable path ({err})", param="path",
                                     code="invalid_path") from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            where = ", ".join(str(r) for r in self.roots) or "none: start the server with --prefix-dir"
            raise errors.APIError(403, f"{_shown(path)} resolves to {str(resolved)!r}, outside every --prefix-dir "
                                  f"({where}); only folders inside one may be loaded", type="permission_error",
                                  param="path", code="path_not_allowed")
        return resolved

    def check_files(self, folder: Path, files: tuple[str, ...], param: str) -> None:
        """For a folder inside a root: each of ``files`` that exists resolves inside a root, else a 403."""
        if not any(self._within(folder, root) for root in self.roots):
            return  # not a root's folder (one named from Python): the rule is the roots'
        for name in files:
            path = folder / name
            if path.exists() and not any(self._within(path, root) for root in self.roots):
                raise errors.APIError(403, f"{str(path)!r} resolves outside every --prefix-dir: a prefix's files "
                                      "must lie inside one", type="permission_error", param=param,
                                      code="path_not_allowed")

    @staticmethod
    def _within(path: Path, root: Path) -> bool:
        try:
            return path.resolve().is_relative_to(root)
        except (OSError, RuntimeError):  # a symlink loop
            return False

    def _listed(self, root: Path) -> list[str]:
        """Names of ``root``'s sub-folders that hold a prefix config: one ``stat`` each, no file read;
        a symlink is listed only if it resolves inside ``root`` (as :meth:`folder` requires)."""
        try:
            with os.scandir(root) as entries:
                return [e.name for e in entries if valid_name(e.name)
                        and os.path.isfile(os.path.join(e.path, artifacts.CONFIG_FILE))
                        and (not e.is_symlink() or self._within(Path(e.path), root))]
        except OSError:
            return []


class PrefixStore:
    """Named prefixes for a server, with a device budget, a host tier and lazy discovery.

    Args:
        loader: Reads one prefix folder into a flat encoder (on the CPU), e.g.
            :func:`~prefixtune.serve.loader.key_value_loader`; whatever it raises refuses that folder
            alone (``FileNotFoundError``: 404; anything else: 422 for a request, 400 for an admin load).
        device: Where served prefixes live (the model's device).
        roots: ``--prefix-dir`` folders: each sub-folder is a prefix named after it, and the only
            places an admin load may read from (:class:`PrefixFolders`).
        budget_bytes: Most bytes of key/values on ``device`` (``None``: no bound).
        host_budget_bytes: Most bytes kept in host memory after eviction (0: none; only useful
            when ``device`` is not the CPU).
        workers: Loader threads.
    """

    def __init__(self, loader: Loader, device, roots=(), budget_bytes: int | None = None,
                 host_budget_bytes: int = 0, workers: int = 2):
        self.loader, self.device = loader, torch.device(device)
        self.folders = PrefixFolders(roots)
        self.budget, self.host_budget = budget_bytes, host_budget_bytes
        self.stats = StoreStats()
        self._lock = threading.Condition()
        self._static: dict[str, Entry] = {}
        self._found: dict[str, Entry] = {}  # folder-backed, by name: the newest read of each
        self._device: collections.OrderedDict[str, Entry] = collections.OrderedDict()  # evictable, LRU first
        self._host: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._loading: dict[tuple, tuple[Future, list[int]]] = {}  # (name, signature) -> (future, pins)
        self._live: dict[str, Entry] = {}  # every entry not dropped, by key
        self._failed: collections.OrderedDict[Path, tuple] = collections.OrderedDict()  # folder -> (signature, error)
        self._serial = itertools.count(1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefixtune-load")

    # ------------------------------------------------------------ names
    def names(self) -> list[str]:
        """Every servable name: the static ones, then each root's prefix folders (sorted). Nothing is loaded."""
        with self._lock:
            static = list(self._static)
        return list(dict.fromkeys(static + self.folders.names()))

    def resident(self, name: str) -> bool:
        """Whether ``name`` is on the device now (a request for it would not wait for a load)."""
        with self._lock:
            entry = self._static.get(name) or self._found.get(name)
            return entry is not None and entry.encoder is not None

    def check_folder(self, path: str) -> Path:
        """The path rule of an admin load (:meth:`PrefixFolders.check`)."""
        return self.folders.check(path)

    # ------------------------------------------------------------ serving
    def acquire(self, name: str) -> Future:
        """A future of the :class:`Entry` served as ``name``, held (pinned) until :meth:`release`.

        Done at once when the prefix is on the device; otherwise it is loaded by a loader thread,
        once for every concurrent caller. Raises a 404 ``APIError`` at once for an unknown name."""
        with self._lock:
            entry = self._static.get(name)
            if entry is not None:
                entry.pins += 1
                self.stats.hits += 1
                return _done(entry)
        folder = self.folders.folder(name)
        if folder is None:
            self._forget(name)
            raise errors.unknown_model(name)
        signature = _signature(folder)
        with self._lock:
            entry = self._found.get(name)
            if entry is not None and entry.signature == signature and entry.encoder is not None:
                entry.pins += 1
                self.stats.hits += 1
                self._device.move_to_end(entry.key)
                return _done(entry)
            flight = self._loading.get((name, signature))
            if flight is None:
                flight = (self._pool.submit(self._load_found, name, folder, signature, entry), [0])
                self._loading[(name, signature)] = flight
            flight[1][0] += 1
            return flight[0]

    def release(self, entry: Entry) -> None:
        """One holder of ``entry`` is done with it."""
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.retired:
                self._drop(entry)
            self._lock.notify_all()

    # ------------------------------------------------------------ static prefixes
    def add(self, name: str, encoder: PrefixEncoder, folder: Path | None = None) -> dict:
        """Serve ``encoder`` (folded, flat) as ``name`` until removed; one of that name is retired."""
        entry = Entry(f"{name}#{next(self._serial)}", name, folder, None, static=True, nbytes=_nbytes(encoder))
        encoder = encoder.eval()
        with self._lock:
            self._make_room(entry.nbytes, name)
            entry.encoder = encoder.to(self.device)
            self.stats.resident["device"] += entry.nbytes
            self._live[entry.key] = entry
            old = self._static.pop(name, None)
            self._static[name] = entry
            if old is not None:
                self._retire(old)
        return {"id": name, "object": "prefix", **entry.shape, "replaced": old is not None}

    def load(self, name: str, folder: str) -> Future:
        """Read ``folder`` on a loader thread and serve it as ``name`` (static); the future holds
        :meth:`add`'s answer or a 400 naming the problem."""
        return self._pool.submit(lambda: self.add(name, self._read(Path(folder), param="path"), Path(folder)))

    def remove(self, name: str) -> dict:
        """Stop serving the static prefix ``name``; requests that hold it finish with it."""
        with self._lock:
            entry = self._static.pop(name, None)
            if entry is None:
                if self.folders.folder(name) is not None:
                    raise errors.APIError(409, f"{name!r} is served from a --prefix-dir folder: remove the folder "
                                          "to stop serving it", code="prefix_from_folder")
                raise errors.unknown_model(name)
            self._retire(entry)
        return {"id": name, "object": "prefix", "deleted": True}

    def held(self) -> dict[str, int]:
        """Holders per prefix held now, by entry key."""
        with self._lock:
            return {key: e.pins for key, e in self._live.items() if e.pins}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ internals
    def _load_found(self, name: str, folder: Path, signature: tuple, stale: Entry | None) -> Entry:
        """On a loader thread: bring ``name`` onto the device (from the host tier, or the disk)."""
        key = (name, signature)
        try:
            start = time.perf_counter()
            with self._lock:
                cached = stale if stale is not None and stale.signature == signature and stale.host else None
                encoder, entry = (cached.host, cached) if cached is not None else (None, None)
            if cached is None:
                encoder = self._read(folder, param="model")
                entry = Entry(f"{name}#{next(self._serial)}", name, folder, signature, nbytes=_nbytes(encoder))
            with self._lock:
                self._make_room(entry.nbytes, name)
                if cached is not None:
                    if self._host.pop(entry.key, None) is not None:
                        self.stats.resident["host"] -= entry.nbytes
                    entry.host = None
                    self.stats.host_hits += 1
                else:
                    self.stats.misses += 1
                entry.encoder = encoder.to(self.device)
                self.stats.resident["device"] += entry.nbytes
                self._device[entry.key] = entry
                self._live[entry.key] = entry
                old = self._found.get(name)
                self._found[name] = entry
                if old is not None and old is not entry:
                    self._retire(old)
                _, pins = self._loading.pop(key)
                entry.pins += pins[0]
                self.stats.loaded(time.perf_counter() - start)
            return entry
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
                self.stats.failures += 1
            raise

    def _read(self, folder: Path, param: str) -> PrefixEncoder:
        """``folder``'s prefix through the loader, on a loader thread; a folder that failed is refused
        again from memory, without reading it, until one of its files changes."""
        signature = _signature(folder)
        with self._lock:
            failed = self._failed.get(folder)
        if failed is not None and failed[0] == signature:
            raise _refusal(failed[1], folder, param)
        try:
            self.folders.check_files(folder, (artifacts.CONFIG_FILE, artifacts.WEIGHTS_FILE), param)
            encoder = self.loader(folder)
        except Exception as err:  # noqa: BLE001 - whatever a folder's files cause is that folder's refusal
            self._remember(folder, signature, err)
            raise _refusal(err, folder, param) from err
        if self.budget is not None and _nbytes(encoder) > self.budget:
            raise errors.APIError(507, f"the prefix in {str(folder)!r} takes {_nbytes(encoder)} bytes, more than the "
                                  f"whole prefix cache ({self.budget} bytes): raise --prefix-cache-mb",
                                  type="server_error", code="prefix_too_large")
        return encoder.eval()

    def _remember(self, folder: Path, signature: tuple, err: Exception) -> None:
        with self._lock:
            self._failed[folder] = (signature, err)
            self._failed.move_to_end(folder)
            while len(self._failed) > REMEMBERED_FAILURES:
                self._failed.popitem(last=False)

    def _make_room(self, nbytes: int, name: str) -> None:
        """Evict unheld prefixes, least recently used first, until ``nbytes`` more fit (lock held);
        wait for holders to release while everything is held."""
        if self.budget is None:
            return
        deadline = time.monotonic() + ROOM_TIMEOUT_S
        while self.stats.resident["device"] + nbytes > self.budget:
            victim = next((e for e in self._device.values() if e.pins == 0), None)
            if victim is not None:
                self._evict(victim)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.APIError(503, f"no room for prefix {name!r}: the prefix cache ({self.budget} bytes) is "
                                      "full of prefixes in use; retry later or raise --prefix-cache-mb",
                                      type="server_error", code="prefix_cache_full")
            self._lock.wait(left)

    def _evict(self, entry: Entry) -> None:
        """Take ``entry`` off the device (lock held): into the host tier if it has room, else away."""
        self._device.pop(entry.key, None)
        self.stats.resident["device"] -= entry.nbytes
        self.stats.evictions["device"] += 1
        encoder, entry.encoder = entry.encoder, None
        if self.host_budget >= entry.nbytes and not entry.retired:
            while self.stats.resident["host"] + entry.nbytes > self.host_budget:
                _, oldest = self._host.popitem(last=False)
                self.stats.resident["host"] -= oldest.nbytes
                self.stats.evictions["host"] += 1
                oldest.host = None
            entry.host = encoder.to("cpu")
            self._host[entry.key] = entry
            self.stats.resident["host"] += entry.nbytes

    def _retire(self, entry: Entry) -> None:
        """``entry`` is no longer served by its name (lock held); it goes when no one holds it."""
        entry.retired = True
        if entry.pins == 0:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        self._live.pop(entry.key, None)
        if entry.encoder is not None:
            self._device.pop(entry.key, None)
            self.stats.resident["device"] -= entry.nbytes
            entry.encoder = None
        if entry.host is not None:
            self._host.pop(entry.key, None)
            self.stats.resident["host"] -= entry.nbytes
            entry.host = None
        if self._found.get(entry.name) is entry:
            del self._found[entry.name]

    def _forget(self, name: str) -> None:
        """The folder of ``name`` is gone: its copy goes as soon as no request holds it."""
        with self._lock:
            entry = self._found.get(name)
            if entry is not None:
                self._retire(entry)
                self._found.pop(name, None)


def _refusal(err: Exception, folder: Path, param: str) -> errors.APIError:
    """The client's answer to a folder that failed to load: 404 (requests) or 400 (admin loads) for
    a missing prefix, else 422 or 400 naming the problem in one line. An error no check anticipated
    is named by its type only (its text may carry the internals of a library), and logged."""
    if isinstance(err, errors.APIError):
        return errors.APIError(err.status, err.message, err.type, param, err.code)
    if isinstance(err, FileNotFoundError):
        return errors.APIError(404 if param == "model" else 400, f"no saved prefix at {str(folder)!r}: "
                               f"{_line(err)}", param=param, code="prefix_not_found")
    if isinstance(err, (ValueError, KeyError, OSError, RecursionError)):
        problem = _line(err)
    else:
        log.warning("prefix folder %s failed to load", folder, exc_info=err)
        problem = f"its files are not a usable prefix ({type(err).__name__})"
    return errors.APIError(422 if param == "model" else 400, f"cannot load the prefix in {str(folder)!r}: {problem}",
                           param=param, code="prefix_unloadable")


def _line(err: Exception, most: int = 300) -> str:
    """The first line of ``err``'s message, at most ``most`` characters."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= most else text[:most] + "..."


def _shown(path: str, most: int = 200) -> str:
    """``path`` as a client sent it, quoted, cut short."""
    return repr(path if len(path) <= most else path[:most] + "...")


def _signature(folder: Path) -> tuple:
    """What changes when a prefix is saved again into ``folder`` (the files are replaced atomically)."""
    out = []
    for name in (artifacts.CONFIG_FILE, artifacts.WEIGHTS_FILE):
        try:
            st = os.stat(folder / name)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def _nbytes(encoder: PrefixEncoder) -> int:
    return sum(p.numel() * p.element_size() for p in encoder.parameters())


def _done(entry: Entry) -> Future:
    future: Future = Future()
    future.set_result(entry)
    return future
