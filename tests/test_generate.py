"""generate() with prefixes: continues exactly as the plain model after ``p``, beam search
included, and never ignores the prefix (the failure PEFT 0.21 has with transformers 5)."""

import pytest
import torch
from tiny import ARCHS, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel

L_P = 4
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _own_kv_model(model, p):
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=L_P, reparameterize=False))
    pm.set_prefix_key_values(pm.key_values_for_tokens(p))
    return pm


def _continue_plain(model, p, x, **kw):
    full = torch.cat([p.expand(x.shape[0], -1), x], dim=1)
    out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)
    return out[:, full.shape[1]:]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_continues_as_the_plain_model_after_p(arch):
    model = tiny_model(arch)
    p, x = tokens(1, L_P, seed=1)[0], tokens(2, 5, seed=2)
    expected = _continue_plain(model, p, x, **GREEDY)
    pm = _own_kv_model(model, p)
    got = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **GREEDY)[:, x.shape[1]:]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
def test_beam_search_continues_as_the_plain_model_after_p(arch):
    model = tiny_model(arch)
    p, x = tokens(1, L_P, seed=1)[0], tokens(2, 5, seed=3)
    beam = dict(GREEDY, num_beams=3, num_return_sequences=2)
    expected = _continue_plain(model, p, x, **beam)
    pm = _own_kv_model(model, p)
    got = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **beam)[:, x.shape[1]:]
    assert torch.equal(got, expected)


def test_beam_search_repeats_the_prefix_rows_once_per_call(monkeypatch):
    """Every step of beam search hands the model the rows repeated: the prefix is repeated to match at the first
    step only, for a key/value prefix and a memory alike."""
    from prefixtune import prefixes

    made = []
    repeat = prefixes.repeat_rows
    monkeypatch.setattr(prefixes, "repeat_rows", lambda t, rows: made.append(rows) or repeat(t, rows))
    x = tokens(2, 5, seed=3)
    for config in (PrefixConfig(prefix_length=L_P, reparameterize=False), PrefixConfig(kind="memory")):
        pm = PrefixModel.wrap(tiny_model("llama"), config)
        made.clear()
        pm.prefix_batch("default", 2).expand_rows(6)
        once = list(made)
        made.clear()
        pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **dict(GREEDY, num_beams=3))
        assert once and made == once


def test_left_padded_generate_matches_unpadded_rows():
    model = tiny_model("llama")
    p = tokens(1, L_P, seed=1)[0]
    pm = _own_kv_model(model, p)
    short, long = tokens(1, 3, seed=4), tokens(1, 6, seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()
    mask[1] = 1
    got = pm.generate(input_ids=batch, attention_mask=mask, **GREEDY)[:, 6:]
    for row, alone in enumerate([short, long]):
        single = pm.generate(input_ids=alone, attention_mask=torch.ones_like(alone), **GREEDY)[:, alone.shape[1]:]
        assert torch.equal(got[row], single[0])


def test_two_different_prefixes_give_different_generations():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=L_P, reparameterize=False, init_std=3.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=L_P, reparameterize=False, init_std=3.0))
    x = tokens(1, 5, seed=6)
    kw = dict(GREEDY, max_new_tokens=12)
    outs = {name: pm.generate(input_ids=x, prefix=name, **kw)[0].tolist() for name in ("a", "b", None)}
    assert outs["a"] != outs["b"]
    assert outs["a"] != outs[None] and outs["b"] != outs[None]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_prefix_generate_equals_one_prefix_runs(arch):
    model = tiny_model(arch)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparameterize=False, init_std=2.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=5, reparameterize=False, init_std=2.0))
    x = tokens(3, 5, seed=7)
    names = ["a", None, "b"]
    for kw in (GREEDY, dict(GREEDY, num_beams=2)):
        mixed = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=names, **kw)
        for row, name in enumerate(names):
            alone = pm.generate(input_ids=x[row:row + 1], attention_mask=torch.ones_like(x[row:row + 1]),
                                prefix=name, **kw)
            assert torch.equal(mixed[row], alone[0]), (kw, row, name)


