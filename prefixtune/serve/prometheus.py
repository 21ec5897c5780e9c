"""Counters for ``/metrics``, written in Prometheus' text exposition format (version 0.0.4).

Kept dependency-free: a handful of counters, one histogram of decoding batch sizes (the
number that shows mixed batching at work) and gauges read at scrape time. The batcher
thread and the HTTP handlers both write, so every update takes a lock.
"""

from __future__ import annotations

import collections
import threading
import time

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0


class Metrics:
    """What the server has done so far; :meth:`render` gives the ``/metrics`` page."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps: collections.Counter[str] = collections.Counter()
        self.step_seconds: collections.Counter[str] = collections.Counter()
        self.batch_buckets = [0] * len(BATCH_BUCKETS)
        self.batch_count = self.batch_sum = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self.routed: collections.Counter[tuple[str, str]] = collections.Counter()  # (replica, hit|miss), Ray only

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def route(self, replica: str, hit: bool) -> None:
        """A request that Ray Serve routed to ``replica``, which held its prefix already (``hit``) or not."""
        with self._lock:
            self.routed[(replica, "hit" if hit else "miss")] += 1

    def step(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        """One batcher step: ``kind`` is ``"prefill"`` (tokens = prompt tokens) or ``"decode"``."""
        now = time.monotonic()
        with self._lock:
            self.steps[kind] += 1
            self.step_seconds[kind] += seconds
            if kind == "prefill":
                self.prompt_tokens += tokens
                self.generation_tokens += rows  # a prefill also yields each row's first token
                self._recent.append((now, rows))
                return
            self.generation_tokens += tokens
            self._recent.append((now, tokens))
            self.batch_count += 1
            self.batch_sum += rows
            for i, bound in enumerate(BATCH_BUCKETS):  # the bucket of its own; render() accumulates
                if rows <= bound:
                    self.batch_buckets[i] += 1
                    break

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self, queue_depth: int, active: int, store) -> str:
        """The exposition text; gauges are passed in, read from the batcher and its prefix store
        (``store``: a :class:`~prefixtune.serve.store.StoreStats`) at scrape time."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = _family("prefixtune_requests_total", "counter", "HTTP requests by endpoint and status.",
                            [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.requests.items())])
            lines += _family("prefixtune_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                             [({}, self.prompt_tokens)])
            lines += _family("prefixtune_generation_tokens_total", "counter", "Tokens generated.",
                             [({}, self.generation_tokens)])
            lines += _family("prefixtune_generation_tokens_per_second", "gauge",
                             f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [({}, rate)])
            lines += _family("prefixtune_steps_total", "counter", "Batcher forward passes by kind.",
                             [({"kind": k}, n) for k, n in sorted(self.steps.items())])
            lines += _family("prefixtune_step_seconds_total", "counter", "Time in batcher forward passes by kind.",
                             [({"kind": k}, s) for k, s in sorted(self.step_seconds.items())])
            if self.routed:
                lines += _family("prefixtune_routed_requests_total", "counter",
                                 "Requests routed to each replica, by whether it held their prefix already.",
                                 [({"replica": r, "result": h}, n) for (r, h), n in sorted(self.routed.items())])
            lines += _histogram("prefixtune_batch_size", "Rows in each decoding step (all prefixes together).",
                                BATCH_BUCKETS, self.batch_buckets, self.batch_sum, self.batch_count)
        lines += _family("prefixtune_queue_depth", "gauge", "Requests waiting for a batch row.", [({}, queue_depth)])
        lines += _family("prefixtune_active_requests", "gauge", "Requests being decoded.", [({}, active)])
        return "\n".join(lines + store_lines(store)) + "\n"


def store_lines(stats) -> list[str]:
    """The prefix store's families: lookups by result, evictions and resident bytes by tier, load times."""
    from .store import LOAD_BUCKETS

    lines = _family("prefixtune_prefix_cache_lookups_total", "counter",
                    "Prefix lookups: hit (on the device), host_hit (copied back from host memory), miss (read "
                    "from disk), failed (could not be loaded).",
                    [({"result": "hit"}, stats.hits), ({"result": "host_hit"}, stats.host_hits),
                     ({"result": "miss"}, stats.misses), ({"result": "failed"}, stats.failures)])
    lines += _family("prefixtune_prefix_cache_evictions_total", "counter", "Prefixes evicted, by tier.",
                     [({"tier": t}, stats.evictions[t]) for t in ("device", "host")])
    lines += _family("prefixtune_prefix_cache_resident_bytes", "gauge", "Prefix key/values held, by tier.",
                     [({"tier": t}, stats.resident[t]) for t in ("device", "host")])
    return lines + _histogram("prefixtune_prefix_load_seconds", "Seconds to bring a prefix onto the device.",
                              LOAD_BUCKETS, stats.load_buckets, stats.load_sum, stats.load_count)


def _histogram(name: str, help_text: str, bounds, counts, total, count) -> list[str]:
    """A histogram family from per-bucket counts (each bucket's own, made cumulative here)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, n in zip(bounds, counts):
        running += n
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
    return lines + [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {_number(total)}", f"{name}_count {count}"]


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return lines


def _number(value: float) -> str:
    """Integers in full (``1234567``, not ``1.23457e+06``), other values as Python's shortest repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
