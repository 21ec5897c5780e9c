"""Unsupported models and bad calls fail early with a message naming what is wrong."""

import pytest
import torch
import transformers as tf
from tiny import tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel


def test_unsupported_architecture_names_what_is_missing():
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(NotImplementedError, match=r"no architecture entry for model_type 'bloom'.*prefixtune/arch.py"):
        PrefixModel.wrap(bloom)


def test_a_family_that_bypasses_the_attention_registry_says_why():
    deberta = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(NotImplementedError, match=r"deberta-v2.*AttentionInterface"):
        PrefixModel.wrap(deberta)


def test_a_plain_module_is_refused():
    with pytest.raises(TypeError, match="no config.model_type"):
        PrefixModel.wrap(torch.nn.Linear(2, 2))


def test_unsupported_attention_kernel_is_refused():
    model = tiny_model("llama")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(NotImplementedError, match="'flex_attention' cannot carry a prefix"):
        PrefixModel.wrap(model)


def test_prefix_that_never_reaches_attention_raises_instead_of_being_ignored():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=2))
    model.set_attn_implementation("sdpa")  # someone switched it back behind our back
    with pytest.raises(RuntimeError, match=r"never reached the attention of layers \[0, 1\]"):
        pm(input_ids=tokens(1, 4))
    with pytest.raises(RuntimeError, match="never reached"):
        pm.generate(input_ids=tokens(1, 4), max_new_tokens=2)


@pytest.mark.parametrize("config, message", [
    (dict(prefix_length=0), "--prefix-length: must be at least 1, got 0"),
    (dict(init="words"), "--init: must be one of random, text, got 'words'"),
    (dict(init="text"), "init='text' needs init_text"),
    (dict(dropout=1.0), "--prefix-dropout: must be less than 1, got 1.0"),
    (dict(layers=()), r"--layers: must name at least one, got \(\)"),
])
def test_invalid_config_fields_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**config)


def test_out_of_range_layer_is_named():
    with pytest.raises(ValueError, match="layer 5 is out of range for a model with 2 layers"):
        PrefixModel.wrap(tiny_model("llama"), PrefixConfig(layers=(5,)))
    with pytest.raises(ValueError, match="--layers: -1 and 1 name the same layer of this model's 2"):
        PrefixModel.wrap(tiny_model("llama"), PrefixConfig(layers=(-1, 1)))  # distinct as typed, one layer here


def test_bad_prefix_arguments_are_named():
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2))
    with pytest.raises(KeyError, match="no prefix named 'legal'; this model has: default"):
        pm(input_ids=tokens(1, 3), prefix="legal")
    with pytest.raises(ValueError, match="lists 1 names for a batch of 2 rows"):
        pm(input_ids=tokens(2, 3), prefix=["default"])
    with pytest.raises(ValueError, match="already used"):
        pm.add_prefix("default")


def test_unwrap_restores_the_base_model():
    model = tiny_model("llama")
    x = tokens(1, 5)
    with torch.no_grad():
        before = model(input_ids=x).logits
        pm = PrefixModel.wrap(model)
        assert pm.unwrap() is model
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(input_ids=x).logits, before)


def test_device_map_offload_keeps_the_prefix(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                        offload_folder=tmp_path / "off").eval()
    assert hasattr(offloaded.model.layers[1], "_hf_hook"), "layer 1 should be offloaded to disk by accelerate"
    reference = tiny_model("llama")
    x = tokens(2, 6)
    outs = []
    for model in (reference, offloaded):
        pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparameterize=False))
        pm.set_prefix_key_values(pm.key_values_for_tokens(tokens(1, 3, seed=9)[0]))
        with torch.no_grad():
            outs.append(pm(input_ids=x).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_wrapping_a_model_twice_then_unwrapping_restores_its_own_kernel():
    model = tiny_model("llama")
    PrefixModel.wrap(model)
    again = PrefixModel.wrap(model, PrefixConfig(prefix_length=2))
    again(input_ids=tokens(1, 3))
    again.unwrap()
    assert model.config._attn_implementation == "sdpa"
