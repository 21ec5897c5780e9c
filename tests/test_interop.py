"""PEFT interoperability: a prefix exported with ``export-peft`` gives PEFT
the same logits as prefixtune, a PEFT prefix imported with ``import-peft`` gives prefixtune
PEFT's logits, round trips are exact, and what PEFT cannot express is refused by name."""

import json

import pytest
import torch
from tiny import ARCHS, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.arch import ModelShape
from prefixtune.artifacts import read_prefix, write_prefix
from prefixtune.cli import main
from prefixtune.compare.methods import _peft_prefix_notes, peft_generates_with_prefix
from prefixtune.peft.interop import (
    PEFT_CONFIG,
    PEFT_KEY,
    PEFT_WEIGHTS,
    NotExpressible,
    export_peft,
    from_peft_embeddings,
    import_peft,
    to_peft_embeddings,
)

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _prefix_from_tokens(arch, tmp_path, length=5):
    """A prefixtune prefix with realistic key/values: the model's own for some tokens."""
    pm = PrefixModel(tiny_model(arch))
    pm.set_prefix_key_values(pm.key_values_for_tokens(tokens(1, length, seed=5)[0]))
    folder = tmp_path / "prefix"
    pm.save_prefix(folder)
    return pm, folder


def _batch():
    """Two rows, the second left-padded by 3."""
    x = tokens(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    return x, mask


def _assert_same_logits(pm, peft_model, prefix=None):
    x, mask = _batch()
    kwargs = {} if prefix is None else {"prefix": prefix}
    with torch.no_grad():
        ours = pm(x, **kwargs).logits
        theirs = peft_model(input_ids=x).logits
        ours_masked = pm(x, attention_mask=mask, **kwargs).logits
        theirs_masked = peft_model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs_masked[0], ours_masked[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs_masked[1, 3:], ours_masked[1, 3:], atol=ATOL, rtol=0)
    return (theirs - ours).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_prefix_gives_peft_the_same_logits(arch, tmp_path):
    pm, folder = _prefix_from_tokens(arch, tmp_path)
    export_peft(folder, tmp_path / "peft", base_model="tiny/" + arch)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft").eval()
    _assert_same_logits(pm, peft_model)
    with torch.no_grad():  # the prefix matters: without it the logits differ clearly
        x, _ = _batch()
        assert (pm(x).logits - tiny_model(arch)(x).logits).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_generate_with_an_exported_prefix_is_what_compare_says(arch, tmp_path):
    """From PEFT 0.22 PEFT's ``generate`` applies an exported prefix and decodes the tokens prefixtune does;
    before, it does not (mostly the base model's tokens). compare's PEFT note (``peft_generates_with_prefix``)
    must say which."""
    pm = PrefixModel(tiny_model(arch))
    generator = torch.Generator().manual_seed(0)  # large enough to change every tiny family's greedy tokens
    shapes = [(k.shape, v.shape) for k, v in pm.key_values_for_tokens(tokens(1, 5, seed=5)[0])]
    pm.set_prefix_key_values([(10 * torch.randn(k, generator=generator), 10 * torch.randn(v, generator=generator))
                              for k, v in shapes])
    pm.save_prefix(tmp_path / "prefix")
    export_peft(tmp_path / "prefix", tmp_path / "peft", base_model="tiny/" + arch)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft").eval()
    x, mask = _batch()
    greedy = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=x, **greedy)
        ours = pm.generate(x, **greedy)
        base = tiny_model(arch).generate(x, **greedy)
    assert not torch.equal(ours, base)  # the prefix changes what is decoded
    assert torch.equal(theirs, ours) is peft_generates_with_prefix()
    assert bool(_peft_prefix_notes(None)) is not peft_generates_with_prefix()


