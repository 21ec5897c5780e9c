"""The continuous batcher without HTTP: mixed-prefix batches decode exactly as requests
alone do, rows join and leave mid-flight, prefixes change between steps, limits hold."""

import pytest
import torch
from tiny import CharTokenizer, Collector, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.prefixes import PrefixBatch
from prefixtune.serve import Batcher, Limits, SamplingParams
from prefixtune.serve.errors import APIError
from prefixtune.serve.kvcache import BatchCache
from prefixtune.serve.sampling import next_tokens
from prefixtune.serve.text import TextStream

def _model(arch="llama"):
    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparameterize=False, init_std=2.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=5, reparameterize=True, reparam_hidden_size=16))
    pm.prefixes["b"].embedding.weight.data.normal_(0, 3.0)  # make b's MLP output matter
    return pm


@pytest.fixture
def served():
    pm = _model()
    batcher = Batcher(pm, CharTokenizer(), "base", Limits(max_batch=8, max_queue=16)).start()
    yield pm, batcher
    batcher.close()


PROMPTS = [tokens(1, n, seed=n)[0].tolist() for n in (3, 8, 5, 11, 4, 6)]
MODELS = ["a", "base", "b", "a", "b", "base"]


def _alone(batcher, prompt, model, **params):
    c = Collector(batcher)
    batcher.submit([c.request(0, prompt, model, **params)])
    c.wait(1)
    return c.text(0), c.last(0).finish_reason


def test_concurrent_mixed_prefix_requests_equal_requests_sent_one_at_a_time(served, until):
    """The server's correctness criterion, with rows joining while others are mid-decoding
    (so caches of different lengths are merged and trimmed) and leaving at different steps."""
    pm, batcher = served
    c = Collector(batcher)
    lengths = [12, 5, 9, 14, 3, 7]
    requests = [c.request(i, p, m, max_tokens=n, ignore_eos=True)
                for i, (p, m, n) in enumerate(zip(PROMPTS, MODELS, lengths))]
    batcher.submit(requests[:2])
    assert until(lambda: any(c.events[k] for k in (0, 1)))  # the first two are decoding before the rest join
    batcher.submit(requests[2:4])
    c.wait(1)
    batcher.submit(requests[4:])
    c.wait(len(requests) - 1)
    for i, (p, m, n) in enumerate(zip(PROMPTS, MODELS, lengths)):
        assert (c.text(i), c.last(i).finish_reason) == _alone(batcher, p, m, max_tokens=n, ignore_eos=True), i
        assert c.last(i).completion_tokens == n


def test_batched_greedy_equals_prefix_model_generate(served):
    pm, batcher = served
    c = Collector(batcher)
    batcher.submit([c.request(i, p, m, ignore_eos=True) for i, (p, m) in enumerate(zip(PROMPTS, MODELS))])
    c.wait(len(PROMPTS))
    for name in ("a", "b"):  # what the server serves, registered in the model to generate with
        pm.prefixes.add(name, served_encoder(batcher, name))
    for i, (p, m) in enumerate(zip(PROMPTS, MODELS)):
        x = torch.tensor([p])
        out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=None if m == "base" else m,
                          max_new_tokens=10,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
        assert c.text(i) == CharTokenizer().decode(out[0, len(p):].tolist())


def served_encoder(batcher, name):
    entry = batcher.store.acquire(name).result(timeout=30)
    batcher.store.release(entry)
    return entry.encoder


def test_prefixes_are_materialized_once_at_load(served):
    pm, batcher = served
    assert not pm.prefixes  # the store holds them now
    assert all(not served_encoder(batcher, n).reparameterized and not served_encoder(batcher, n).training
               for n in ("a", "b"))


