"""``prefixtune serve --ray``: two local Ray Serve replicas behind the same API, routed by prefix
name; outputs, streaming and errors exactly as on one server. Slow: Ray takes tens of seconds to
start its cluster and replicas."""

import argparse
import json
import shutil
import urllib.request

import openai
import pytest
import torch
from tiny import tiny_model_folder

from prefixtune import PrefixConfig, PrefixModel, artifacts, options
from prefixtune.base_models import load_model
from prefixtune.serve import cli, setup
from prefixtune.serve.background import BackgroundServer

pytestmark = pytest.mark.slow
NAMES = ["p0", "p1", "p2", "p3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    tiny_model_folder(root / "model")
    model, _ = load_model(str(root / "model"))
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=2 + i, reparameterize=False, init_std=2.0))
        pm.save_prefix(root / "lib" / name)
        model = pm.unwrap()
    torch.manual_seed(9)
    PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparameterize=False)).save_prefix(root / "lib" / "solo")
    shutil.copytree(root / "lib" / "p0", root / "lib" / "broken")
    (root / "lib" / "broken" / artifacts.WEIGHTS_FILE).write_bytes(b"not safetensors")
    shutil.copytree(root / "lib" / "p0", root / "lib" / "deep")
    (root / "lib" / "deep" / artifacts.CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    return root


def config(folders, *extra):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--model", str(folders / "model"), "--device", "cpu", "--served-model-name", "base",
            "--prefix-dir", str(folders / "lib"), "--max-tokens", "32", "--api-key", "k", *extra]
    return options.build(setup.ServeConfig, parser.parse_args(argv))


@pytest.fixture(scope="module")
def ray_server(folders):
    ray = pytest.importorskip("ray")
    from ray import serve

    from prefixtune.serve import ray_serve

    app = ray_serve.build_front(config(folders, "--ray", "--replicas", "2"))
    try:
        with BackgroundServer(app) as running:
            yield running
    finally:
        serve.shutdown()
        ray.shutdown()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=120)


def texts(server, jobs):
    c = client(server)
    return [c.completions.create(model=m, prompt=p, max_tokens=12, temperature=0).choices[0].text for m, p in jobs]


JOBS = [(NAMES[i % 4] if i % 5 else "base", f"prompt {i}") for i in range(10)]


def test_two_replicas_answer_exactly_as_one_server(ray_server, folders):
    with BackgroundServer(setup.build_app(config(folders))) as local:
        expected = texts(local, JOBS)
        assert [m.id for m in client(local).models.list().data] == [m.id for m in client(ray_server).models.list().data]
    assert texts(ray_server, JOBS) == expected
    stream = client(ray_server).completions.create(model="p2", prompt=JOBS[2][1], max_tokens=12, temperature=0,
                                                   stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected[2]


def test_requests_are_routed_to_replicas_that_hold_their_prefix(ray_server):
    """A fresh prefix's first request loads it on one replica; once Ray Serve has heard which (a
    replica reports the prefixes it holds to the routers, which takes a moment), the next eleven
    requests all go there (at random, all eleven would land on it with probability 1 / 2**11)."""
    import time

    def send(i):
        body = json.dumps({"model": "solo", "prompt": f"warm {i}", "max_tokens": 2}).encode()
        request = urllib.request.Request(ray_server.url + "/v1/completions", body,
                                         {"Content-Type": "application/json", "Authorization": "Bearer k"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.headers["X-Prefix-Cache"]

    caches = [send(0)]
    time.sleep(10)
    caches += [send(i) for i in range(1, 12)]
    assert caches == ["miss"] + ["hit"] * 11
    text = urllib.request.urlopen(ray_server.url + "/metrics").read().decode()
    routed = [line for line in text.splitlines() if line.startswith("prefixtune_routed_requests_total")]
    assert sum(float(line.split()[-1]) for line in routed if 'result="hit"' in line) >= 11, routed
    assert 'prefixtune_prefix_cache_lookups_total{result="miss"}' in text


def test_errors_are_those_of_one_server(ray_server):
    c = client(ray_server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        c.completions.create(model="broken", prompt="x", max_tokens=2)
    assert "broken" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError) as err:  # not a 503 carrying the actor's traceback
        c.completions.create(model="deep", prompt="x", max_tokens=2)
    message = err.value.body["message"]
    assert "deep" in message and not any(leak in message for leak in ("pid=", "\x1b[", "Traceback", "ActorID")), message
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="p0", prompt="x", max_tokens=10_000)
    bad = openai.OpenAI(base_url=ray_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert c.completions.create(model="p0", prompt="still serving", max_tokens=2).choices[0].text is not None


def test_the_command_a_user_types_serves_and_stops(folders, until):
    """``prefixtune serve --ray --replicas 2 ...`` as a process: it comes up, serves a prefix from
    --prefix-dir, and exits cleanly (Ray with it) on Ctrl-C."""
    from launched import served

    pytest.importorskip("ray")
    argv = ["--ray", "--replicas", "2", "--model", str(folders / "model"), "--device", "cpu", "--prefix-dir",
            str(folders / "lib"), "--log-level", "warning"]
    with served(argv, until) as server:
        body, headers = server.complete("p1", "hi", 3)
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and headers["X-Prefix-Cache"] == "miss"
    assert server.code == 0, server.output
