"""What training needs from the engine: gradients reach the prefix and nothing else,
gradient checkpointing changes nothing, dtypes and autocast work."""

import pytest
import torch
from tiny import ARCHS, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.config import TrainConfig


def _loss_and_grads(pm, x):
    pm.zero_grad(set_to_none=True)
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in pm.trainable_parameters()]


@pytest.mark.parametrize("reparameterize", [True, False])
def test_only_prefix_parameters_receive_gradients(reparameterize):
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparameterize=reparameterize, reparam_hidden_size=16))
    pm.train()
    x = tokens(2, 8)
    pm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.trainable_parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    prefix_ids = {id(p) for p in pm.trainable_parameters()}
    assert {id(p) for p in pm.parameters() if p.requires_grad} == prefix_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "opt"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(arch):
    model = tiny_model(arch)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=16))
    pm.train()
    x = tokens(2, 8)
    loss, grads = _loss_and_grads(pm, x)
    pm.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(pm, x)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    for got, want in zip(grads_ckpt, grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_mixed_batch_trains_each_prefix_on_its_own_rows():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparameterize=False), name="a")
    pm.add_prefix("b", PrefixConfig(prefix_length=3, reparameterize=False))
    x = tokens(2, 6)
    pm(input_ids=x, labels=x, prefix=["a", None]).loss.backward()
    assert pm.prefixes["a"].key_values.grad.abs().sum() > 0
    assert pm.prefixes["b"].key_values.grad is None


def test_prefix_dropout_is_active_in_training_only():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparameterize=False, dropout=0.5, init_std=1.0))
    x = tokens(1, 6)
    pm.eval()
    with torch.no_grad():
        first, second = pm(input_ids=x).logits, pm(input_ids=x).logits
    assert torch.equal(first, second)
    pm.train()
    with torch.no_grad():
        dropped = pm(input_ids=x).logits
    assert not torch.allclose(dropped, first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_base_model_in_half_precision(dtype):
    model = tiny_model("llama").to(dtype)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=16))
    x = tokens(2, 6)
    out = pm(input_ids=x, labels=x)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in pm.trainable_parameters())


def test_bf16_autocast_trains_the_prefix():
    model = tiny_model("qwen3")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=16))
    x = tokens(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in pm.trainable_parameters())


def test_a_few_steps_of_adamw_lower_the_loss():
    model = tiny_model("llama")
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=32))
    pm.train()
    x = tokens(4, 10)
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def _padded_batch():
    """Three rows of 9, 5 and 3 tokens, right-padded as training pads them, prompts unscored."""
    from prefixtune import data

    x = tokens(3, 9, seed=5)
    rows = [{"input_ids": x[i, :n].tolist(), "labels": [-100] * 2 + x[i, 2:n].tolist()} for i, n in enumerate((9, 5, 3))]
    return data.collate(rows, pad_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_right_padded_batch_trains_the_same_without_its_mask(arch):
    """prefixtune train drops the padding mask of a decoder-only model's batch (the padding
    comes after every real token, which causal attention never looks at): same loss and
    prefix gradients, whichever attention path the mask-free call then takes."""
    from prefixtune.train import causal_batch

    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparam_hidden_size=16)).train()
    batch = _padded_batch()
    assert causal_batch(pm, batch)["attention_mask"] is None
    results = []
    for b in (batch, causal_batch(pm, batch)):
        pm.zero_grad(set_to_none=True)
        loss = pm(**b, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in pm.trainable_parameters()])))
    (loss, grad), (loss_free, grad_free) = results
    assert torch.allclose(loss_free, loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_free, grad, rtol=1e-4, atol=1e-6)


def test_the_padding_mask_stays_where_it_matters():
    from tiny import tiny_encoder, tiny_seq2seq

    from prefixtune.train import causal_batch

    batch = _padded_batch()
    for model in (tiny_seq2seq("t5"), tiny_encoder("bert")):
        pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparam_hidden_size=16))
        assert causal_batch(pm, batch) is batch


def test_width_scaled_rates_put_the_mlp_matrices_at_the_rate_over_the_width():
    """``reparam_lr="width"`` (muP): the MLP's two weight matrices at lr / width, everything else at lr;
    the groups cover what trains exactly once, and ``"same"`` is one group at the rate."""
    from prefixtune.schedule import optimizer_for

    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, reparam_hidden_size=16, reparam_lr="width"))
    groups = pm.parameter_groups()
    encoder = pm.prefixes["default"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1 / 16]
    assert {id(p) for p in groups[1]["params"]} == {id(encoder.mlp[0].weight), id(encoder.mlp[2].weight)}
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, pm.trainable_parameters()))
    optimizer, _ = optimizer_for(groups, 3e-2, TrainConfig(warmup_steps=0), 10)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-2, 3e-2 / 16]
    assert PrefixConfig().reparam_lr == "width"  # the default (prefixtune.recipe)
    same = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, reparam_hidden_size=16, reparam_lr="same"))
    assert [g["lr_scale"] for g in same.parameter_groups()] == [1.0]