def test_end_of_sequence_stop_strings_and_length_end_a_row(served):
    pm, batcher = served
    text, reason = _alone(batcher, PROMPTS[1], "a", max_tokens=12, ignore_eos=True)
    assert reason == "length" and len(text) == 12
    stop = text[4:6]
    cut, reason = _alone(batcher, PROMPTS[1], "a", max_tokens=12, ignore_eos=True, stop=["zzzz", stop])
    assert reason == "stop" and cut == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(served):
    pm, batcher = served
    params = dict(temperature=1.5, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    alone = _alone(batcher, PROMPTS[0], "b", **params)
    c = Collector(batcher)
    batcher.submit([c.request(0, PROMPTS[0], "b", **params)] +
                   [c.request(i, p, m, temperature=1.0, ignore_eos=True) for i, (p, m) in enumerate(
                       zip(PROMPTS[1:], MODELS[1:]), start=1)])
    c.wait(len(PROMPTS))
    assert (c.text(0), c.last(0).finish_reason) == alone
    assert _alone(batcher, PROMPTS[0], "b", **{**params, "seed": 8}) != alone


def test_unknown_model_and_full_queue_are_refused_at_submit():
    pm = _model()
    batcher = Batcher(pm, CharTokenizer(), "base", Limits(max_batch=1, max_queue=2))  # not started: nothing drains
    c = Collector(batcher)
    with pytest.raises(APIError) as err:
        batcher.submit([c.request(0, [5, 6], "nope")])
    assert err.value.status == 404 and err.value.code == "model_not_found"
    batcher.submit([c.request(1, [5, 6], "a"), c.request(2, [5, 6], "b")])
    with pytest.raises(APIError) as err:
        batcher.submit([c.request(3, [5, 6], "a")])
    assert err.value.status == 429
    batcher.start()
    assert sorted(c.wait(2)) == [1, 2]
    batcher.close()
    with pytest.raises(APIError) as err:
        batcher.submit([c.request(4, [5, 6], "a")])
    assert err.value.status == 503


def test_replacing_or_removing_a_prefix_mid_flight_keeps_running_requests_on_their_prefix(served, tmp_path, until):
    pm, batcher = served
    expected = _alone(batcher, PROMPTS[3], "a", max_tokens=40, ignore_eos=True)
    other = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=4, reparameterize=False, init_std=2.0))
    other.save_prefix(tmp_path / "new")
    c = Collector(batcher)
    batcher.submit([c.request(0, PROMPTS[3], "a", max_tokens=40, ignore_eos=True)])
    assert until(lambda: c.events[0])
    loaded = batcher.add_prefix("a", str(tmp_path / "new")).result(timeout=30)
    assert loaded["replaced"] and loaded["prefix_length"] == 4
    assert batcher.remove_prefix("b").result(timeout=30)["deleted"]
    c.wait(1)
    assert (c.text(0), c.last(0).finish_reason) == expected
    assert _alone(batcher, PROMPTS[3], "a", max_tokens=40, ignore_eos=True) != expected  # new requests: new prefix
    assert batcher.model_names() == ["base", "a"]
    assert not batcher.held_prefixes()  # the old "a" and "b" are gone once unused: only the new "a" is held
    new = served_encoder(batcher, "a")
    assert batcher.store.stats.resident["device"] == new.key_values.numel() * 4
    with pytest.raises(APIError) as err:
        batcher.remove_prefix("b").result(timeout=30)
    assert err.value.status == 404


def test_a_bad_prefix_path_fails_alone(served, tmp_path):
    pm, batcher = served
    with pytest.raises(APIError) as err:
        batcher.add_prefix("c", str(tmp_path / "missing")).result(timeout=30)
    assert err.value.status == 400 and err.value.param == "path"
    with pytest.raises(APIError):
        batcher.add_prefix("bad name/", str(tmp_path))
    assert _alone(batcher, PROMPTS[0], "a")[1] in ("stop", "length")


def test_cancelled_requests_leave_the_batch(served, until):
    pm, batcher = served
    c = Collector(batcher)
    slow = c.request(0, PROMPTS[0], "a", max_tokens=10_000, ignore_eos=True)
    batcher.submit([slow, c.request(1, PROMPTS[1], "b", max_tokens=5, ignore_eos=True)])
    assert c.wait(1) == [1]
    slow.cancelled = True
    assert until(lambda: batcher.active_rows() == 0) and batcher.cached_rows() == 0
    assert not batcher.held_prefixes()


