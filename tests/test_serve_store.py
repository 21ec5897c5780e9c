"""The prefix store behind the server: lazy discovery of prefix folders, a device budget with
least-recently-used eviction that never takes a prefix from a live row, a host tier, one load
for concurrent cold requests, loading off the decoding loop, failures that stay with their own
requests, and outputs identical to a server that holds every prefix."""

import shutil
import threading
import time

import pytest
import torch
from tiny import CharTokenizer, Collector, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel, artifacts
from prefixtune.serve import Batcher, Limits
from prefixtune.serve.errors import APIError
from prefixtune.serve.store import PrefixStore

NAMES = [f"p{i}" for i in range(6)]
PROMPTS = [tokens(1, n, seed=n)[0].tolist() for n in (3, 8, 5, 11, 4, 6, 7, 9)]


def save(folder, seed, length=3):
    torch.manual_seed(seed)
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=length, reparameterize=False, init_std=2.0))
    pm.save_prefix(folder)
    return folder


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Six saved prefixes of the tiny Llama, one folder each, and the size of one."""
    root = tmp_path_factory.mktemp("library")
    for i, name in enumerate(NAMES):
        save(root / name, seed=10 + i)
    return root


def nbytes(length=3):
    shape = tiny_model("llama").config
    kv_heads, head_dim = shape.num_key_value_heads, shape.hidden_size // shape.num_attention_heads
    return shape.num_hidden_layers * 2 * kv_heads * length * head_dim * 4


def store_for(roots, budget=None, host=0, loader=None):
    shape = PrefixModel(tiny_model("llama")).shape
    loader = loader or (lambda folder: artifacts.load_key_values(folder, shape))
    return PrefixStore(loader, "cpu", roots, budget_bytes=budget, host_budget_bytes=host)


def serving(roots, budget=None, **limits):
    pm = PrefixModel(tiny_model("llama"))
    store = PrefixStore(lambda folder: artifacts.load_key_values(folder, pm.shape), "cpu", roots, budget_bytes=budget)
    return Batcher(pm, CharTokenizer(), "base", Limits(**{"max_batch": 8, "max_queue": 64, **limits}),
                   store=store).start()


# ------------------------------------------------------------ discovery
def test_folders_are_listed_without_loading_and_found_after_start(library, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(library, root)
    loads = []
    store = store_for([root], loader=lambda f: loads.append(f) or artifacts.load_key_values(
        f, PrefixModel(tiny_model("llama")).shape))
    (root / "not-a-prefix").mkdir()
    assert store.names() == NAMES and loads == []
    save(root / "late", seed=99)  # added while serving: no restart
    assert "late" in store.names()
    entry = store.acquire("late").result(timeout=30)
    assert entry.encoder is not None and len(loads) == 1
    store.release(entry)
    shutil.rmtree(root / "p0")  # removed: refused from now on
    with pytest.raises(APIError) as err:
        store.acquire("p0")
    assert err.value.status == 404 and "p0" not in store.names()
    for bad in ("..", ".", "not-a-prefix", "../root/p1", ""):
        with pytest.raises(APIError):
            store.acquire(bad)


def test_a_symlink_out_of_the_folder_is_neither_listed_nor_served(library, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside").symlink_to(library / "p1", target_is_directory=True)
    outside = save(tmp_path / "outside", seed=5)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    store = store_for([root, library])
    assert "escape" not in store.names()
    with pytest.raises(APIError) as err:
        store.acquire("escape")
    assert err.value.status == 404
    with pytest.raises(APIError) as err:
        store.check_folder(str(root / "escape"))
    assert err.value.status == 403 and err.value.code == "path_not_allowed"
    assert store.check_folder(str(root / "inside")) == (library / "p1").resolve()  # a link that stays inside


def test_a_folder_saved_again_is_served_fresh(library, tmp_path):
    root = tmp_path / "root"
    save(root / "x", seed=1)
    store = store_for([root])
    first = store.acquire("x").result(timeout=30)
    store.release(first)
    time.sleep(0.01)
    save(root / "x", seed=2, length=4)
    second = store.acquire("x").result(timeout=30)
    assert second is not first and second.encoder.config.prefix_length == 4
    store.release(second)
    assert store.stats.resident["device"] == nbytes(4)  # the old copy is gone


# ------------------------------------------------------------ budget
def test_eviction_is_least_recently_used_and_never_takes_a_held_prefix(library):
    store = store_for([library], budget=2 * nbytes())
    a = store.acquire("p0").result(timeout=30)
    b = store.acquire("p1").result(timeout=30)
    late = store.acquire("p2")  # both held: no room until one is released
    time.sleep(0.3)
    assert not late.done() and store.stats.resident["device"] == 2 * nbytes()
    store.release(b)
    c = late.result(timeout=30)
    assert b.encoder is None and a.encoder is not None, "the released one went, the held one stayed"
    assert store.stats.evictions["device"] == 1 and store.stats.resident["device"] <= 2 * nbytes()
    store.release(a)
    store.release(c)
    again = store.acquire("p2").result(timeout=30)  # still resident: a hit
    assert again is c and store.stats.hits == 1 and store.stats.misses == 3
    store.release(again)
    for name in NAMES:  # cycle through all: the budget holds at every step
        store.release(store.acquire(name).result(timeout=30))
        assert store.stats.resident["device"] <= 2 * nbytes()


def test_the_host_tier_keeps_evicted_prefixes_for_a_copy_back(library):
    store = store_for([library], budget=nbytes(), host=2 * nbytes())
    for name in ("p0", "p1", "p2"):
        store.release(store.acquire(name).result(timeout=30))
    assert store.stats.resident == {"device": nbytes(), "host": 2 * nbytes()}
    assert store.stats.evictions == {"device": 2}
    store.release(store.acquire("p1").result(timeout=30))  # from host memory, not the disk
    assert store.stats.host_hits == 1 and store.stats.misses == 3
    store.release(store.acquire("p3").result(timeout=30))  # host tier full: its oldest goes
    assert store.stats.evictions["host"] >= 1 and store.stats.resident["host"] <= 2 * nbytes()


def test_a_prefix_larger_than_the_whole_budget_is_refused(library):
    store = store_for([library], budget=nbytes() - 1)
    with pytest.raises(APIError) as err:
        store.acquire("p0").result(timeout=30)
    assert err.value.status == 507 and "--prefix-cache-mb" in err.value.message


def test_concurrent_requests_for_one_cold_prefix_load_it_once(library):
    calls, gate = [], threading.Event()
    shape = PrefixModel(tiny_model("llama")).shape

    def slow(folder):
        calls.append(folder)
        gate.wait(30)
        return artifacts.load_key_values(folder, shape)

    store = store_for([library], loader=slow)
    futures = [store.acquire("p3") for _ in range(8)]
    gate.set()
    entries = {id(f.result(timeout=30)) for f in futures}
    assert len(calls) == 1 and len(entries) == 1 and store.stats.misses == 1
    entry = futures[0].result()
    assert entry.pins == 8
    for _ in range(8):
        store.release(entry)
    assert store.held() == {}


# ------------------------------------------------------------ with the batcher
def _run_all(batcher, jobs, max_tokens=12):
    c = Collector(batcher)
    for i, (prompt, model) in enumerate(jobs):
        batcher.submit([c.request(i, prompt, model, max_tokens=max_tokens, ignore_eos=True)])
    c.wait(len(jobs))
    return c, [c.text(i) for i in range(len(jobs))]


def test_store_under_a_budget_gives_exactly_the_outputs_of_every_prefix_resident(library):
    jobs = [(PROMPTS[i % len(PROMPTS)], NAMES[(i * 7) % len(NAMES)]) for i in range(18)] + [(PROMPTS[0], "base")]
    resident = serving([library])
    try:
        _, expected = _run_all(resident, jobs)
    finally:
        resident.close()
    tight = serving([library], budget=3 * nbytes(), max_batch=3)
    try:
        c, got = _run_all(tight, jobs)
        stats = tight.store.stats
        assert got == expected
        assert stats.evictions["device"] > 0 and stats.resident["device"] <= 3 * nbytes()
        assert not tight.held_prefixes()
    finally:
        tight.close()


def test_eviction_while_a_row_decodes_leaves_the_row_its_prefix(library, until):
    alone = serving([library])
    try:
        _, (expected,) = _run_all(alone, [(PROMPTS[1], "p0")], max_tokens=60)
    finally:
        alone.close()
    batcher = serving([library], budget=2 * nbytes())
    try:
        c = Collector(batcher)
        batcher.submit([c.request("long", PROMPTS[1], "p0", max_tokens=60, ignore_eos=True)])
        assert until(lambda: c.events["long"])
        for i, name in enumerate(NAMES[1:] * 2):  # churn the one free slot while p0's row decodes
            batcher.submit([c.request(i, PROMPTS[2], name, max_tokens=2, ignore_eos=True)])
            c.wait(1)
        c.wait(1)
        assert c.text("long") == expected
        assert batcher.store.stats.evictions["device"] >= len(NAMES) - 1
    finally:
        batcher.close()


def test_a_cold_load_does_not_stall_rows_already_decoding(library, until):
    gate = threading.Event()
    pm = PrefixModel(tiny_model("llama"))

    def slow(folder):
        if folder.name == "p5":
            gate.wait(30)
        return artifacts.load_key_values(folder, pm.shape)

    store = PrefixStore(slow, "cpu", [library])
    batcher = Batcher(pm, CharTokenizer(), "base", Limits(max_batch=8), store=store).start()
    try:
        c = Collector(batcher)
        running = c.request("running", PROMPTS[0], "p0", max_tokens=10_000, ignore_eos=True)
        batcher.submit([running])
        assert until(lambda: running.generated > 0)
        queued = batcher.submit([c.request("cold", PROMPTS[1], "p5", max_tokens=3, ignore_eos=True)])
        before = running.generated
        assert until(lambda: running.generated > before + 20), "decoding went on during the load"
        assert not queued.done() and batcher.queue_depth() == 1
        gate.set()
        queued.result(timeout=30)
        assert c.wait(1) == ["cold"]
        running.cancelled = True
    finally:
        gate.set()
        batcher.close()


def test_a_corrupt_folder_fails_only_its_own_requests(library, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(library, root)
    (root / "p2" / artifacts.WEIGHTS_FILE).write_bytes(b"not safetensors")
    batcher = serving([root])
    try:
        c = Collector(batcher)
        good = [c.request(i, PROMPTS[i], "p1", max_tokens=4, ignore_eos=True) for i in range(3)]
        bad = c.request("bad", PROMPTS[3], "p2", max_tokens=4)
        batcher.submit(good[:2])
        failed = batcher.submit([bad])
        batcher.submit(good[2:])
        with pytest.raises(APIError) as err:
            failed.result(timeout=30)
        assert err.value.status == 422 and "p2" in err.value.message
        assert sorted(c.wait(4), key=str) == [0, 1, 2, "bad"]
        assert c.last("bad").error is err.value
        assert all(c.last(i).finish_reason == "length" for i in range(3))
        assert batcher.store.stats.failures == 1 and not batcher.held_prefixes()
    finally:
        batcher.close()


def test_the_response_says_whether_the_prefix_was_loaded_for_it(library):
    """``X-Prefix-Cache``: what a client (or a benchmark) needs to tell cold requests from warm ones."""
    import argparse
    import json
    import urllib.request

    from tiny import tiny_model_folder

    from prefixtune import options
    from prefixtune.serve import cli, setup
    from prefixtune.serve.background import BackgroundServer

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    model_dir = tiny_model_folder(library.parent / "served-model")
    cfg = options.build(setup.ServeConfig, parser.parse_args(["--model", str(model_dir), "--device", "cpu",
                                                             "--prefix-dir", str(library)]))
    with BackgroundServer(setup.build_app(cfg)) as server:
        def post(model, stream=False):
            body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, "stream": stream}).encode()
            request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return response.headers.get("X-Prefix-Cache")

        assert [post("p4"), post("p4"), post("p5", stream=True), post("p5", stream=True)] == ["miss", "hit"] * 2
        assert post(str(model_dir)) is None  # the base model: no prefix, no header
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
        assert 'prefixtune_prefix_cache_lookups_total{result="miss"} 2' in metrics
        assert 'prefixtune_prefix_load_seconds_count 2' in metrics
        assert 'prefixtune_prefix_cache_resident_bytes{tier="device"} ' + str(2 * nbytes()) in metrics


def test_closing_while_prefixes_load_ends_their_requests_with_a_503(library):
    gate = threading.Event()
    pm = PrefixModel(tiny_model("llama"))
    store = PrefixStore(lambda folder: gate.wait(30) and artifacts.load_key_values(folder, pm.shape), "cpu", [library])
    batcher = Batcher(pm, CharTokenizer(), "base", store=store).start()
    c = Collector(batcher)
    queued = [batcher.submit([c.request(name, PROMPTS[0], name)]) for name in NAMES[:3]]  # 2 loading, 1 waiting
    batcher.close()
    gate.set()
    for future in queued:
        with pytest.raises(APIError) as err:
            future.result(timeout=30)
        assert err.value.status == 503
    assert sorted(c.wait(3)) == sorted(NAMES[:3]) and all(c.last(n).error.status == 503 for n in NAMES[:3])


def test_a_memory_prefix_folder_is_served_and_counted_in_the_budget(tmp_path):
    """A memory prefix under --prefix-dir: the server's loader reads its one tensor, the budget counts its
    bytes, and its rows decode as the same prefix does in PrefixModel.generate."""
    from prefixtune.serve.loader import key_value_loader

    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(kind="memory"))
    with torch.no_grad():
        pm.prefixes["default"].memory.normal_(0, 3.0)
    pm.save_prefix(tmp_path / "mem")
    base = PrefixModel(tiny_model("llama"))
    store = PrefixStore(key_value_loader(base.shape), "cpu", [tmp_path], budget_bytes=10 ** 6)
    batcher = Batcher(base, CharTokenizer(), "base", Limits(max_batch=4, max_queue=8), store=store).start()
    try:
        c = Collector(batcher)
        batcher.submit([c.request(0, PROMPTS[1], "mem", max_tokens=8, ignore_eos=True)])
        c.wait(1)
        assert store.stats.resident["device"] == pm.prefixes["default"].memory.numel() * 4
        x = torch.tensor([PROMPTS[1]])
        out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
        assert c.text(0) == CharTokenizer().decode(out[0, x.shape[1]:].tolist())
    finally:
        batcher.close()