def test_exported_reparameterized_prefix_is_folded(tmp_path):
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=4, reparam_hidden_size=16))
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.add_(torch.randn_like(p))
    pm.save_prefix(tmp_path / "prefix", keep_reparam=True)
    export_peft(tmp_path / "prefix", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert (config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"], config["token_dim"]) \
        == (4, 2, 2, 16)  # GQA: PEFT counts key/value heads
    _assert_same_logits(pm, peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft").eval())


@pytest.mark.parametrize("arch,projection", [("llama", True), ("gpt2", False), ("opt", True), ("gemma2", False)])
def test_imported_peft_prefix_gives_prefixtune_peft_logits(arch, projection, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(arch).save_pretrained(base_dir)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=projection,
                                     encoder_hidden_size=24)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(tiny_model(arch), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "prefix", base_model=str(base_dir))
    meta, _ = read_prefix(tmp_path / "prefix")
    assert meta["prefix"]["reparameterize"] is False and meta["prefix"]["prefix_length"] == 6
    pm = PrefixModel.from_pretrained(tiny_model(arch), tmp_path / "prefix")
    _assert_same_logits(pm, peft_model)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_round_trip_through_peft_is_exact(arch, tmp_path):
    pm, folder = _prefix_from_tokens(arch, tmp_path)
    base_dir = tmp_path / "base"
    tiny_model(arch).save_pretrained(base_dir)
    export_peft(folder, tmp_path / "peft", base_model=str(base_dir))
    import_peft(tmp_path / "peft", tmp_path / "back")  # base model from the adapter's config
    (_, before), (_, after) = read_prefix(folder), read_prefix(tmp_path / "back")
    assert torch.equal(before["key_values"], after["key_values"])
    back = PrefixModel.from_pretrained(tiny_model(arch), tmp_path / "back")
    x, mask = _batch()
    with torch.no_grad():
        assert torch.equal(back(x, attention_mask=mask).logits, pm(x, attention_mask=mask).logits)


def test_layout_conversion_is_a_permutation():
    kv = torch.randn(3, 2, 2, 5, 4)  # [layers, k/v, kv_heads, L_p, head_dim]
    flat = to_peft_embeddings(kv)
    assert flat.shape == (5, 3 * 2 * 2 * 4)
    # PEFT's get_prompt: view(L, layers * 2, heads, hd) per token; row 2*l + 1 is layer l's values
    assert torch.equal(flat.view(5, 6, 2, 4)[:, 2 * 1 + 1], kv[1, 1].transpose(0, 1))
    assert torch.equal(from_peft_embeddings(flat, 3, 2, 4), kv)


def test_base_model_name_is_recorded(tmp_path):
    _, folder = _prefix_from_tokens("llama", tmp_path)
    export_peft(folder, tmp_path / "a", base_model="org/base")
    assert json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())["base_model_name_or_path"] == "org/base"


# ---------------------------------------------------------------- refusals
def _saved(tmp_path, arch="llama", **config):
    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparameterize=False, **config))
    pm.save_prefix(tmp_path / "prefix")
    return tmp_path / "prefix"