def _prefilled(rows, length, fill, slots):
    """A BatchCache of ``rows`` rows of ``length`` tokens (keys = ``fill``), one layer, each row with a
    prefix of ``slots`` slots (keys = -``fill``; none when 0), as the batcher's prefill leaves it."""
    prefix = torch.full((rows, 1, slots, 2), -float(fill))
    batch = None if not slots else PrefixBatch(key_values=[(prefix, prefix)], valid=[None],
                                               offsets=torch.full((rows,), slots))
    cache, told = BatchCache.open(batch, layers=1)
    assert told is None or told.in_cache == {0}
    keys = torch.full((rows, 1, length, 2), float(fill))
    cache.update(keys, keys, 0)  # what the prefill's forward does
    return cache, torch.ones(rows, length, dtype=torch.long), batch


def test_batch_cache_join_and_keep_pad_prefix_slots_right_tokens_left_and_trim():
    mine = BatchCache()
    mine.join(*_prefilled(2, 3, 1, slots=2))
    assert mine.prefix_batch().valid == [None]  # every slot real: no mask work for the attention
    mine.join(*_prefilled(1, 5, 2, slots=4))
    mine.join(*_prefilled(1, 2, 3, slots=0))  # a base-model row
    keys = mine.cache.layers[0].keys[:, 0, :, 0]
    assert keys.tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 1],
                             [-1, -1, 0, 0, 0, 0, 1, 1, 1],
                             [-2, -2, -2, -2, 2, 2, 2, 2, 2],
                             [0, 0, 0, 0, 0, 0, 0, 3, 3]]
    assert mine.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    told = mine.prefix_batch()
    assert told.in_cache == {0} and told.key_values[0][0].shape == (4, 1, 4, 2)
    assert told.valid[0].tolist() == [[True, True, False, False]] * 2 + [[True] * 4, [False] * 4]
    assert told.offsets.tolist() == [2, 2, 4, 0] and told.shift is None
    assert mine.cache.get_seq_length() == 5  # positions and masks count tokens, not prefix slots

    mine.keep([3, 1])  # the long row and its long prefix leave: their columns and slots go
    assert mine.cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 0, 0, 3, 3], [-1, -1, 1, 1, 1]]
    assert mine.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and mine.shifts == [0, 2]
    assert mine.prefix_batch().valid[0].tolist() == [[False, False], [True, True]]
    mine.keep([0])  # only the base-model row: no prefix left anywhere
    assert mine.prefix_batch() is None and mine.cache.layers[0].keys[:, 0, :, 0].tolist() == [[3, 3]]
    mine.keep([])
    assert mine.rows == 0 and mine.prefix_batch() is None