def test_bf16_generate_matches_greedy_forward_steps():
    """generate() converts the float32 prefix to the model's dtype once per call; the tokens
    must be those of step-by-step greedy decoding with forward(), which converts per layer."""
    pm = PrefixModel.wrap(tiny_model("llama").to(torch.bfloat16),
                          PrefixConfig(prefix_length=L_P, reparameterize=False, init_std=0.5))
    x = tokens(2, 5, seed=2)
    generated = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **GREEDY)[:, x.shape[1]:]
    ids = x
    with torch.no_grad():
        for _ in range(GREEDY["max_new_tokens"]):
            ids = torch.cat([ids, pm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    stepped = ids[:, x.shape[1]:]
    for row in range(x.shape[0]):  # generate() stops a row at eos (2) and pads it; compare up to there
        ends = (stepped[row] == 2).nonzero()
        n = int(ends[0]) + 1 if len(ends) else stepped.shape[1]
        assert torch.equal(generated[row, :n], stepped[row, :n])
    assert pm.prefixes["default"].key_values.dtype == torch.float32  # the trained prefix itself stays float32


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "mistral"])
def test_the_prefix_in_the_cache_decodes_as_concatenation_does(arch):
    """generate() puts the prefix in the cache once (prefixtune.cache) instead of concatenating
    it at every step: same tokens and same scores as concatenation, for mixed rows of different
    prefix lengths, a prefix in some layers only, beam search, sampling and left padding."""
    from transformers import DynamicCache

    from prefixtune.cache import PrefixLayer

    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparameterize=False, init_std=2.0), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=5, reparameterize=False, init_std=2.0, layers=(1,)))
    x = tokens(3, 6, seed=8)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding
    built = []
    cases = [dict(GREEDY, max_new_tokens=70, min_new_tokens=70),  # past the buffer's first 64 slots
             dict(GREEDY, num_beams=3, num_return_sequences=2),
             dict(max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)]
    for kw in cases:
        for names in (["a", None, "b"], "a"):
            runs = []
            for concatenate in (False, True):  # a cache of the caller's own keeps the prefix out of it
                own = {"cache": DynamicCache(config=pm.model.config)} if concatenate else {}
                torch.manual_seed(0)
                runs.append(pm.generate(input_ids=x, attention_mask=mask, prefix=names, output_scores=True,
                                        return_dict_in_generate=True, **own, **kw))
            cached, concatenated = runs
            built.append(cached.past_key_values)
            assert torch.equal(cached.sequences, concatenated.sequences), (kw, names)
            torch.testing.assert_close(torch.stack(cached.scores), torch.stack(concatenated.scores))
    sliding = arch == "mistral"  # sliding-window layers would drop the prefix: concatenation stays
    assert all(isinstance(c.layers[1], PrefixLayer) != sliding for c in built)


def test_the_cache_buffer_keeps_its_tokens_and_little_unused_room():
    """A PrefixLayer grows by a quarter (at least 64 slots) when full: every view is the prefix
    then all tokens appended, and the unused room stays within max(64, a quarter of the used)."""
    from prefixtune.cache import MIN_CAPACITY, PrefixLayer

    prefix = torch.randn(2, 1, 5, 3)
    layer, appended = PrefixLayer(prefix, -prefix), []
    for step in range(700):
        new = torch.randn(2, 1, 1 if step else 7, 3)  # a 7-token prompt, then one token per step
        appended.append(new)
        keys, values = layer.update(new, -new)
        assert torch.equal(keys, torch.cat([prefix, *appended], dim=2)) and torch.equal(values, -keys)
        used, capacity = keys.shape[2], layer.capacity
        assert capacity - used <= max(MIN_CAPACITY, used // 4), (used, capacity)
    assert layer.get_seq_length() == 7 + 699


def test_the_lm_head_gets_one_block_so_a_frozen_weight_is_read_once():
    """``generate`` slices each row's last position for the LM head; with the weights frozen, as a wrapped model's
    are, torch's matmul multiplies a strided slice row by row against the whole weight. The head gets a copy in
    one block; the hook is gone after the call."""
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=L_P))
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))  # after ours
    x = tokens(3, 5)
    pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **GREEDY)
    assert len(seen) == GREEDY["max_new_tokens"] and all(seen)
    assert not head._forward_pre_hooks
    handle.remove()