def test_layer_subset_is_refused_by_name(tmp_path):
    with pytest.raises(NotExpressible, match=r"covers layers \[1\] of 2; PEFT puts a prefix in every layer"):
        export_peft(_saved(tmp_path, layers=(-1,)), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_unshifted_positions_are_refused_by_name(tmp_path):
    with pytest.raises(NotExpressible, match="shift_positions=False"):
        export_peft(_saved(tmp_path, shift_positions=False), tmp_path / "peft")


def test_encoder_and_cross_attention_prefixes_are_refused(tmp_path):
    shape = ModelShape("t5", num_layers=6, num_kv_heads=2, head_dim=8, groups={"encoder": 2, "decoder": 2, "cross": 2})
    meta = {"prefix": PrefixConfig(prefix_length=3, reparameterize=False).to_dict(), "layers": list(range(6)),
            "base": shape.to_dict(), "reparameterization_saved": False}
    write_prefix(tmp_path / "prefix", meta, {"key_values": torch.zeros(6, 2, 2, 3, 8)})
    with pytest.raises(NotExpressible, match="encoder, decoder, cross attention.*cross-attention prefixes cannot"):
        export_peft(tmp_path / "prefix", tmp_path / "peft")


def test_task_head_is_refused(tmp_path):
    folder = _saved(tmp_path)
    meta, tensors = read_prefix(folder)
    tensors["head.classifier.weight"] = torch.zeros(2, 32)
    write_prefix(folder, {k: v for k, v in meta.items() if k != "format"}, tensors)
    with pytest.raises(NotExpressible, match=r"task head \(classifier\)"):
        export_peft(folder, tmp_path / "peft")


def test_importing_a_lora_adapter_says_how_to_combine_it(tmp_path):
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(NotExpressible, match="peft_type is 'LORA'.*PrefixModel.wrap"):
        import_peft(tmp_path / "lora", tmp_path / "prefix", base_model="unused")


def test_importing_onto_the_wrong_base_names_the_mismatch(tmp_path):
    _, folder = _prefix_from_tokens("llama", tmp_path)
    export_peft(folder, tmp_path / "peft")
    other = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(other)
    with pytest.raises(ValueError, match=r"token_dim \(kv_heads \* head_dim\): adapter says 16, model has 32"):
        import_peft(tmp_path / "peft", tmp_path / "prefix", base_model=str(other))


def test_seq2seq_adapter_is_refused(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / PEFT_CONFIG).write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": 2}))
    with pytest.raises(NotExpressible, match="only decoder-only"):
        import_peft(tmp_path / "peft", tmp_path / "prefix", base_model="unused")


# ---------------------------------------------------------------- command line
def test_cli_export_then_import(tmp_path, capsys):
    _, folder = _prefix_from_tokens("llama", tmp_path)
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    assert main(["export-peft", str(folder), str(tmp_path / "peft"), "--base-model", str(base_dir)]) == 0
    assert (tmp_path / "peft" / PEFT_WEIGHTS).is_file()
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    assert "prefix written to" in capsys.readouterr().out
    assert torch.equal(read_prefix(tmp_path / "back")[1]["key_values"], read_prefix(folder)[1]["key_values"])


def test_cli_refusal_is_one_clear_line(tmp_path, capsys):
    folder = _saved(tmp_path, layers=(0,))
    assert main(["export-peft", str(folder), str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune export-peft: error:") and "covers layers [0] of 2" in err
    assert "\n" not in err


def test_peft_weights_key_is_prompt_embeddings(tmp_path):
    from safetensors.torch import load_file

    _, folder = _prefix_from_tokens("gpt2", tmp_path)
    export_peft(folder, tmp_path / "peft")
    assert list(load_file(tmp_path / "peft" / PEFT_WEIGHTS)) == [PEFT_KEY]


@pytest.mark.slow
def test_real_bundled_model_round_trip_through_peft(tmp_path):
    """SmolLM2-135M (30 layers, 9 query / 3 key-value heads): export, PEFT forward, import back."""
    from prefixtune.base_models import BUNDLED_NAME, load_model

    model, tokenizer = load_model()
    pm = PrefixModel(model)
    pm.set_prefix_key_values(pm.key_values_for_tokens(tokenizer("Describe the restaurant:", return_tensors="pt")
                                                      .input_ids[0]))
    pm.save_prefix(tmp_path / "prefix")
    batch = tokenizer(["name[The Eagle], food[French]", "name[Zizzi]"], return_tensors="pt", padding=True,
                      padding_side="left")
    with torch.no_grad():
        ours = pm(**batch).logits
    export_peft(tmp_path / "prefix", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())["base_model_name_or_path"] == BUNDLED_NAME
    peft_model = peft.PeftModel.from_pretrained(pm.unwrap(), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[valid], ours[valid], atol=ATOL, rtol=0)
    import_peft(tmp_path / "peft", tmp_path / "back")  # resolves the bundled model's recorded name
    back, saved = read_prefix(tmp_path / "back")[1], read_prefix(tmp_path / "prefix")[1]
    assert torch.equal(back["key_values"], saved["key_values"])