def test_text_stream_holds_back_partial_stop_strings():
    stream = TextStream(CharTokenizer(), stop=["cde"])
    pieces = [stream.push(t) for t in (3, 4, 5, 6)]  # token 3 is "d": "defg" never contains "cde"
    assert "".join(pieces) == "defg" and not stream.stopped
    stream = TextStream(CharTokenizer(), stop=["efx", "fg"])
    assert stream.push(3) == "d"
    assert stream.push(4) == ""  # "e" may begin "efx"
    assert stream.push(5) == ""  # "ef" may begin "efx" and "f" may begin "fg"
    assert stream.push(6) == "e" and stream.stopped  # "fg" found: the text ends before it
    assert stream.text == "de"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = [SamplingParams(temperature=1.0, top_p=0.5)]
    draws = {next_tokens(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(50)}
    assert draws == {0}
    params = [SamplingParams(temperature=1.0, top_p=0.85)]
    draws = {next_tokens(logits, params, [torch.Generator().manual_seed(s)])[0] for s in range(200)}
    assert draws == {0, 1}


def test_a_request_that_breaks_the_model_fails_alone(served):
    """A prefill that raises is retried row by row, so only the request at fault gets the error."""
    pm, batcher = served
    expected = _alone(batcher, PROMPTS[1], "b")
    c = Collector(batcher)
    batcher.submit([c.request(0, PROMPTS[1], "b"), c.request(1, [5, 10**6, 7], "a"), c.request(2, PROMPTS[2], "a")])
    c.wait(3)
    assert c.last(1).error is not None and c.last(1).error.status == 500
    assert (c.text(0), c.last(0).finish_reason) == expected
    assert c.last(2).finish_reason in ("stop", "length")
    assert batcher.alive and not batcher.held_prefixes()


def test_a_prefix_on_some_layers_mixes_with_full_ones_exactly():
    """Prefixes of different lengths on different layers in one batch: in the cache, a layer's
    slots that a row's prefix does not fill stay masked for that row."""
    pm = _model()
    pm.add_prefix("c", PrefixConfig(prefix_length=7, reparameterize=False, init_std=2.0, layers=[1]))
    batcher = Batcher(pm, CharTokenizer(), "base", Limits(max_batch=8)).start()
    try:
        c = Collector(batcher)
        models = ["c", "a", "base", "c", "b"]
        batcher.submit([c.request(i, p, m, max_tokens=6, ignore_eos=True) for i, (p, m) in enumerate(zip(PROMPTS, models))])
        c.wait(len(models))
        for i, (p, m) in enumerate(zip(PROMPTS, models)):
            assert c.text(i) == _alone(batcher, p, m, max_tokens=6, ignore_eos=True)[0], i
        assert c.text(0) != _alone(batcher, PROMPTS[0], "base", max_tokens=6, ignore_eos=True)[0]
    finally:
        batcher.close()


@pytest.mark.parametrize("arch", ["gpt2", "opt", "qwen3", "gemma2"])
def test_mixed_batches_are_exact_on_other_families(arch, until):
    """Absolute positions (GPT-2, OPT's mask-derived ones), another head_dim, eager soft-capping."""
    batcher = Batcher(_model(arch), CharTokenizer(), "base", Limits(max_batch=8)).start()
    try:
        c = Collector(batcher)
        requests = [c.request(i, p, m, max_tokens=4 + 2 * i, ignore_eos=True)
                    for i, (p, m) in enumerate(zip(PROMPTS[:4], MODELS[:4]))]
        batcher.submit(requests[:2])
        assert until(lambda: c.events[0])
        batcher.submit(requests[2:])
        c.wait(4)
        for i, (p, m) in enumerate(zip(PROMPTS[:4], MODELS[:4])):
            assert c.text(i) == _alone(batcher, p, m, max_tokens=4 + 2 * i, ignore_eos=True)[0], i
    finally:
        batcher.close()


def test_memory_prefix_rows_decode_as_they_do_alone_beside_key_value_rows(until):
    """A memory prefix in the server: rows with a memory, a key/value prefix or none, joining and leaving
    mid-flight, each decode what they decode alone and what PrefixModel.generate gives; the store counts
    the memory's bytes in its budget."""
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, reparameterize=False, init_std=2.0),
                          name="kv")
    pm.add_prefix("mem", PrefixConfig(kind="memory"))
    with torch.no_grad():
        pm.prefixes["mem"].memory.normal_(0, 3.0)
    memory_bytes = pm.prefixes["mem"].memory.numel() * 4
    kv_bytes = pm.prefixes["kv"].key_values.numel() * 4
    batcher = Batcher(pm, CharTokenizer(), "base", Limits(max_batch=8, max_queue=16)).start()
    try:
        assert batcher.store.stats.resident["device"] == memory_bytes + kv_bytes
        models = ["mem", "base", "kv", "mem", "kv", "base"]
        lengths = [12, 5, 9, 14, 3, 7]
        c = Collector(batcher)
        requests = [c.request(i, p, m, max_tokens=n, ignore_eos=True)
                    for i, (p, m, n) in enumerate(zip(PROMPTS, models, lengths))]
        batcher.submit(requests[:2])
        assert until(lambda: any(c.events[k] for k in (0, 1)))
        batcher.submit(requests[2:4])
        c.wait(1)
        batcher.submit(requests[4:])
        c.wait(len(requests) - 1)
        for name in ("kv", "mem"):  # what the server serves, registered in the model to generate with
            pm.prefixes.add(name, served_encoder(batcher, name))
        for i, (p, m, n) in enumerate(zip(PROMPTS, models, lengths)):
            assert (c.text(i), c.last(i).finish_reason) == _alone(batcher, p, m, max_tokens=n, ignore_eos=True), i
            x = torch.tensor([p])
            out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=None if m == "base" else m,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert c.text(i) == CharTokenizer().decode(out[0, len(p):].tolist()), (i, m)
    finally:
        batcher.close()
