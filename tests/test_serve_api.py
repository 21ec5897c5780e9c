"""The HTTP server, driven by the official ``openai`` client: completions, chat, streaming,
models, prefix management, every error case, metrics, a load test, and the playground in a browser."""

import argparse
import concurrent.futures
import gc
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
from tiny import tiny_model_folder

from prefixtune import PrefixConfig, PrefixModel, options
from prefixtune.base_models import load_model
from prefixtune.serve import cli, setup
from prefixtune.serve.background import BackgroundServer

KEY = "test-key"
ADMIN = "admin-key"
BASE = "tiny-base"
PREFIXES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama with the bundled tokenizer, and three saved prefixes for it."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model_folder(root / "model")
    model, _ = load_model(str(model_dir))
    pm = PrefixModel(model)
    for i, name in enumerate(PREFIXES):
        pm.add_prefix(name, PrefixConfig(prefix_length=2 + i, reparameterize=i == 1, init_std=3.0))
        if i == 1:
            pm.prefixes[name].embedding.weight.data.normal_(0, 3.0)
        pm.save_prefix(root / name, name=name, keep_reparam=True)
    shutil.copytree(root / "gamma", root / "library" / "nested" / "gamma")  # inside --prefix-dir, not listed
    return root


def build(folders, *extra, prefixes=PREFIXES[:2], api_key=KEY, admin_key=ADMIN):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--model", str(folders / "model"), "--served-model-name", BASE, "--device", "cpu",
            "--max-tokens", "64", "--max-prompt-tokens", "100", "--prefix-dir", str(folders / "library"), *extra]
    for name in prefixes:
        argv += ["--prefix", f"{name}={folders / name}"]
    argv += ["--api-key", api_key] if api_key else []
    argv += ["--admin-key", admin_key] if admin_key else []
    return setup.build_app(options.build(setup.ServeConfig, parser.parse_args(argv)))


