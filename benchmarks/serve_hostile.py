"""``/health`` while hostile clients send what a probe of the server sent.

Run from the repository root:

    python -m benchmarks.serve_hostile --json benchmarks/results/serve-hostile.json

``prefixtune serve`` runs as a process of its own (the bundled model on the CPU, no inference key,
an admin key, a ``--prefix-dir`` of hostile folders), so that the clients here share nothing with it
but the machine. One thread asks ``/health`` every 20 ms on a fresh connection throughout; each case
runs in turn and the table gives what the server answered, the ``/health`` latencies during the case
(median, 99th percentile, worst, and any answer that was not 200) and how the server's resident
memory changed. The defaults of every connection, header and body bound apply.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from .common import start, write_json

ADMIN = "hostile-admin"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the bundled one)")
    parser.add_argument("--idle", type=int, default=1000, help="connections that send nothing")
    parser.add_argument("--half", type=int, default=200, help="connections that send half their headers")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- the server under test
def hostile_folders(root: Path) -> None:
    """Prefix folders as a hostile writer could leave them (none needs a real prefix: each is refused
    before its key/values would be read)."""
    small = json.dumps({"format": "prefixtune-prefix", "prefix": {"prefix_length": 10**30}})
    for name, config in (("deep", "[" * 100_000 + "]" * 100_000), ("huge-length", small), ("sparse", None)):
        (root / name).mkdir()
        (root / name / "prefix.safetensors").write_bytes(b"\0" * 64)
        if config is None:
            with open(root / name / "prefix_config.json", "wb") as f:
                f.truncate(1 << 30)
        else:
            (root / name / "prefix_config.json").write_text(config)
    (root / "loop").symlink_to(root / "loop")


def launch(args, root: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefixtune.cli", "serve", "--device", "cpu", "--port", str(port),
               "--prefix-dir", str(root), "--admin-key", ADMIN, "--log-level", "critical"]
    command += ["--model", args.model] if args.model else []
    env = {k: v for k, v in os.environ.items() if k not in ("PREFIXTUNE_API_KEY", "PREFIXTUNE_ADMIN_KEY")}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def request(url: str, method: str = "GET", body=None, key: str | None = None, timeout: float = 120):
    data = None if body is None else json.dumps(body).encode() if not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


class HealthProbe:
    """``/health`` every 20 ms on a fresh connection; :meth:`window` gives the latencies since a mark."""

    def __init__(self, url: str):
        self.url, self.samples, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            begin = time.perf_counter()
            try:
                status = request(self.url + "/health", timeout=30)
            except OSError:
                status = 0
            self.samples.append((begin, time.perf_counter() - begin, status))
            time.sleep(0.02)

    def window(self, since: float) -> dict:
        rows = [(begin - since, s, status) for begin, s, status in self.samples if begin >= since]
        seconds = sorted(s for _, s, _ in rows) or [0.0]
        worst_at = max(rows, key=lambda row: row[1])[0] if rows else 0.0
        return {"samples": len(rows), "p50_ms": 1000 * statistics.median(seconds),
                "p99_ms": 1000 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))],
                "max_ms": 1000 * seconds[-1], "max_at_s": worst_at,
                "not_200": sorted({status for _, _, status in rows if status != 200})}


# ---------------------------------------------------------------------------- the cases
def repeated(attempt, seconds: float = 5.0) -> list:
    """``attempt()`` again and again for ``seconds``: a case long enough for ``/health`` to be asked often."""
    answers, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        answers.append(attempt())
    return answers


def big_header(port: int, size: int) -> str:
    def attempt() -> int:
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
            try:
                while sent < size:
                    sock.sendall(b"a" * (1 << 20))
                    sent += 1 << 20
            except OSError:
                pass
        return sent

    sent = repeated(attempt)
    return f"{len(sent)} attempts, each cut off after at most {max(sent) >> 20} MiB of {size >> 20} MiB"


def idle_and_half(port: int, idle: int, half: int) -> str:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle + half)]
    for sock in socks[idle:]:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Half: ")
    begin, closed = time.monotonic(), []
    for sock in socks:
        sock.settimeout(max(0.1, 30 - (time.monotonic() - begin)))
        try:
            while sock.recv(4096):
                pass
            closed.append(time.monotonic() - begin)
        except OSError:
            closed.append(time.monotonic() - begin)
        sock.close()
    return f"{len(closed)} of {idle + half} closed by the server, the last after {max(closed):.1f} s"


def deep_body(url: str) -> str:
    raw = ('{"model": "x", "prompt": "x", "m": ' + ('{"%s": ' % ("k" * 1021)) * 971 + "1" + "}" * 971 + "}").encode()
    statuses = repeated(lambda: request(url + "/v1/completions", "POST", raw))
    return f"{len(statuses)} bodies, statuses " + ", ".join(sorted(set(map(str, statuses))))


def sampling(url: str, base: str) -> str:
    cases = {"temperature 1e-40": {"temperature": 1e-40}, "top_p 1e-46": {"top_p": 1e-46}}
    body = {"model": base, "prompt": "Hi", "max_tokens": 2}
    return "; ".join(f"{name}: {request(url + '/v1/completions', 'POST', {**body, **extra})}"
                     for name, extra in cases.items())


def names_paths_and_folders(url: str, root: Path) -> str:
    cases = [("model of 256 characters", lambda: request(url + "/v1/completions", "POST",
                                                         {"model": "x" * 256, "prompt": "Hi", "max_tokens": 2})),
             ("admin path NUL", lambda: request(url + "/v1/prefixes/p", "POST", {"path": "\u0000"}, ADMIN)),
             ("admin path loop", lambda: request(url + "/v1/prefixes/p", "POST", {"path": str(root / "loop" / "x")},
                                                 ADMIN)),
             ("deep config", lambda: request(url + "/v1/completions", "POST",
                                             {"model": "deep", "prompt": "Hi", "max_tokens": 2})),
             ("deep config, admin load", lambda: request(url + "/v1/prefixes/p", "POST",
                                                         {"path": str(root / "deep")}, ADMIN)),
             ("prefix_length 10**30", lambda: request(url + "/v1/completions", "POST",
                                                      {"model": "huge-length", "prompt": "Hi", "max_tokens": 2})),
             ("1 GiB config x 5", lambda: [request(url + "/v1/completions", "POST",
                                                   {"model": "sparse", "prompt": "Hi", "max_tokens": 2})
                                           for _ in range(5)][-1])]
    return "; ".join(f"{name}: {run()}" for name, run in cases)


def empty_key(args) -> str:
    command = [sys.executable, "-m", "prefixtune.cli", "serve", "--device", "cpu", "--api-key", ""]
    command += ["--model", args.model] if args.model else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1]}"


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as free:
        root = Path(tmp)
        hostile_folders(root)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        server = launch(args, root, port)
        url = f"http://127.0.0.1:{port}"
        try:
            while not _up(url):
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(1)
            base = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]
            process = psutil.Process(server.pid)
            request(url + "/v1/completions", "POST", {"model": base, "prompt": "warm up", "max_tokens": 4})
            probe = HealthProbe(url)
            probe.thread.start()
            cases = {"idle server (5 s)": lambda: time.sleep(5) or "",
                     "60 MB headers, for 5 s": lambda: big_header(port, 60 << 20),
                     "200 MB headers, for 5 s": lambda: big_header(port, 200 << 20),
                     f"{args.idle} idle + {args.half} half-sent connections": lambda: idle_and_half(
                         port, args.idle, args.half),
                     "971 nested objects, 1,021-character keys (997 KB), for 5 s": lambda: deep_body(url),
                     "subnormal temperature and top_p": lambda: sampling(url, base),
                     "long name, NUL and looping paths, hostile folders": lambda: names_paths_and_folders(url, root)}
            results["cases"] = {}
            for name, case in cases.items():
                rss, mark = process.memory_info().rss, time.perf_counter()
                answer = case()
                grown = (process.memory_info().rss - rss) / 2**20
                row = {"answer": answer, **probe.window(mark), "rss_change_mb": grown}
                results["cases"][name] = row
                print(f"{name}: {answer}\n    /health p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                      f"max {row['max_ms']:.1f} ms ({row['max_at_s']:.1f} s in) over {row['samples']} asks, "
                      f"not 200: {row['not_200'] or 'none'}; "
                      f"server memory {row['rss_change_mb']:+.1f} MiB", flush=True)
            probe.stop.set()
        finally:
            server.terminate()
            server.wait(60)
    refused = empty_key(args)
    results["cases"]["--api-key '' at start-up"] = {"answer": refused}
    print(f"--api-key '' at start-up: {refused}")
    write_json(args.json, results)


def _up(url: str) -> bool:
    try:
        return request(url + "/health", timeout=5) == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
