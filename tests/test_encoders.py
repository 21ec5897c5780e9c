"""Encoder-only models (BERT, RoBERTa, DistilBERT) with a classification head (P-Tuning v2).

The prefix enters every self-attention of the encoder; the task head trains with it and is
saved in the same artifact; nothing else of the base model trains.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import assert_same, ENCODERS, tiny_encoder, tokens

from prefixtune import PrefixConfig, PrefixModel

ARCHS = sorted(ENCODERS)
FLAT = dict(prefix_length=3, reparameterize=False, init_std=0.5)


def _inputs(rows: int = 3) -> dict:
    x = tokens(rows, 8)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0  # right padding, as tokenizers of encoders pad
    return {"input_ids": x, "attention_mask": mask}


@pytest.mark.parametrize("name", ARCHS)
def test_only_the_prefix_and_the_head_train(name):
    pm = PrefixModel.wrap(tiny_encoder(name), PrefixConfig(prefix_length=3))
    head_names = {f"model.{n}" for n in pm.heads}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in pm.named_parameters()
                         if n.startswith("prefixes.") or any(n.startswith(h + ".") for h in head_names)}
    assert {id(p) for p in pm.trainable_parameters()} == {id(p) for n, p in pm.named_parameters() if n in trainable}
    frozen = {n: p.detach().clone() for n, p in pm.model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    inputs, labels = _inputs(), torch.tensor([0, 2, 1])
    pm.train()
    losses = []
    for _ in range(40):
        loss = pm(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.3
    assert all(torch.equal(p, frozen[n]) for n, p in pm.model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", ARCHS)
def test_rows_without_a_prefix_are_the_base_model(name):
    pm = PrefixModel.wrap(tiny_encoder(name), PrefixConfig(**FLAT))
    inputs = _inputs()
    with torch.no_grad():
        base = pm.model(**inputs).logits
        assert torch.equal(pm(**inputs, prefix=None).logits, base)
        mixed = pm(**inputs, prefix=["default", None, "default"]).logits
        prefixed = pm(**inputs).logits
    assert_same(mixed[1], base[1])
    assert_same(mixed[[0, 2]], prefixed[[0, 2]])
    assert not torch.allclose(prefixed, base, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_padding_keys_stay_hidden_with_a_prefix(name):
    """Changing the tokens under the padding must not change a padded row's logits."""
    pm = PrefixModel.wrap(tiny_encoder(name), PrefixConfig(**FLAT))
    inputs = _inputs()
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][0, 5:] = 7
    with torch.no_grad():
        assert_same(pm(**changed).logits[0], pm(**inputs).logits[0])


@pytest.mark.parametrize("name", ARCHS)
def test_save_then_load_restores_prefix_and_head(name, tmp_path):
    pm = PrefixModel.wrap(tiny_encoder(name), PrefixConfig(prefix_length=3))
    with torch.no_grad():
        for head in pm.heads.values():
            for p in head.parameters():
                p.add_(torch.randn_like(p))  # a head unlike a fresh model's
        before = pm(**_inputs()).logits
    pm.save_prefix(tmp_path)
    loaded = PrefixModel.from_pretrained(tiny_encoder(name), tmp_path)  # the head as first built
    with torch.no_grad():
        assert_same(loaded(**_inputs()).logits, before)


def test_a_head_for_other_labels_or_no_head_is_refused(tmp_path):
    PrefixModel.wrap(tiny_encoder("bert", num_labels=3), PrefixConfig(prefix_length=3)).save_prefix(tmp_path)
    with pytest.raises(ValueError, match="task head 'classifier' does not fit the model"):
        PrefixModel.from_pretrained(tiny_encoder("bert", num_labels=2), tmp_path)
    bare = tf.BertModel(ENCODERS["bert"]()).eval()
    with pytest.raises(ValueError, match="carries a task head \\(classifier\\) that the model lacks"):
        PrefixModel.from_pretrained(bare, tmp_path)


@pytest.mark.parametrize("name", ARCHS)
def test_token_classification_trains_prefix_and_head(name):
    pm = PrefixModel.wrap(tiny_encoder(name, task="token", num_labels=5), PrefixConfig(**FLAT))
    inputs = _inputs()
    labels = tokens(3, 8, seed=4) % 5
    labels[0, 5:] = -100
    loss = pm(**inputs, labels=labels).loss
    loss.backward()
    assert pm.prefixes["default"].key_values.grad.abs().flatten(1).sum(1).gt(0).all()
    assert all(p.grad is not None for head in pm.heads.values() for p in head.parameters())
    assert all(p.grad is None for n, p in pm.model.named_parameters() if not p.requires_grad)


