"""``prefixtune serve`` as a user starts it: a process of its own, on a free port, stopped with Ctrl-C."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Served:
    """A running ``prefixtune serve``: its URL, and (once stopped) its exit code and everything it printed."""

    url: str
    process: subprocess.Popen
    code: int | None = None
    output: str = ""

    def complete(self, model: str, prompt: str, max_tokens: int, timeout: float = 120):
        """POST /v1/completions; the response's JSON body and headers."""
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response), response.headers


@contextlib.contextmanager
def served(argv: list[str], until, timeout: float = 300):
    """Start ``prefixtune serve ARGV --port P`` (P a free port) and wait until /health answers; on leaving,
    send Ctrl-C and wait for it to exit, filling in ``code`` and ``output``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("prefixtune")), "serve", *argv, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Served(f"http://127.0.0.1:{port}", process)

    def up():
        try:
            return urllib.request.urlopen(server.url + "/health", timeout=5).status == 200
        except OSError:
            return process.poll() is not None  # stop waiting if it died

    try:
        assert until(up, timeout=timeout) and process.poll() is None, process.stdout.read() if process.poll() else ""
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            server.code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        server.output = process.stdout.read()
