"""The chunked language-model loss (prefixtune.lm_loss) equals transformers' own, in value and
in the prefix's gradients, for every decoder family where it is used; it is not used where
it would differ; and training takes it."""

import pytest
import torch
from tiny import ARCHS, VOCAB, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel, lm_loss
from prefixtune.lm_loss import causal_lm_loss, chunk_bounds


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", VOCAB * 5)  # 5 rows per chunk: a batch spans several


def _loss_and_grads(pm, return_logits, **kw):
    x = tokens(3, 9)
    labels = x.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    labels[2, -2:] = -100  # padding at the end
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=x, attention_mask=torch.ones_like(x), labels=labels, return_logits=return_logits, **kw)
    out.loss.backward()
    return out, torch.cat([p.grad.flatten() for p in pm.trainable_parameters()])


def _wrapped(arch):
    pm = PrefixModel.wrap(tiny_model(arch), PrefixConfig(prefix_length=3, reparam_hidden_size=16))
    return pm.train()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("items", [None, 17])
def test_loss_and_prefix_gradients_equal_the_models_own(arch, items):
    pm = _wrapped(arch)
    kw = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    full, full_grad = _loss_and_grads(pm, True, **kw)
    chunked, chunked_grad = _loss_and_grads(pm, False, **kw)
    assert full.logits is not None
    assert (chunked.logits is None) == (arch != "gemma2")  # Gemma 2 soft-caps its logits: the model's loss
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_equal_under_gradient_checkpointing():
    pm = _wrapped("llama")
    full, full_grad = _loss_and_grads(pm, True)
    pm.activation_checkpointing_enable()
    chunked, chunked_grad = _loss_and_grads(pm, False)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_against_a_plain_cross_entropy_with_a_biased_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11).requires_grad_(False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 2] = -100
    expected = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    loss = causal_lm_loss(hidden, head, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    with torch.no_grad():  # no gradient wanted: none is computed, the value is the same
        torch.testing.assert_close(causal_lm_loss(hidden, head, labels), expected.detach())


def test_not_used_where_the_head_trains():
    model = tiny_model("llama").requires_grad_(False)
    assert lm_loss.head_of(model) is model.lm_head
    model.lm_head.weight.requires_grad_(True)
    assert lm_loss.head_of(model) is None


def test_equal_with_lora_beside_the_prefix():
    import peft

    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparam_hidden_size=16)).train()
    full, full_grad = _loss_and_grads(pm, True)
    chunked, chunked_grad = _loss_and_grads(pm, False)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rows", [1, 4, 5, 6, 11, 21, 27, 100])
def test_chunks_are_as_few_as_the_limit_allows_and_of_nearly_one_size(rows):
    bounds = chunk_bounds(rows, VOCAB)  # at most 5 rows per chunk (the fixture above)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == rows
    assert len(sizes) == -(-rows // 5) and max(sizes) <= 5 and max(sizes) - min(sizes) <= 1


def test_the_bundled_models_rows_chunk_evenly(monkeypatch):
    monkeypatch.undo()  # the real limit: 1365 rows of a 49,152-word vocabulary
    assert chunk_bounds(1024, 49152) == [0, 1024]  # 8 x 128 tokens: one chunk
    assert chunk_bounds(4096, 49152) == [0, 1024, 2048, 3072, 4096]  # 8 x 512: four of 1024, not 3 x 1365 + 1


def test_evaluation_loss_without_the_logits_equals_the_models_own(monkeypatch):
    """``evaluate.completion_loss`` (``prefixtune evaluate``, validation during training) takes the
    chunked loss by default; with ragged rows and unscored prompts it equals the model's own."""
    from prefixtune import evaluate

    calls = []
    apply = lm_loss.LinearCrossEntropy.apply
    monkeypatch.setattr(lm_loss.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or apply(*a))
    pm = _wrapped("llama").eval()
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * 2 + list(range(5, 3 + n))} for n in (5, 9, 7, 4)]
    chunked = evaluate.completion_loss(pm, rows, 0, batch_size=3, prefix="default")
    assert len(calls) == 2  # two batches, both chunked
    full = evaluate.completion_loss(pm, rows, 0, batch_size=3, prefix="default", return_logits=True)
    assert len(calls) == 2 and chunked == pytest.approx(full, rel=1e-6) and chunked > 0
