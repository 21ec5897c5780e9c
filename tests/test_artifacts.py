"""Saving and loading prefixes: JSON + safetensors only, identical logits after a round
trip, clear errors on a mismatched model or a damaged folder; init from text; materialize."""

import json

import pytest
import torch
from tiny import tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.artifacts import CONFIG_FILE, WEIGHTS_FILE


def _trained(arch="llama", **cfg):
    model = tiny_model(arch)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=16, **cfg))
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return pm


@pytest.mark.parametrize("keep_reparam", [False, True])
def test_save_then_load_gives_identical_logits(tmp_path, keep_reparam):
    pm = _trained()
    x = tokens(2, 7)
    with torch.no_grad():
        before = pm(input_ids=x).logits
    pm.save_prefix(tmp_path, keep_reparam=keep_reparam)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.prefixes["default"].reparameterized is keep_reparam
    with torch.no_grad():
        after = loaded(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_saved_config_records_what_the_prefix_was_made_for(tmp_path):
    _trained("qwen3", layers=(-1,)).save_prefix(tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["base"] == {"model_type": "qwen3", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
                            "name_or_path": meta["base"]["name_or_path"], "groups": {"decoder": 2}}
    assert meta["layers"] == [1] and meta["prefix"]["prefix_length"] == 4


def test_loading_onto_a_different_model_fails_clearly(tmp_path):
    _trained("qwen3").save_prefix(tmp_path)
    with pytest.raises(ValueError, match=r"made for another model: model_type: prefix has 'qwen3'.*head_dim"):
        PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_loading_a_damaged_folder_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)
    _trained().save_prefix(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: not valid JSON \(line 1"):
        PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_load_prefix_adds_a_second_named_prefix(tmp_path):
    first = _trained()
    first.save_prefix(tmp_path)
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2))
    pm.load_prefix(tmp_path, name="legal")
    assert list(pm.prefixes) == ["default", "legal"] and pm.active == "default"
    x = tokens(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x, prefix="legal").logits, first(input_ids=x).logits, atol=1e-6, rtol=0)


def test_materialize_folds_the_mlp_without_changing_outputs():
    pm = _trained()
    x = tokens(2, 6)
    with torch.no_grad():
        before = pm(input_ids=x).logits
    pm.materialize()
    enc = pm.prefixes["default"]
    assert not enc.reparameterized and enc.key_values.shape == (2, 2, 2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, before, atol=1e-6, rtol=0)


class _Tok:
    """The one tokenizer call init_text makes, over the tiny vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        ids = torch.tensor([[3 + (ord(c) % 90) for c in text]])
        return type("Enc", (), {"input_ids": ids})()


@pytest.mark.parametrize("reparameterize", [False, True])
def test_init_from_text_starts_at_the_models_own_key_values(reparameterize):
    model = tiny_model("llama")
    cfg = PrefixConfig(prefix_length=6, reparameterize=reparameterize, reparam_hidden_size=64,
                       init="text", init_text="table")
    pm = PrefixModel.wrap(model, cfg, tokenizer=_Tok())
    ids = _Tok()("table").input_ids[0]
    want = pm.key_values_for_tokens(torch.cat([ids, ids[:1]]))  # 5 tokens, repeated to 6
    got = pm.prefix_key_values()
    error = max((g[i] - w[i]).norm() / w[i].norm() for g, w in zip(got, want) for i in (0, 1))
    assert error < (1e-6 if not reparameterize else 1e-3)
    assert pm.prefixes["default"].init_fit_error < (1e-6 if not reparameterize else 1e-3)


def test_init_from_text_leaves_no_gradient_behind():
    """Fitting the MLP to the words must not leave its last gradient for training's first step
    (a distributed all-reduce would add it once per process)."""
    cfg = PrefixConfig(prefix_length=6, reparam_hidden_size=64, init="text", init_text="table", init_fit_steps=5)
    pm = PrefixModel.wrap(tiny_model("llama"), cfg, tokenizer=_Tok())
    assert all(p.grad is None for p in pm.trainable_parameters())


def test_init_text_without_a_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PrefixModel.wrap(tiny_model("llama"), PrefixConfig(init="text", init_text="hello"))