@pytest.fixture(scope="module")
def server(folders):
    with BackgroundServer(build(folders)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def http(server, method, path, body=None, key=KEY, raw=None, headers=None):
    """``(status, parsed JSON or text)`` of one request, without the openai client."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def hold(batcher):
    """Stop the batcher in its next forward pass; ``(entered, release)``: an event set once it is
    stopped, and the call that lets it go on."""
    entered, gate = threading.Event(), threading.Event()

    def pause(module, args):
        entered.set()
        gate.wait(60)

    handle = batcher.model.model.register_forward_pre_hook(pause)

    def release():
        handle.remove()
        gate.set()

    return entered, release


def assert_error(result, status, param=None, code=None):
    got, body = result
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


# ------------------------------------------------------------------ API
def test_models_lists_the_base_and_every_prefix(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, *PREFIXES[:2]]
    assert client.models.retrieve("alpha").parent == BASE


def test_completion_and_chat(client):
    out = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "alpha"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens > 10  # the chat template's own tokens are there


def test_prefixes_change_the_output(client):
    texts = {m: client.completions.create(model=m, prompt="The weather", max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
             for m in (BASE, "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts


def test_streaming_equals_the_whole_answer(client):
    for kind in ("completion", "chat"):
        kw = dict(max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        if kind == "chat":
            call, kw["messages"] = client.chat.completions.create, [{"role": "user", "content": "Tell me"}]
        else:
            call, kw["prompt"] = client.completions.create, "Tell me"
        whole = call(model="alpha", **kw).choices[0]
        chunks = list(call(model="alpha", stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
        pieces = [c.choices[0] for c in chunks if c.choices]
        if kind == "chat":
            assert pieces[0].delta.role == "assistant"
            assert "".join(p.delta.content or "" for p in pieces) == whole.message.content
        else:
            assert "".join(p.text for p in pieces) == whole.text
        assert pieces[-1].finish_reason == whole.finish_reason == "length"


def test_n_choices_seed_and_echo(client):
    out = client.completions.create(model="alpha", prompt="A", max_tokens=6, temperature=1.0, seed=3, n=3,
                                    echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text.startswith("A") for c in out.choices)
    again = client.completions.create(model="alpha", prompt="A", max_tokens=6, temperature=1.0, seed=3, n=3,
                                      echo=True)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_concurrent_mixed_prefix_requests_equal_one_at_a_time_over_http(client):
    jobs = [(m, f"Request {i} about {m}", 6 + 3 * i) for i, m in enumerate([BASE, "alpha", "beta", "alpha", "beta",
                                                                          BASE, "alpha", "beta"])]

    def one(job):
        model, prompt, n = job
        out = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text, out.choices[0].finish_reason

    alone = [one(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    assert together == alone


# --------------------------------------------------------------- errors
def test_missing_or_wrong_key_is_401(server):
    assert_error(http(server, "GET", "/v1/models", key=None), 401, code="invalid_api_key")
    assert_error(http(server, "POST", "/v1/completions", {"model": BASE, "prompt": "x"}, key="wrong"), 401)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=BASE, prompt="x", max_tokens=2)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert_error(http(server, "GET", "/v1/models/nope"), 404)
    assert_error(http(server, "GET", "/v1/nothing-here"), 404)


def test_malformed_json_and_bad_fields_are_400(client, server):
    truncated = b'{"model": "alpha", "prompt": '
    assert_error(http(server, "POST", "/v1/completions", raw=truncated), 400, code="invalid_json")
    assert_error(http(server, "POST", "/v1/chat/completions", raw=b"[1, 2]"), 400, code="invalid_json")
    cases = [
        ({"prompt": "x"}, "model"),
        ({"model": "alpha"}, "prompt"),
        ({"model": "alpha", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "alpha", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "alpha", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "alpha", "prompt": "x", "n": 99}, "n"),
        ({"model": "alpha", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "alpha", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "alpha", "prompt": [10**9]}, "prompt"),
    ]
    for body, param in cases:
        assert_error(http(server, "POST", "/v1/completions", body), 400, param=param)
    assert_error(http(server, "POST", "/v1/chat/completions", {"model": "alpha", "messages": []}), 400,
                 param="messages")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": 5}])


def test_limits_on_max_tokens_and_prompt_length(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="x", max_tokens=65)
    assert err.value.body["param"] == "max_tokens"
    assert_error(http(server, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 0}), 400)
    long_prompt = " word" * 200
    assert_error(http(server, "POST", "/v1/completions", {"model": "alpha", "prompt": long_prompt}), 413,
                 param="prompt", code="prompt_too_long")
    assert_error(http(server, "POST", "/v1/chat/completions",
                      {"model": "alpha", "messages": [{"role": "user", "content": long_prompt}]}), 413)
    # a body declared larger than 1 MiB is refused before it is read
    assert_error(http(server, "POST", "/v1/completions", raw=b"{}", headers={"Content-Length": str(2 << 20)}), 413,
                 code="body_too_large")


def test_bad_requests_never_disturb_the_others(client, server):
    good = dict(model="beta", prompt="Steady", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**good).choices[0].text
    bad = [{"model": "nope", "prompt": "x"}, {"model": "alpha", "prompt": "x", "max_tokens": 10**6}, None]

    def send_bad(i):
        if bad[i % 3] is None:
            return http(server, "POST", "/v1/completions", raw=b"{oops")[0]
        return http(server, "POST", "/v1/completions", bad[i % 3])[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(lambda: client.completions.create(**good).choices[0].text) for _ in range(4)]
        statuses = list(pool.map(send_bad, range(12)))
        assert [g.result() for g in goods] == [expected] * 4
    assert set(statuses) == {400, 404}


def test_full_queue_is_429_and_every_queued_request_is_answered(folders, until):
    with BackgroundServer(build(folders, "--max-queue", "3", "--max-batch", "1")) as running:
        batcher = running.app.state.backend
        entered, release = hold(batcher)  # the one row's prefill stops: nothing drains the queue now
        body = {"model": "alpha", "prompt": "x", "max_tokens": 3}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            sent = [pool.submit(http, running, "POST", "/v1/completions", body)]
            assert entered.wait(30)
            sent += [pool.submit(http, running, "POST", "/v1/completions", body) for _ in range(3)]
            assert until(lambda: batcher.queue_depth() == 3)
            assert_error(http(running, "POST", "/v1/completions", body), 429, code="queue_full")
            release()
            assert [q.result()[0] for q in sent] == [200, 200, 200, 200]


def test_a_client_that_hangs_up_frees_its_rows(server, until):
    import socket

    batcher = server.app.state.backend
    host, port = server.url.removeprefix("http://").split(":")
    for stream in (False, True):
        body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 64, "stream": stream,
                           "ignore_eos": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            assert until(lambda: batcher.active_rows() == 1)
            entered, release = hold(batcher)
            assert entered.wait(30)
            (request,) = batcher.running()
        assert until(lambda: request.cancelled), stream  # the hang-up is noticed while the loop is held
        release()
        assert until(lambda: batcher.active_rows() == 0)
        assert request.generated < 64, (stream, request.generated)


# ------------------------------------------------------ prefix management
def test_prefixes_are_added_and_removed_at_run_time(client, server, folders):
    inside = str(folders / "library" / "nested" / "gamma")
    assert_error(http(server, "POST", "/v1/prefixes/gamma", {"path": inside}, key=None), 401)
    assert_error(http(server, "POST", "/v1/prefixes/gamma", {"path": inside}), 403, code="admin_only")  # inference key
    assert_error(http(server, "DELETE", "/v1/prefixes/alpha"), 403, code="admin_only")
    assert_error(http(server, "POST", "/v1/prefixes/gamma", {"path": str(folders / "library" / "missing")}, key=ADMIN),
                 400, param="path")
    assert_error(http(server, "POST", "/v1/prefixes/gamma", raw=b"{", key=ADMIN), 400)
    status, body = http(server, "POST", "/v1/prefixes/gamma", {"path": inside}, key=ADMIN)
    assert status == 200 and body["id"] == "gamma" and body["prefix_length"] == 4 and body["kind"] == "kv"
    assert "gamma" in [m.id for m in client.models.list().data]
    assert client.completions.create(model="gamma", prompt="Hi", max_tokens=3).choices[0].finish_reason
    status, body = http(server, "DELETE", "/v1/prefixes/gamma", key=ADMIN)
    assert status == 200 and body["deleted"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="Hi", max_tokens=3)
    assert_error(http(server, "DELETE", "/v1/prefixes/gamma", key=ADMIN), 404)


def test_admin_loads_read_only_inside_a_prefix_dir(server, folders, tmp_path):
    """The path rule: after symlinks and ``..``, the folder must lie inside a --prefix-dir."""
    library = folders / "library"
    escape = library / "escape"
    if not escape.exists():
        escape.symlink_to(folders / "gamma", target_is_directory=True)  # a link inside, pointing out
    for path in [folders / "gamma", library / ".." / "gamma", escape, "/etc", tmp_path]:
        status, body = http(server, "POST", "/v1/prefixes/gamma", {"path": str(path)}, key=ADMIN)
        assert_error((status, body), 403, param="path", code="path_not_allowed")
        assert "--prefix-dir" in body["error"]["message"], path
    status, _ = http(server, "POST", "/v1/prefixes/gamma2", {"path": str(library / "nested" / ".." / "nested" /
                                                                        "gamma")}, key=ADMIN)
    assert status == 200  # ".." that stays inside is fine
    assert http(server, "DELETE", "/v1/prefixes/gamma2", key=ADMIN)[0] == 200


def test_without_keys_the_api_is_open_and_prefix_management_is_off(folders):
    with BackgroundServer(build(folders, prefixes=(), api_key=None, admin_key=None)) as running:
        open_client = openai.OpenAI(base_url=running.url + "/v1", api_key="anything", max_retries=0)
        assert [m.id for m in open_client.models.list().data] == [BASE]
        inside = str(folders / "library" / "nested" / "gamma")
        assert_error(http(running, "POST", "/v1/prefixes/alpha", {"path": inside}, key=None), 403,
                     code="admin_disabled")


def test_inference_keys_from_options_and_a_file(folders, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one per line\nfile-key-1\n\n  file-key-2  \n")
    with BackgroundServer(build(folders, "--api-key-file", str(keys), api_key="opt-key")) as running:
        for key in ("opt-key", "file-key-1", "file-key-2", ADMIN):
            assert http(running, "GET", "/v1/models", key=key)[0] == 200, key
        for key in (None, "# one per line", "wrong"):
            assert_error(http(running, "GET", "/v1/models", key=key), 401)


def test_binds_to_loopback_unless_told_otherwise():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert options.build(setup.ServeConfig, parser.parse_args([])).host == "127.0.0.1"


def test_command_line_refuses_bad_prefix_options(folders, capsys):
    from prefixtune.cli import main

    assert main(["serve", "--model", str(folders / "model"), "--prefix", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", str(folders / "model"), "--prefix", f"x={folders / 'missing'}"]) == 2
    capsys.readouterr()
    for argv, named in ((["--prefix-dir", str(folders / "missing")], "--prefix-dir"),
                        (["--api-key-file", str(folders / "missing")], "--api-key-file"),
                        (["--replicas", "2"], "--ray")):
        assert main(["serve", "--model", str(folders / "model"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------- health, metrics, load
def test_health_and_metrics(client, server):
    client.completions.create(model="alpha", prompt="count me", max_tokens=4)
    status, body = http(server, "GET", "/health", key=None)
    assert (status, body) == (200, {"status": "ok"}), "without the key: up or not, nothing about what is served"
    status, body = http(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["models"] == [BASE, *PREFIXES[:2]]
    status, text = http(server, "GET", "/metrics", key=None)
    assert status == 200
    for name in ("prefixtune_requests_total", "prefixtune_generation_tokens_total",
                 "prefixtune_generation_tokens_per_second", "prefixtune_batch_size_bucket", "prefixtune_queue_depth"):
        assert f"\n{name}" in text or text.startswith(name) or f"{name}{{" in text, name
    assert 'prefixtune_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_openapi_json_describes_the_request_bodies_without_a_key(server):
    status, spec = http(server, "GET", "/openapi.json", key=None)
    assert status == 200 and set(spec["paths"]) >= {"/v1/completions", "/v1/chat/completions"}
    assert spec["components"]["schemas"]["ChatRequest"]["properties"]["messages"]["minItems"] == 1


def test_load_every_request_answered_and_no_memory_growth(client, server):
    """300 bounded requests from 16 threads on loopback; all answered, memory flat."""
    batcher = server.app.state.backend
    models = [BASE, *PREFIXES[:2]]

    def one(i):
        kind = i % 3
        if kind == 2:
            out = client.chat.completions.create(model=models[i % 3], messages=[{"role": "user", "content": f"n{i}"}],
                                                 max_tokens=1 + i % 4, temperature=0.7, seed=i)
            return out.choices[0].finish_reason
        stream = kind == 1
        out = client.completions.create(model=models[i % 3], prompt=f"load {i}", max_tokens=1 + i % 4,
                                        temperature=0, stream=stream)
        return [c.choices[0].finish_reason for c in out if c.choices][-1] if stream else out.choices[0].finish_reason

    def rss():
        gc.collect()
        return psutil.Process().memory_info().rss

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(list(pool.map(one, range(40))))  # warm up: allocator pools, caches
        before = rss()
        reasons = list(pool.map(one, range(300)))
    after = rss()
    assert len(reasons) == 300 and set(reasons) <= {"stop", "length"}
    assert after - before < 64 << 20, (before, after)
    assert batcher.queue_depth() == 0 and batcher.active_rows() == 0 and batcher.cached_rows() == 0
    assert not batcher.held_prefixes()



# ------------------------------------------------------ hostile requests
def test_a_lone_surrogate_anywhere_is_a_400(client, server):
    for path, body in [("/v1/completions", {"model": "alpha", "prompt": "ok \ud800", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "alpha", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "\udfff"}]}),
                       ("/v1/completions", {"model": "alpha", "prompt": "ok", "stop": ["\ud83d"], "max_tokens": 2})]:
        status, answer = http(server, "POST", path, raw=json.dumps(body).encode())  # JSON escapes: \\ud800
        assert status == 400 and answer["error"]["code"] == "invalid_text", (path, answer)


def test_more_generations_than_the_queue_can_ever_hold_is_a_400_not_a_429(server):
    status, body = http(server, "POST", "/v1/completions", {"model": "alpha", "prompt": ["a"] * 200, "n": 2})
    assert status == 400 and body["error"]["code"] == "too_many_generations", body


def test_a_huge_batch_of_prompts_is_refused_before_tokenizing_and_never_stalls_health(server):
    body = json.dumps({"model": "alpha", "prompt": ["x"] * 200_000}).encode()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(http, server, "POST", "/v1/completions", None, KEY, body)
        start = time.monotonic()
        status, health = http(server, "GET", "/health")
        assert status == 200 and time.monotonic() - start < 2.0
        status, answer = big.result(timeout=60)
    assert status in (400, 413), answer


def test_a_client_that_stops_mid_body_gets_a_408_and_leaves_no_traceback(folders, caplog):
    import socket

    with BackgroundServer(build(folders, "--body-timeout", "1", api_key=None)) as running:
        host, port = running.url.removeprefix("http://").split(":")
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n").encode()
        with socket.create_connection((host, int(port))) as sock, caplog.at_level("ERROR"):
            sock.sendall(head + b'{"model": "tiny-ba')  # ... and nothing more
            sock.settimeout(60)
            reply = sock.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "Traceback" not in caplog.text


# ------------------------------------------------------ the playground, in a browser
# The playground at ``/`` in headless Chromium (Debian's ``chromium``, driven by Playwright):
# a person picks prefixes, types one prompt, and gets each prefix's answer side by side.
CHROMIUM = os.environ.get("PREFIXTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")



def needs_chromium(test):
    """In the slow lane; skipped without Debian's chromium (apt-get install chromium; .ci/run does)."""
    return pytest.mark.slow(pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")(test))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the serve extra)")
    with sync_api.sync_playwright() as playwright:
        # root in a container has no user namespaces for Chromium's sandbox
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def running(folders):
    with BackgroundServer(build(folders)) as server:
        yield server


@needs_chromium
def test_playground_compares_prefixes_side_by_side(running, browser):
    page = browser.new_page()
    page.goto(running.url + "/")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")  # the model list needs the key
    page.wait_for_selector("#models input[value=beta]")
    boxes = page.locator("#models input")
    assert boxes.evaluate_all("bs => bs.map(b => b.value)") == [BASE, "alpha", "beta"]
    page.check("#models input[value=alpha]")
    page.check("#models input[value=beta]")
    page.uncheck(f"#models input[value='{BASE}']")
    page.fill("#prompt", "Write one line about the sea.")
    page.fill("#max_tokens", "10")
    page.fill("#temperature", "0")
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('.output[data-done]').length === 2", timeout=30_000)
    shown = {el.get_attribute("data-model"): el.locator(".text").inner_text()
             for el in page.locator(".output").all()}
    statuses = page.locator(".output .status").all_inner_texts()
    page.close()
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
    for model in ("alpha", "beta"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write one line about the sea."}],
            max_tokens=10, temperature=0)
        assert shown[model].strip() == answer.choices[0].message.content.strip()  # innerText trims
    assert all(s.startswith("done") for s in statuses), statuses
    assert shown["alpha"] != shown["beta"]


@needs_chromium
def test_playground_shows_errors(running, browser):
    page = browser.new_page()
    page.goto(running.url + "/")
    # no key typed yet: the 401 is shown where the models would be
    page.wait_for_function("document.getElementById('models').textContent.includes('cannot list models')")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector("#models input[value=alpha]")
    page.click("#compare")
    assert page.inner_text("#message") == "Type a prompt."
    page.close()


@pytest.mark.slow
def test_the_command_a_user_types_serves_a_prefix_and_stops_on_ctrl_c(folders, until):
    """``prefixtune serve --model M --prefix alpha=DIR --port P`` as a process, with the default device: it
    listens on the port it bound before loading the model, answers with the prefix, and exits 0 on Ctrl-C."""
    from launched import served

    with served(["--model", str(folders / "model"), "--prefix", f"alpha={folders / 'alpha'}"], until, 120) as server:
        body, _ = server.complete("alpha", "hi", 3)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.code == 0 and f"alpha on {server.url}" in server.output, server.output
