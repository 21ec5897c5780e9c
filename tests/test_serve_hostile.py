"""The server against a hostile client, one test per defect a probe found: each sends
exactly the input the probe sent and checks the answer is a 4xx naming the problem (or the
documented behaviour), with no internals, while ``/health`` keeps answering."""

import json
import os
import socket
import threading
import time

import psutil
import pytest
import test_serve_api
from test_serve_api import ADMIN, BASE, KEY, assert_error, build, http

from prefixtune import artifacts
from prefixtune.cli import main
from prefixtune.serve import app as serve_app
from prefixtune.serve.background import BackgroundServer

folders = test_serve_api.folders  # the tiny model and its prefixes (a fixture)
HEALTH_BOUND_S = 2.0  # generous: the 100 ms is measured by a script on an idle server, not here


@pytest.fixture(scope="module")
def hostile(folders, tmp_path_factory):
    """A --prefix-dir of folders a hostile writer could leave: names outside the rule, files linked
    from outside, a config nested 100,000 deep, one declaring 10**30 positions, a 1 GiB sparse one."""
    root = tmp_path_factory.mktemp("hostile")
    outside = tmp_path_factory.mktemp("outside")
    gamma = folders / "gamma"
    for name in ("ok", "sp ace", "ünï", "x" * 200, "link-weights", "link-config", "deep", "huge-length", "sparse"):
        (root / name).mkdir()
        for file in (artifacts.CONFIG_FILE, artifacts.WEIGHTS_FILE):
            (root / name / file).write_bytes((gamma / file).read_bytes())
    for name, file in (("link-weights", artifacts.WEIGHTS_FILE), ("link-config", artifacts.CONFIG_FILE)):
        (outside / file).write_bytes((gamma / file).read_bytes())
        (root / name / file).unlink()
        (root / name / file).symlink_to(outside / file)
    (root / "deep" / artifacts.CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    meta = json.loads((gamma / artifacts.CONFIG_FILE).read_text())
    meta["prefix"]["prefix_length"] = 10**30
    (root / "huge-length" / artifacts.CONFIG_FILE).write_text(json.dumps(meta))
    with open(root / "sparse" / artifacts.CONFIG_FILE, "r+b") as f:
        f.truncate(1 << 30)
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def server(folders, hostile):
    with BackgroundServer(build(folders, "--prefix-dir", str(hostile))) as running:
        yield running


@pytest.fixture(scope="module")
def keyless(folders, hostile):
    with BackgroundServer(build(folders, "--prefix-dir", str(hostile), api_key=None)) as running:
        yield running


def no_internals(message: str) -> None:
    for leak in ("Traceback", "frame #", "c10::", "\x1b[", "pid=", ".cpp"):
        assert leak not in message, message


def complete(server, model, key=KEY, **body):
    return http(server, "POST", "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2, **body}, key=key)


# ------------------------------------------------------------------ 1. an empty key is no key
@pytest.mark.parametrize("argv, env, named", [
    (["--api-key", ""], {}, "--api-key"),
    (["--api-key", "   "], {}, "--api-key"),
    (["--admin-key", ""], {}, "--admin-key"),
    ([], {"PREFIXTUNE_API_KEY": ""}, "$PREFIXTUNE_API_KEY"),
    ([], {"PREFIXTUNE_ADMIN_KEY": " "}, "$PREFIXTUNE_ADMIN_KEY"),
    (["--api-key", "same", "--admin-key", "same"], {}, "--admin-key"),
], ids=["empty-flag", "blank-flag", "empty-admin", "empty-env", "blank-admin-env", "admin-is-inference"])
def test_an_empty_blank_or_shared_key_is_refused_at_start_up_naming_its_source(folders, argv, env, named, capsys,
                                                                              monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert main(["serve", "--model", str(folders / "model"), *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert time.monotonic() - start < 30  # refused before the model loads


def test_an_empty_bearer_token_is_a_401(server):
    for header in ("Bearer", "Bearer ", "Bearer  "):
        assert_error(http(server, "GET", "/v1/models", key=None, headers={"Authorization": header}), 401)


def test_the_python_api_refuses_an_empty_key_too(server):
    backend = server.app.state.backend
    for keys, admin in (((" ",), None), ((), ""), (("k",), "k")):
        with pytest.raises(ValueError):
            serve_app.create_app(backend, api_keys=keys, admin_key=admin)


# ------------------------------------------------------------------ 2. every file inside the root
@pytest.mark.parametrize("name", ["link-weights", "link-config"])
def test_a_prefix_file_linked_from_outside_the_prefix_dir_is_refused(server, hostile, name):
    status, body = complete(server, name)
    assert_error((status, body), 403, param="model", code="path_not_allowed")
    assert_error(http(server, "POST", "/v1/prefixes/linked", {"path": str(hostile / name)}, key=ADMIN), 403,
                 param="path", code="path_not_allowed")


# ------------------------------------------------------------------ 3. the name rule, on lookup too
@pytest.mark.parametrize("name", ["sp ace", "ünï", "x" * 200, "x" * 256])
def test_a_name_outside_the_rule_is_neither_listed_nor_served(server, name):
    assert name not in [m["id"] for m in http(server, "GET", "/v1/models")[1]["data"]]
    status, body = complete(server, name)
    assert_error((status, body), 404, param="model", code="model_not_found")
    assert "alpha" not in body["error"]["message"], "a 404 names only the model asked for"


def test_the_admin_route_refuses_a_name_with_a_trailing_newline(server, hostile):
    status, body = http(server, "POST", "/v1/prefixes/okname%0A", {"path": str(hostile / "ok")}, key=ADMIN)
    assert_error((status, body), 400, param="name", code="invalid_name")


# ------------------------------------------------------------------ 4. a keyless server and web pages
def test_a_keyless_server_takes_json_bodies_only(keyless):
    body = json.dumps({"model": BASE, "prompt": "Hi", "max_tokens": 2}).encode()
    for media in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, answer = http(keyless, "POST", "/v1/completions", raw=body, key=None, headers={"Content-Type": media})
        assert_error((status, answer), 415, code="unsupported_media_type")
    assert http(keyless, "POST", "/v1/completions", raw=body, key=None)[0] == 200


def test_a_keyless_server_answers_only_to_its_own_address(keyless, server):
    port = keyless.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", ""):
        status, answer = http(keyless, "GET", "/v1/models", key=None, headers={"Host": host})
        assert_error((status, answer), 421, code="misdirected_request")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert http(keyless, "GET", "/v1/models", key=None, headers={"Host": host})[0] == 200, host
    assert http(server, "GET", "/v1/models", headers={"Host": "evil.example"})[0] == 200  # a key guards it


def test_the_host_rule():
    assert serve_app.allowed_host("127.0.0.1:8000", "127.0.0.1") and serve_app.allowed_host("[::1]:80", "127.0.0.1")
    assert serve_app.allowed_host("10.1.2.3:8000", "0.0.0.0") and serve_app.allowed_host("[fe80::1]", "::")
    assert serve_app.allowed_host("myhost:8000", "myhost")
    assert not serve_app.allowed_host("10.1.2.3", "127.0.0.1")
    assert not serve_app.allowed_host("attacker.example", "0.0.0.0")
    assert not serve_app.allowed_host("a:b:c", "127.0.0.1")


# ------------------------------------------------------------------ 5. headers, idle and half-open connections
@pytest.fixture(scope="module")
def tight(folders):
    """A server whose connection bounds are short enough to watch them act."""
    argv = ("--header-timeout", "1", "--keep-alive-timeout", "1")
    with BackgroundServer(build(folders, *argv, api_key=None, admin_key=None)) as running:
        yield running


class HealthWatch:
    """Asks ``/health`` every 50 ms from its own thread; ``worst`` is the slowest answer."""

    def __init__(self, server):
        self.server, self.worst, self.failures = server, 0.0, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.done.is_set():
            start = time.monotonic()
            status, _ = http(self.server, "GET", "/health", key=None)
            self.worst = max(self.worst, time.monotonic() - start)
            if status != 200:
                self.failures.append(status)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(30)
        assert not self.failures and self.worst < HEALTH_BOUND_S, (self.failures, self.worst)


def address(server):
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def closed_by_server(sock, timeout=15.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return False
    return True


def test_headers_over_the_bound_get_a_431(tight):
    """Over the default 16 KiB, whether the headers arrive at once or piece by piece."""
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n"
    for pieces in ([head], [head[i:i + 1000] for i in range(0, len(head), 1000)]):
        with socket.create_connection(address(tight)) as sock:
            try:
                for piece in pieces:
                    sock.sendall(piece)
                    time.sleep(0.001)
            except BrokenPipeError:  # answered and closed before the rest was sent
                pass
            sock.settimeout(15)
            assert sock.recv(4096).startswith(b"HTTP/1.1 431")


def test_a_60_mb_header_is_cut_off_at_the_bound_and_health_never_waits(tight):
    rss = psutil.Process().memory_info().rss
    sent = 0
    with HealthWatch(tight), socket.create_connection(address(tight)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        try:
            while sent < 60 << 20:
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < 60 << 20, "the server read the whole 60 MB header"
    assert psutil.Process().memory_info().rss - rss < 64 << 20


def test_idle_and_half_sent_connections_are_closed_after_the_header_timeout(tight):
    """1,000 connections that send nothing and 200 that send half their headers: all closed within
    a few seconds of --header-timeout, and /health answers throughout."""
    with HealthWatch(tight):
        idle = [socket.create_connection(address(tight)) for _ in range(1000)]
        half = [socket.create_connection(address(tight)) for _ in range(200)]
        for sock in half:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Half: ")
        try:
            assert all(closed_by_server(sock) for sock in idle + half)
        finally:
            for sock in idle + half:
                sock.close()


def test_a_connection_idle_after_a_response_is_closed_after_the_keep_alive_timeout(tight):
    with socket.create_connection(address(tight)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(15)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert closed_by_server(sock) and time.monotonic() - start < 10


def test_beyond_max_connections_every_request_gets_a_503(folders):
    with BackgroundServer(build(folders, "--max-connections", "4", api_key=None, admin_key=None)) as running:
        held = [socket.create_connection(address(running)) for _ in range(4)]
        try:
            time.sleep(0.5)  # the server has accepted them
            assert http(running, "GET", "/health", key=None)[0] == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
        assert http(running, "GET", "/health", key=None)[0] == 200


# ------------------------------------------------------------------ 6. bodies: linear, off the event loop, shallow
def test_a_body_of_971_nested_objects_with_long_keys_is_refused_without_growing_the_server(tight):
    key = "k" * 1021
    raw = ('{"model": "%s", "prompt": "x", "m": ' % BASE + ('{"%s": ' % key) * 971 + "1" + "}" * 971 + "}").encode()
    assert 990_000 < len(raw) < 1 << 20
    rss = psutil.Process().memory_info().rss
    with HealthWatch(tight):
        for _ in range(5):
            status, body = http(tight, "POST", "/v1/completions", raw=raw, key=None)
            assert_error((status, body), 400, code="too_deep")
    assert psutil.Process().memory_info().rss - rss < 64 << 20


def test_a_wide_body_within_the_size_limit_is_answered_and_health_never_waits(tight):
    raw = json.dumps({"model": BASE, "prompt": "x", "max_tokens": 1, "metadata": {"w": [0] * 300_000}}).encode()
    with HealthWatch(tight):
        assert http(tight, "POST", "/v1/completions", raw=raw, key=None)[0] == 200


# ------------------------------------------------------------------ 7. bodies and folders that answered 500
@pytest.mark.parametrize("field, value", [("temperature", 1e-40), ("temperature", 5e-324), ("top_p", 1e-46),
                                          ("top_p", 5e-324)])
def test_subnormal_temperature_or_top_p_samples(server, field, value):
    status, body = complete(server, "alpha", **{field: value})
    assert status == 200, body


@pytest.mark.parametrize("path", ["\u0000", "/tmp/\u0000x"])
def test_an_admin_path_with_a_nul_is_a_400(server, path):
    assert_error(http(server, "POST", "/v1/prefixes/p", {"path": path}, key=ADMIN), 400, param="path")


def test_an_admin_path_through_a_symlink_loop_is_a_400(server, hostile):
    status, body = http(server, "POST", "/v1/prefixes/p", {"path": str(hostile / "loop" / "x")}, key=ADMIN)
    assert_error((status, body), 400, param="path")
    no_internals(body["error"]["message"])


def test_a_config_nested_100000_deep_is_a_422_and_its_admin_load_a_400(server, hostile):
    status, body = complete(server, "deep")
    assert_error((status, body), 422, param="model", code="prefix_unloadable")
    assert "deep" in body["error"]["message"]
    no_internals(body["error"]["message"])
    assert_error(http(server, "POST", "/v1/prefixes/p", {"path": str(hostile / "deep")}, key=ADMIN), 400,
                 param="path", code="prefix_unloadable")


def test_a_prefix_length_of_10_to_the_30_is_a_422_without_internals(server):
    status, body = complete(server, "huge-length")
    assert_error((status, body), 422, param="model", code="prefix_unloadable")
    assert "prefix_length" in body["error"]["message"]
    no_internals(body["error"]["message"])


# ------------------------------------------------------------------ 8. an oversized config is never read
def test_a_1_gib_sparse_config_is_refused_unread_and_its_failure_remembered(server, hostile):
    store = server.app.state.backend.store
    calls = []
    loader = store.loader
    store.loader = lambda folder: calls.append(folder) or loader(folder)
    try:
        rss = psutil.Process().memory_info().rss
        for _ in range(3):
            status, body = complete(server, "sparse")
            assert_error((status, body), 422, code="prefix_unloadable")
            assert "over 65536 bytes" in body["error"]["message"]
        assert psutil.Process().memory_info().rss - rss < 64 << 20
        assert len(calls) == 1, "a folder's failure is remembered until its files change"
        os.utime(hostile / "sparse" / artifacts.CONFIG_FILE, ns=(1, 1))
        complete(server, "sparse")
        assert len(calls) == 2
    finally:
        store.loader = loader


def test_a_replica_that_fails_reaches_the_client_as_a_503_without_its_traceback():
    """On Ray, a replica's exception arrives as a remote traceback (pid, IP, actor id, ANSI colours):
    the front logs it and tells the client only that the replica failed."""
    import asyncio
    from concurrent.futures import Future
    from types import SimpleNamespace

    from prefixtune.serve.limits import Limits
    from prefixtune.serve.prometheus import Metrics
    from prefixtune.serve.ray_serve import RayBackend

    class Failing:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise RuntimeError("Traceback (most recent call last):\n\x1b[36m(PrefixReplica pid=4242, ip=10.0.0.7, "
                               "actor_id=abc)\x1b[0m RecursionError")

    handle = SimpleNamespace(options=lambda **_: SimpleNamespace(generate=SimpleNamespace(remote=lambda _: Failing())))
    cfg = SimpleNamespace(limits=Limits(), prefix_dir=())
    backend = RayBackend(handle, None, {"base": BASE, "context_length": 64}, cfg, [], Metrics())

    async def submit() -> Future:
        queued = backend.submit([SimpleNamespace(model=BASE, prompt_ids=[1], params=None, cancelled=False)])
        while not queued.done():
            await asyncio.sleep(0.01)
        return queued

    error = asyncio.run(submit()).exception()
    assert error.status == 503
    no_internals(error.message)
    assert "4242" not in error.message and "10.0.0.7" not in error.message
