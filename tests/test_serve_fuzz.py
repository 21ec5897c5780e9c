"""The server under Hypothesis: request bodies, raw nesting, model names, admin paths and prefix folders
drawn from valid, hostile and extreme values. Every answer is a 2xx or a 4xx in OpenAI's error format,
never a 5xx, and ``/health`` answers after each. The examples are derandomized: CI runs the same ones
every time."""

import json
import shutil
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import test_serve_api
import test_serve_hostile
from test_serve_api import ADMIN, BASE, http
from tiny import tiny_model

from prefixtune import PrefixConfig, PrefixModel, artifacts
from prefixtune.serve.errors import APIError
from prefixtune.serve.loader import key_value_loader
from prefixtune.serve.store import PrefixStore
# fixtures: the tiny model and its prefixes, a --prefix-dir of hostile folders, a server over both
folders, hostile, server = test_serve_api.folders, test_serve_hostile.hostile, test_serve_hostile.server


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)  # surrogates, controls too
EXTREME = st.sampled_from([5e-324, 1e-46, 1e-40, 2.2250738585072014e-308, -0.0, 1e-300, 1e308, 1.7976931348623157e308,
                           -1e-40, 2**63, -2**63, 2**64 + 1, 10**30])
NUMBER = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), EXTREME,
                   st.floats(min_value=-1e-30, max_value=1e-30), st.text(max_size=3), st.none(), st.booleans())
NAME = st.one_of(st.sampled_from(["alpha", "beta", BASE, "", "nope", "..", ".", "../alpha", "alpha\n", "a/b", "%00",
                                  "\x00", "ünï", "sp ace", "ok", "deep", "huge-length", "link-weights", "loop"]),
                 TEXT, st.text(max_size=300), st.builds(lambda c, n: c * n, st.sampled_from("xé/.\x00 "),
                                                        st.integers(100, 700)))
SHAPED = st.fixed_dictionaries({}, optional={
    "model": NAME,
    "prompt": TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(-5, 2**40), max_size=4) | JSON,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | TEXT,
                                                "content": TEXT | JSON}), max_size=3) | JSON,
    "max_tokens": NUMBER, "max_completion_tokens": NUMBER, "temperature": NUMBER, "top_p": NUMBER, "n": NUMBER,
    "seed": NUMBER, "presence_penalty": NUMBER, "best_of": NUMBER,
    "stop": TEXT | st.lists(TEXT, max_size=5) | JSON, "stream": NUMBER, "echo": NUMBER,
    "logprobs": NUMBER, "stream_options": JSON, "ignore_eos": NUMBER,
})


def _nested(kind: str, depth: int) -> str:
    """JSON nested ``depth`` deep: arrays, objects, or both in turn."""
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)


def _wide(kind: str, width: int) -> str:
    if kind == "array":
        return json.dumps([0] * width)
    if kind == "object":
        return json.dumps({f"k{i}": i for i in range(width)})
    return json.dumps(["x" * 7] * width)


RAW = st.one_of(
    st.builds(_nested, st.sampled_from(["array", "object", "mixed"]), st.integers(1, 140_000)),
    st.builds(_wide, st.sampled_from(["array", "object", "strings"]), st.integers(1, 60_000)),
)


def _fuzzed(server, path: str, raw: bytes, key=None) -> int:
    start = time.monotonic()
    status, answer = http(server, "POST", path, raw=raw, **({} if key is None else {"key": key}))
    assert status < 500, (status, answer)
    if status >= 400:
        assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert time.monotonic() - start < 30
    assert http(server, "GET", "/health")[0] == 200  # the others are still served
    return status


@fuzz(160)
@given(body=SHAPED, chat=st.booleans())
def test_fuzzed_requests_get_a_2xx_or_a_4xx_in_openai_format(server, body, chat):
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    _fuzzed(server, "/v1/chat/completions" if chat else "/v1/completions", raw)


