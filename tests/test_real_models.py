"""The engine on the real bundled model (SmolLM2-135M-Instruct: Llama, 30 layers,
grouped-query attention). Marked ``real``; still run in CI."""

import pytest
import torch

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.base_models import BUNDLED_NAME, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    return load_model()


def test_bundled_model_loads_as_a_float_llama(bundled):
    model, tokenizer = bundled
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.dtype == torch.float32 and model.config.name_or_path == BUNDLED_NAME
    assert tokenizer.pad_token is not None


def test_parity_and_generation_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    p = tokenizer("Describe the restaurant in one sentence:", return_tensors="pt").input_ids[0]
    x = tokenizer(["name[The Eagle], food[French]", "name[Zizzi], area[riverside]"],
                  return_tensors="pt", padding=True, padding_side="right")
    full = torch.cat([p.expand(2, -1), x.input_ids], 1)
    full_mask = torch.cat([torch.ones(2, p.numel(), dtype=torch.long), x.attention_mask], 1)
    with torch.no_grad():
        expected = model(input_ids=full, attention_mask=full_mask).logits[:, p.numel():]
        plain_gen = model.generate(input_ids=full[:1], max_new_tokens=8, do_sample=False)[0, full.shape[1]:]
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=p.numel(), reparameterize=False))
    try:
        pm.set_prefix_key_values(pm.key_values_for_tokens(p))
        with torch.no_grad():
            got = pm(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
        keep = x.attention_mask.bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
        gen = pm.generate(input_ids=x.input_ids[:1], max_new_tokens=8, do_sample=False)[0, x.input_ids.shape[1]:]
        assert torch.equal(gen, plain_gen)
        pm.add_prefix("other", PrefixConfig(prefix_length=p.numel(), reparameterize=False, init_std=2.0))
        other = pm.generate(input_ids=x.input_ids[:1], max_new_tokens=8, do_sample=False, prefix="other")
        assert not torch.equal(other[0, x.input_ids.shape[1]:], gen)
    finally:
        pm.unwrap()


def test_init_from_text_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    cfg = PrefixConfig(prefix_length=8, init="text", init_text="Write a restaurant description:")
    pm = PrefixModel.wrap(model, cfg, tokenizer=tokenizer)
    try:
        assert pm.prefixes["default"].init_fit_error < 0.02
        assert sum(p.numel() for p in pm.trainable_parameters()) > 0
    finally:
        pm.unwrap()


def test_the_readme_python_example_runs_as_written(bundled, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    pm = namespace["pm"]
    assert set(pm.prefixes) == {"default", "legal"} and (tmp_path / "out" / "prefix.safetensors").is_file()
    pm.unwrap()
