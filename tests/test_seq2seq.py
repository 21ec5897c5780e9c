"""Encoder-decoder models (T5, BART): three prefix groups, as in Li & Liang's BART setup.

The parity test of decoder-only models does not carry over (an encoder's key/values for
``p`` depend on the text after it), so these tests check the properties that pin the
injection down instead: every group learns and nothing else does; a group left out is
exactly the base model's attention; rows without a prefix are the base model; the two
kernels agree (T5's relative position bias must skip the prefix columns in both); mixed
per-row prefixes, beam search, checkpointing and save/load behave as for decoder-only models.
"""

from __future__ import annotations

import pytest
import torch
from tiny import assert_same, SEQ2SEQ, tiny_seq2seq, tokens

from prefixtune import PrefixConfig, PrefixModel, arch
from prefixtune.attention import KWARG

ARCHS = sorted(SEQ2SEQ)
FLAT = dict(prefix_length=3, reparameterize=False, init_std=0.5)


def _inputs(rows: int = 3, seed: int = 1) -> dict:
    x = tokens(rows, 7, seed=seed)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # padding in the encoder input reaches both encoder and cross-attention masks
    return {"input_ids": x, "attention_mask": mask, "decoder_input_ids": tokens(rows, 5, seed=seed + 1)}


def _wrapped(name: str, **config) -> PrefixModel:
    return PrefixModel.wrap(tiny_seq2seq(name), PrefixConfig(**{**FLAT, **config}))


