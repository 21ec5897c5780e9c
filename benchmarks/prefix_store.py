"""The prefix store at scale: 1,000 prefixes under a memory budget, 10,000 prefix folders, and
Ray Serve replicas routed by prefix.

Run from the repository root (each part alone with ``--parts``):

    python -m benchmarks.prefix_store --parts store folders ray --json benchmarks/results/prefix-store.json

The server is the real one (``prefixtune serve``'s app, batcher and store, on a loopback port of
this process) over the bundled SmolLM2-135M-Instruct (float32), and every request is a streamed
``/v1/completions`` call (``temperature=0``, ``max_tokens=--new-tokens``, ``ignore_eos``) whose
prompt is one of the demo task's.

* ``store``: ``--prefixes`` prefix folders (length 10, flat, random weights: 0.46 MB each on this
  model) under one ``--prefix-dir``; ``--requests`` requests whose prefixes follow a Zipf(1.0)
  distribution over them, sent by ``--concurrency`` client threads. Arms, interleaved over
  ``--repeats`` rounds (the order rotated), each round on a fresh server:

  - ``store``: ``--prefix-cache-mb`` set to ``--budget`` (10 %) of all the prefixes' bytes, starting
    empty: prefixes are read from disk on first use and evicted least recently used first;
  - ``resident``: the same server without a bound, every prefix loaded before the clock starts;
  - ``base``: the same requests to the base model, no prefix.

  Reported: generated tokens per second, the ratios ``store / resident`` and ``resident / base``
  (medians of per-round pairs), the p50 and p99 time to first token of cold requests (the response
  says ``X-Prefix-Cache: miss``: the prefix was loaded for it) and of warm ones, the largest
  resident bytes seen (sampled every 5 ms) against the budget, and whether ``store`` and
  ``resident`` gave the same text for every request (greedy: they must).
* ``folders``: start-up time and memory of ``prefixtune serve`` (in a fresh process each, the arms
  alternated) with ``--prefix-dir`` holding 0 and ``--folders`` prefix folders, and the latency of
  ``GET /v1/models`` with all of them listed.
* ``ray``: ``prefixtune serve --ray`` with 1 and then 2 replicas (each one CPU, one torch thread, as
  Ray gives an actor) on ``--ray-prefixes`` prefixes and ``--ray-requests`` Zipf requests; requests
  per second, tokens per second, the share of requests routed to a replica that held their prefix
  already, and whether both gave the same texts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from prefixtune import PrefixConfig, PrefixModel, options
from prefixtune.base_models import bundled_folder, load_model
from prefixtune.demo import examples
from prefixtune.serve import cli, setup
from prefixtune.serve.background import BackgroundServer

from .common import paired_ratio, rotated, settings, start, write_json

PREFIX_LENGTH = 10
BASE = "base"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["store", "folders", "ray"], default=["store", "folders", "ray"])
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.10, help="store arm: the cache, a share of all prefixes")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--ray-prefixes", type=int, default=50)
    parser.add_argument("--ray-requests", type=int, default=128)
    parser.add_argument("--ray-concurrency", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None, help="folder for the prefix folders (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a small shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # folders part: one start-up, in JSON
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- workload
def make_prefixes(root: Path, count: int, seed: int) -> int:
    """``count`` random flat prefixes of the bundled model in ``root/p0000...``; returns one's bytes."""
    model, _ = load_model()
    pm = PrefixModel(model)
    torch.manual_seed(seed)
    for i in range(count):
        pm.add_prefix("x", PrefixConfig(prefix_length=PREFIX_LENGTH, reparameterize=False, init_std=0.5))
        pm.save_prefix(root / f"p{i:04d}", name="x")
        pm.remove_prefix("x")
    return (root / "p0000" / "prefix.safetensors").stat().st_size