@fuzz(60)
@given(body=JSON, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/prefixes/x"]))
def test_arbitrary_json_bodies_get_a_4xx_in_openai_format(server, body, path):
    _fuzzed(server, path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"), key=ADMIN)


@fuzz(40)
@given(value=RAW, where=st.sampled_from(["body", "metadata", "prompt", "messages"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_deep_and_wide_bodies_within_the_size_limit_get_a_2xx_or_a_4xx(server, value, where, path):
    raw = value if where == "body" else '{"model": "alpha", "max_tokens": 1, "%s": %s}' % (where, value)
    if len(raw) <= 1 << 20:
        _fuzzed(server, path, raw.encode())


@fuzz(40)
@given(folder=st.sampled_from(["ok", "deep", "huge-length", "sparse", "link-weights", "link-config", "loop",
                               "loop/x", "sp ace", "missing", "..", "../..", "", "x" * 300]),
       prefix=st.sampled_from(["", "/", "/etc/", "\x00", "./"]), name=NAME)
def test_admin_loads_of_hostile_paths_get_a_2xx_or_a_4xx(server, hostile, folder, prefix, name):
    path = prefix + str(hostile / folder) if prefix != "\x00" else str(hostile) + "\x00" + folder
    from urllib.parse import quote

    _fuzzed(server, "/v1/prefixes/" + quote(name or "-", safe=""), json.dumps({"path": path}).encode(), key=ADMIN)


# ------------------------------------------------------------------ the store's loader, on hostile folders
CONFIG_VALUES = st.one_of(st.integers(-2**70, 2**70), st.booleans(), st.none(), st.floats(allow_nan=True),
                          st.text(max_size=5), st.lists(st.integers(-3, 40), max_size=5), st.just(10**30),
                          st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
CONFIG_KEYS = st.sampled_from([("prefix", "prefix_length"), ("prefix", "layers"), ("prefix", "reparameterize"),
                               ("prefix", "targets"), ("layers",), ("base", "num_layers"), ("base", "head_dim"),
                               ("base", "num_kv_heads"), ("base",), ("format",), ("prefix",)])
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"])
HEADER = st.fixed_dictionaries({
    "dtype": DTYPES, "shape": st.lists(st.integers(-1, 2**40), max_size=6),
    "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "p"
    PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2, reparameterize=False)).save_prefix(folder)
    return folder


def _damage(folder, edits, header, length_prefix, raw_config):
    meta = json.loads((folder / artifacts.CONFIG_FILE).read_text())
    for path, value in edits:
        node = meta
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[path[-1]] = value
    (folder / artifacts.CONFIG_FILE).write_text(raw_config if raw_config is not None else json.dumps(meta))
    if header is not None:
        text = json.dumps({"key_values": header}).encode()
        size = len(text) if length_prefix is None else length_prefix
        (folder / artifacts.WEIGHTS_FILE).write_bytes(struct.pack("<Q", size) + text + b"\0" * 64)


@fuzz(80)
@given(edits=st.lists(st.tuples(CONFIG_KEYS, CONFIG_VALUES), max_size=3), header=st.none() | HEADER,
       length_prefix=st.none() | st.integers(0, 2**64 - 1),
       raw_config=st.none() | st.sampled_from(["", "{", "[]", "null", "[" * 50_000, '{"prefix": ' * 3000]))
def test_the_store_refuses_any_hostile_folder_with_a_4xx(saved, tmp_path_factory, edits, header, length_prefix,
                                                         raw_config):
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(saved, root / "p")
    _damage(root / "p", edits, header, length_prefix, raw_config)
    store = PrefixStore(key_value_loader(PrefixModel(tiny_model("llama")).shape), "cpu", [root], budget_bytes=1 << 20)
    try:
        for load in (lambda: store.acquire("p").result(timeout=60),
                     lambda: store.load("q", str(root / "p")).result(timeout=60)):
            try:
                load()
            except APIError as err:
                assert 400 <= err.status < 500 or err.status == 507, err.message
                assert "frame #" not in err.message and "Traceback" not in err.message, err.message
    finally:
        store.close()