@pytest.mark.parametrize("name", ARCHS)
def test_every_group_receives_gradients_and_nothing_else_does(name):
    pm = _wrapped(name)
    inputs = _inputs()
    pm(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()
    grad = pm.prefixes["default"].key_values.grad  # [sites, 2, kv_heads, L, head_dim]
    per_site = grad.abs().flatten(1).sum(1)
    assert per_site.shape[0] == pm.shape.num_layers == sum(pm.shape.groups.values())
    assert (per_site > 0).all(), f"sites without gradient: {(per_site == 0).nonzero().flatten().tolist()}"
    assert all(p.grad is None and not p.requires_grad for p in pm.model.parameters())


def _attention_calls(pm: PrefixModel, group: str, inputs: dict) -> list:
    """Run ``pm`` and record each call of ``group``'s attention modules: (module, args, kwargs, output)."""
    calls, handles = [], []
    for g, module in arch.attention_modules(pm.model, pm.family):
        if g.name == group:
            hook = lambda m, a, k, out: calls.append((m, a, {key: v for key, v in k.items() if key != KWARG}, out))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        pm(**inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("off", ["encoder", "decoder", "cross"])
def test_a_group_left_out_is_exactly_the_base_attention(name, off):
    pm = _wrapped(name, targets=tuple(g for g in ("encoder", "decoder", "cross") if g != off))
    calls = _attention_calls(pm, off, _inputs())
    assert calls
    base = pm.unwrap()  # the stock kernel again, no prefix anywhere
    with torch.no_grad():
        for module, args, kwargs, out in calls:
            assert torch.equal(module(*args, **kwargs)[0], out[0])
    # and a group that is on does differ from the base attention (the check above can fail)
    on = PrefixModel.wrap(base, PrefixConfig(**FLAT, targets=(off,)))
    calls = _attention_calls(on, off, _inputs())
    on.unwrap()
    with torch.no_grad():
        assert not any(torch.allclose(m(*a, **k)[0], out[0]) for m, a, k, out in calls)


@pytest.mark.parametrize("name", ARCHS)
def test_rows_without_a_prefix_are_the_base_model(name):
    pm = _wrapped(name)
    inputs = _inputs()
    with torch.no_grad():
        base = pm.model(**inputs).logits
        assert torch.equal(pm(**inputs, prefix=None).logits, base)
        mixed = pm(**inputs, prefix=[None, "default", None]).logits
        prefixed = pm(**inputs).logits
    assert_same(mixed[[0, 2]], base[[0, 2]])
    assert_same(mixed[1], prefixed[1])
    assert not torch.allclose(prefixed, base, atol=1e-3)


@pytest.mark.parametrize("name", ARCHS)
def test_mixed_prefixes_equal_one_prefix_runs_row_by_row(name):
    pm = _wrapped(name)
    pm.add_prefix("other", PrefixConfig(prefix_length=5, reparameterize=False, init_std=0.5, targets=("cross",)))
    inputs = _inputs()
    names = ["other", None, "default"]
    with torch.no_grad():
        mixed = pm(**inputs, prefix=names).logits
        for row, prefix in enumerate(names):
            alone = pm(**{k: v[row:row + 1] for k, v in inputs.items()}, prefix=prefix).logits
            assert_same(mixed[row:row + 1], alone)


def test_t5_relative_position_bias_skips_the_prefix_in_both_kernels():
    inputs = _inputs()
    logits = {}
    for attn in ("eager", "sdpa"):
        pm = PrefixModel.wrap(tiny_seq2seq("t5", attn=attn), PrefixConfig(**FLAT))
        with torch.no_grad():
            logits[attn] = pm(**inputs).logits
    assert_same(logits["sdpa"], logits["eager"])


@pytest.mark.parametrize("name", ARCHS)
def test_beam_search_with_mixed_prefixes_equals_one_prefix_runs(name):
    pm = _wrapped(name)
    pm.add_prefix("other", PrefixConfig(**FLAT))
    inputs = {k: v for k, v in _inputs().items() if k != "decoder_input_ids"}
    names = ["default", None, "other"]
    settings = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    mixed = pm.generate(**inputs, prefix=names, **settings)
    for row, prefix in enumerate(names):
        alone = pm.generate(**{k: v[row:row + 1] for k, v in inputs.items()}, prefix=prefix, **settings)
        assert torch.equal(mixed[2 * row:2 * row + 2, :alone.shape[1]], alone)
    assert not torch.equal(pm.generate(**inputs, prefix="default", **settings),
                           pm.generate(**inputs, prefix=None, **settings))


@pytest.mark.parametrize("name", ARCHS)
def test_save_then_load_gives_identical_outputs(name, tmp_path):
    pm = PrefixModel.wrap(tiny_seq2seq(name), PrefixConfig(prefix_length=4, targets=("encoder", "cross")))
    inputs = _inputs()
    with torch.no_grad():
        before = pm(**inputs).logits
    pm.save_prefix(tmp_path)
    loaded = PrefixModel.from_pretrained(tiny_seq2seq(name), tmp_path)
    assert loaded.prefixes["default"].layers == pm.prefixes["default"].layers
    with torch.no_grad():
        assert_same(loaded(**inputs).logits, before)


def test_a_prefix_for_another_layout_is_refused(tmp_path):
    _wrapped("bart").save_prefix(tmp_path)
    with pytest.raises(ValueError, match="made for another model"):
        PrefixModel.from_pretrained(tiny_seq2seq("t5"), tmp_path)


@pytest.mark.parametrize("name", ARCHS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    grads = []
    for checkpointing in (False, True):
        pm = _wrapped(name)
        pm.train()
        if checkpointing:
            pm.activation_checkpointing_enable()
        inputs = _inputs()
        loss = pm(**inputs, labels=inputs["decoder_input_ids"]).loss
        loss.backward()
        grads.append((loss.detach(), pm.prefixes["default"].key_values.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-5)


def test_targets_must_exist_in_the_model():
    from tiny import tiny_model

    with pytest.raises(ValueError, match="targets .*'cross'.* name no attention of this model; it has: decoder"):
        PrefixModel.wrap(tiny_model("llama"), PrefixConfig(targets=("cross",)))
    with pytest.raises(ValueError, match="--targets: must be one of encoder, decoder, cross, got 'cros'"):
        PrefixConfig(targets=("encoder", "cros"))


def test_init_from_text_needs_a_decoder_only_model():
    with pytest.raises(NotImplementedError, match="decoder-only"):
        PrefixModel(tiny_seq2seq("bart")).key_values_for_tokens(tokens(1, 3)[0])