def zipf_jobs(names: list[str], count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` ``(prefix, prompt)`` pairs; prefix ranks follow Zipf(1.0) (rank k drawn with weight 1/k),
    ranks assigned to names at random."""
    rng = random.Random(seed)
    ranked = names[:]
    rng.shuffle(ranked)
    weights = [1.0 / k for k in range(1, len(ranked) + 1)]
    prompts = [e.prompt for e in examples(count, seed)]
    return [(rng.choices(ranked, weights)[0], prompt) for prompt in prompts]


def stream_one(url: str, model: str, prompt: str, tokens: int) -> dict:
    """One streamed completion: its text, time to first token, total time and X-Prefix-Cache."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start_time, first, text = time.perf_counter(), None, ""
    with urllib.request.urlopen(request, timeout=600) as response:
        cache = response.headers.get("X-Prefix-Cache")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if piece and first is None:
                first = time.perf_counter() - start_time
            text += piece
    return {"text": text, "ttft": first, "cache": cache, "seconds": time.perf_counter() - start_time}


def send_all(url: str, jobs: list[tuple[str, str]], tokens: int, concurrency: int) -> tuple[float, list[dict]]:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        begin = time.perf_counter()
        answers = list(pool.map(lambda job: stream_one(url, job[0], job[1], tokens), jobs))
    return time.perf_counter() - begin, answers


def server_config(*argv: str) -> setup.ServeConfig:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return options.build(setup.ServeConfig, parser.parse_args(["--device", "cpu", "--served-model-name", BASE, *argv]))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Watch:
    """Samples the store's resident device bytes every 5 ms while a run goes on."""

    def __init__(self, store):
        self.store, self.peak, self._stop = store, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.store.stats.resident["device"])
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.store.stats.resident["device"])


# ---------------------------------------------------------------------------- part: store
def part_store(args, root: Path, results: dict) -> None:
    each = make_prefixes(root, args.prefixes, args.seed)
    names = sorted(p.name for p in root.iterdir())
    total_mb = sum((root / n / "prefix.safetensors").stat().st_size for n in names) / 2**20
    budget_mb = args.budget * total_mb
    jobs = zipf_jobs(names, args.requests, args.seed)
    print(f"{len(names)} prefixes of {each / 1e6:.2f} MB ({total_mb:.0f} MiB); budget {budget_mb:.1f} MiB; "
          f"{len(set(n for n, _ in jobs))} distinct prefixes in {len(jobs)} requests", flush=True)
    out = results.setdefault("store", {"prefix_bytes": each, "budget_mib": budget_mb, "total_mib": total_mb,
                                       "distinct_prefixes": len({n for n, _ in jobs}), "runs": []})
    arms = ["store", "resident", "base"]
    loaded = load_model()
    for round_ in range(args.repeats):
        for arm in rotated(arms, round_):
            cfg = server_config("--prefix-dir", str(root), "--max-batch", str(args.concurrency),
                                "--prefix-cache-mb", str(budget_mb if arm == "store" else 4 * total_mb + 64))
            app = setup.build_app(cfg, loaded=loaded)
            batcher = app.state.backend
            if arm == "resident":
                for name in names:
                    batcher.store.release(batcher.store.acquire(name).result())
            arm_jobs = [(BASE, p) for _, p in jobs] if arm == "base" else jobs
            with BackgroundServer(app) as server, Watch(batcher.store) as watch:
                seconds, answers = send_all(server.url, arm_jobs, args.new_tokens, args.concurrency)
            run = {"arm": arm, "round": round_, "seconds": seconds,
                   "tokens_per_second": len(jobs) * args.new_tokens / seconds, "peak_resident_bytes": watch.peak,
                   "budget_bytes": int(cfg.prefix_cache_mb * 2**20), "texts": [a["text"] for a in answers],
                   "ttft": {kind: [a["ttft"] for a in answers if a["cache"] == kind] for kind in ("miss", "hit")},
                   "evictions": batcher.store.stats.evictions["device"], "misses": batcher.store.stats.misses}
            out["runs"].append(run)
            print(f"round {round_} {arm:9s} {seconds:6.1f} s  {run['tokens_per_second']:6.1f} tok/s  "
                  f"peak {watch.peak / 2**20:.1f} MiB  misses {run['misses']}  evictions {run['evictions']}",
                  flush=True)
            batcher.model.unwrap()  # the next arm wraps the same model afresh
            del app, batcher
            write_json(args.json, results)
    out["summary"] = summarize_store(out["runs"])
    print(json.dumps(out["summary"], indent=1), flush=True)
    write_json(args.json, results)


def summarize_store(runs: list[dict]) -> dict:
    times = {arm: [r["seconds"] for r in runs if r["arm"] == arm] for arm in ("store", "resident", "base")}
    rate = {arm: statistics.median(r["tokens_per_second"] for r in runs if r["arm"] == arm) for arm in times}
    store = [r for r in runs if r["arm"] == "store"]
    resident = [r for r in runs if r["arm"] == "resident"]
    ttft = {kind: [t for r in store for t in r["ttft"][kind]] for kind in ("miss", "hit")}
    ttft_resident = [t for r in resident for t in r["ttft"]["hit"]]
    return {
        "tokens_per_second": rate,
        "store_over_resident": 1 / paired_ratio(times, "store", "resident"),
        "resident_over_base": 1 / paired_ratio(times, "resident", "base"),
        "identical_texts_store_vs_resident": all(s["texts"] == resident[0]["texts"] for s in store + resident),
        "peak_resident_bytes": max(r["peak_resident_bytes"] for r in store),
        "budget_bytes": store[0]["budget_bytes"],
        "ttft_seconds": {"store_cold": {"count": len(ttft["miss"]), "p50": percentile(ttft["miss"], 0.5),
                                        "p99": percentile(ttft["miss"], 0.99)},
                         "store_warm": {"count": len(ttft["hit"]), "p50": percentile(ttft["hit"], 0.5),
                                        "p99": percentile(ttft["hit"], 0.99)},
                         "resident": {"count": len(ttft_resident), "p50": percentile(ttft_resident, 0.5),
                                      "p99": percentile(ttft_resident, 0.99)}},
        "loads_per_round": statistics.median(r["misses"] for r in store),
        "evictions_per_round": statistics.median(r["evictions"] for r in store),
    }


# ---------------------------------------------------------------------------- part: folders
def part_folders(args, root: Path, results: dict) -> None:
    one = root / "one"
    make_prefixes(one, 1, args.seed)
    empty, many = root / "empty", root / "many"
    empty.mkdir()
    for i in range(args.folders):  # hard links: 10,000 real prefix folders without 10,000 copies
        target = many / f"f{i:05d}"
        target.mkdir(parents=True)
        for file in (one / "p0000").iterdir():
            os.link(file, target / file.name)
    runs = []
    for round_ in range(args.repeats):
        for label, folder in rotated([("0", empty), (str(args.folders), many)], round_):
            child = subprocess.run([sys.executable, "-m", "benchmarks.prefix_store", "--child", str(folder),
                                    "--threads", str(args.threads)],
                                   capture_output=True, text=True, check=True)
            run = {"folders": int(label), **json.loads(child.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(f"round {round_} {label:>6s} folders: start {run['startup_seconds']:.1f} s, "
                  f"rss {run['rss_mib']:.0f} MiB, /v1/models {run['models_ms_p50']:.1f} ms "
                  f"({run['models_listed']} listed)", flush=True)
    results["folders"] = {"runs": runs, "summary": {
        str(n): {key: statistics.median(r[key] for r in runs if r["folders"] == n)
                 for key in ("startup_seconds", "rss_mib", "models_ms_p50", "models_listed")}
        for n in (0, args.folders)}}
    print(json.dumps(results["folders"]["summary"], indent=1), flush=True)
    write_json(args.json, results)


def child_startup(folder: str) -> None:
    """One start-up of the server on ``folder`` (the process is fresh): seconds, RSS, /v1/models latency."""
    import psutil

    bundled_folder()  # the one-time GGUF conversion is not start-up
    begin = time.perf_counter()
    app = setup.build_app(server_config("--prefix-dir", folder))
    with BackgroundServer(app) as server:
        startup = time.perf_counter() - begin
        rss = psutil.Process().memory_info().rss / 2**20
        latencies, listed = [], 0
        for _ in range(20):
            t = time.perf_counter()
            with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as response:
                listed = len(json.load(response)["data"])
            latencies.append((time.perf_counter() - t) * 1000)
    print(json.dumps({"startup_seconds": startup, "rss_mib": rss, "models_ms_p50": statistics.median(latencies),
                      "models_listed": listed - 1}))


# ---------------------------------------------------------------------------- part: ray
def part_ray(args, root: Path, results: dict) -> None:
    import ray
    from ray import serve

    from prefixtune.serve import ray_serve

    folder = root / "ray"
    make_prefixes(folder, args.ray_prefixes, args.seed)
    jobs = zipf_jobs(sorted(p.name for p in folder.iterdir()), args.ray_requests, args.seed + 1)
    runs = []
    for replicas in (1, 2):
        cfg = server_config("--prefix-dir", str(folder), "--ray", "--replicas", str(replicas),
                            "--ray-prefixes-per-replica", str(args.ray_prefixes))
        begin = time.perf_counter()
        app = ray_serve.build_front(cfg)
        ready = time.perf_counter() - begin
        with BackgroundServer(app) as server:
            send_all(server.url, jobs[:8], 2, 4)  # warm-up: every replica's first forward
            seconds, answers = send_all(server.url, jobs, args.new_tokens, args.ray_concurrency)
            routed = app.state.metrics.routed
        hits = sum(n for (_, kind), n in routed.items() if kind == "hit")
        total = sum(routed.values())
        run = {"replicas": replicas, "ready_seconds": ready, "seconds": seconds,
               "requests_per_second": len(jobs) / seconds, "tokens_per_second": len(jobs) * args.new_tokens / seconds,
               "routed_hit_rate": hits / total, "per_replica": {f"{r}:{k}": n for (r, k), n in routed.items()},
               "texts": [a["text"] for a in answers]}
        runs.append(run)
        print(f"{replicas} replica(s): ready in {ready:.0f} s, {seconds:.1f} s, {run['requests_per_second']:.2f} req/s, "
              f"{run['tokens_per_second']:.1f} tok/s, routed to a holder {100 * run['routed_hit_rate']:.0f} %",
              flush=True)
        serve.shutdown()
    ray.shutdown()
    results["ray"] = {"runs": runs, "summary": {
        "two_over_one_tokens_per_second": runs[1]["tokens_per_second"] / runs[0]["tokens_per_second"],
        "identical_texts": runs[0]["texts"] == runs[1]["texts"]}}
    print(json.dumps(results["ray"]["summary"], indent=1), flush=True)
    write_json(args.json, results)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child_startup(args.child)
    results = {**start(__file__, argv, threads=args.threads), "settings": settings(args)}
    work = args.work or Path(tempfile.mkdtemp(prefix="prefix-store-"))
    try:
        for part in args.parts:
            {"store": part_store, "folders": part_folders, "ray": part_ray}[part](args, work / part, results)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
