"""The memory prefix (``PrefixConfig(kind="memory")``): a term ``φ(q)ᵀ M`` on each head's output.

With ``M = 0`` every family is its base model exactly; each row of a batch that mixes a key/value
prefix, a memory prefix and none equals that row run alone (logits, in training mode, and greedy
``generate``); gradients reach the memory only; saved, loaded and through Trainer checkpoints it
gives the same logits; decoding with the cache gives what the full forward gives."""

import pytest
import torch
from tiny import (ARCHS, ENCODERS, SEQ2SEQ, assert_same, tiny_encoder, tiny_model, tiny_seq2seq, tokens)

from prefixtune import PrefixConfig, PrefixModel
from prefixtune import memory as memory_module
from prefixtune.memory import MemoryPrefix, add_memory_term, folded, memory_term

MEMORY = PrefixConfig(kind="memory")
KV = PrefixConfig(prefix_length=3, reparameterize=False, init_std=0.5)


def _randomize(pm: PrefixModel, name: str, std: float = 1.0, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pm.prefixes[name].parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _both(model) -> PrefixModel:
    """``model`` with a memory prefix "mem" (random, not zero) and a key/value prefix "kv"."""
    pm = PrefixModel.wrap(model, MEMORY, name="mem")
    pm.add_prefix("kv", KV)
    _randomize(pm, "mem")
    return pm


@pytest.mark.parametrize("name", ARCHS)
def test_a_zero_memory_is_the_base_model_exactly(name):
    model = tiny_model(name)
    x = tokens(3, 9)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # a left-padded row too
    with torch.no_grad():
        base = model(input_ids=x, attention_mask=mask).logits
        pm = PrefixModel.wrap(model, MEMORY)
        assert isinstance(pm.prefixes["default"], MemoryPrefix)
        assert torch.equal(pm(input_ids=x, attention_mask=mask).logits, base)
        _randomize(pm, "default")
        assert not torch.allclose(pm(input_ids=x, attention_mask=mask).logits, base, atol=1e-3)


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_a_zero_memory_is_the_base_encoder_decoder_exactly_on_every_attention(name):
    model = tiny_seq2seq(name)
    x, y = tokens(2, 7), tokens(2, 5, seed=2)
    with torch.no_grad():
        base = model(input_ids=x, decoder_input_ids=y).logits
        pm = PrefixModel.wrap(model, MEMORY)
        assert len(pm.prefixes["default"].layers) == pm.shape.num_layers  # encoder, decoder and cross attention
        assert torch.equal(pm(input_ids=x, decoder_input_ids=y).logits, base)
        for target in ("encoder", "decoder", "cross"):  # each attention takes it
            pm.add_prefix(target, PrefixConfig(kind="memory", targets=(target,)))
            _randomize(pm, target)
            assert not torch.allclose(pm(input_ids=x, decoder_input_ids=y, prefix=target).logits, base, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_a_zero_memory_is_the_base_encoder_exactly(name):
    model = tiny_encoder(name)
    x = tokens(2, 7)
    with torch.no_grad():
        base = model(input_ids=x).logits
        assert torch.equal(PrefixModel.wrap(model, MEMORY)(input_ids=x).logits, base)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "gemma2"])
def test_each_row_of_a_mixed_batch_is_that_row_alone_in_training_mode(name):
    """One row with a key/value prefix, one with a memory, one with none, in one forward pass."""
    pm = _both(tiny_model(name)).train()
    x = tokens(3, 8)
    names = ["kv", "mem", None]
    mixed = pm(input_ids=x, labels=x, prefix=names).logits
    for row, prefix in enumerate(names):
        alone = pm(input_ids=x[row:row + 1], prefix=prefix).logits
        assert_same(mixed[row], alone[0])


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_each_row_of_a_mixed_batch_generates_as_it_does_alone(name):
    pm = _both(tiny_model(name))
    x = tokens(3, 6)
    names = ["mem", "kv", None]
    mixed = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=names, max_new_tokens=6,
                        do_sample=False, pad_token_id=0)
    for row, prefix in enumerate(names):
        alone = pm.generate(input_ids=x[row:row + 1], attention_mask=torch.ones_like(x[row:row + 1]), prefix=prefix,
                            max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[row], alone[0]), (row, prefix)


@pytest.mark.parametrize("names", [["mem", "mem"], ["mem", "kv", None]])
def test_beam_search_with_a_memory_gives_each_row_what_it_gives_alone(names):
    """Beam search and ``num_return_sequences`` repeat each row; its memory (one for every row, or one per row)
    goes with it."""
    pm = _both(tiny_model("llama"))
    x = tokens(len(names), 6)
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                pad_token_id=0)
    prefix = names[0] if len(set(names)) == 1 else names
    batched = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=prefix, **beam)
    for row, name in enumerate(names):
        alone = pm.generate(input_ids=x[row:row + 1], attention_mask=torch.ones_like(x[row:row + 1]), prefix=name,
                            **beam)
        assert torch.equal(batched[2 * row:2 * row + 2], alone), (row, name)
    assert not torch.equal(batched, pm.generate(input_ids=x, attention_mask=torch.ones_like(x), prefix=None, **beam))


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_decoding_with_the_cache_gives_what_the_full_forward_gives(name):
    """The term depends on the current query alone: each step's scores equal a forward over all tokens."""
    pm = _both(tiny_model(name))
    x = tokens(2, 5)
    out = pm.generate(input_ids=x, prefix="mem", max_new_tokens=5, do_sample=False, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = pm(input_ids=out.sequences[:, :-1], prefix="mem").logits
    for step, scores in enumerate(out.scores):
        assert_same(scores, full[:, x.shape[1] - 1 + step])


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_an_encoder_decoder_decodes_with_its_memory_what_the_full_forward_gives(name):
    """Decoding steps add the term to the decoder's self- and cross-attention in place; each step's scores
    equal a forward over the whole decoded sequence with gradients on, which takes the general path (the
    end-of-sequence column, held off by ``min_new_tokens``, aside)."""
    pm = PrefixModel.wrap(tiny_seq2seq(name), MEMORY, name="mem")
    _randomize(pm, "mem", std=0.5)
    x = tokens(2, 7)
    out = pm.generate(input_ids=x, prefix="mem", max_new_tokens=4, min_new_tokens=4, do_sample=False,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    full = pm(input_ids=x, decoder_input_ids=out.sequences[:, :-1], prefix="mem").logits.detach()
    with torch.no_grad():
        base = pm(input_ids=x, decoder_input_ids=out.sequences[:, :-1], prefix=None).logits
    assert len(out.scores) == 4
    for step, scores in enumerate(out.scores):
        kept = torch.isfinite(scores)
        assert_same(scores[kept], full[:, step][kept])
    assert not torch.allclose(full, base, atol=1e-4)


def test_only_the_memory_trains_and_the_base_stays_bit_identical():
    pm = PrefixModel.wrap(tiny_model("llama"), MEMORY).train()
    base = {k: v.clone() for k, v in pm.model.state_dict().items()}
    assert [p is pm.prefixes["default"].memory for p in pm.trainable_parameters()] == [True]
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    x = tokens(2, 8)
    pm(input_ids=x, labels=x).loss.backward()
    assert pm.prefixes["default"].memory.grad.abs().sum() > 0  # a zero memory still gets a gradient
    assert all(p.grad is None for p in pm.model.parameters())
    optimizer.step()
    assert all(torch.equal(v, base[k]) for k, v in pm.model.state_dict().items())
    assert pm.prefixes["default"].memory.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        pm = _both(tiny_model("llama")).train()
        if checkpointing:
            pm.activation_checkpointing_enable()
        x = tokens(2, 8)
        loss = pm(input_ids=x, labels=x, prefix="mem").loss
        loss.backward()
        results.append((loss.detach(), pm.prefixes["mem"].memory.grad.clone()))
    assert_same(results[1][0], results[0][0])
    assert_same(results[1][1], results[0][1])


def test_layers_choose_the_sites_that_get_a_memory():
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(kind="memory", layers=(-1,)))
    assert pm.prefixes["default"].layers == (1,) and pm.prefixes["default"].memory.shape == (1, 2, 8, 8)
    batch = pm.prefix_batch("default", 2)
    assert batch.memory_at(0) is None and batch.memory_at(1).shape == (1, 2, 9, 8) and batch.kv_layers == frozenset()


def test_bf16_autocast_runs_and_stays_close():
    pm = _both(tiny_model("llama"))
    x = tokens(2, 8)
    with torch.no_grad():
        full = pm(input_ids=x, prefix="mem").logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = pm(input_ids=x, prefix="mem").logits
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_saved_and_loaded_it_gives_the_same_logits(tmp_path):
    pm = _both(tiny_model("llama"))
    x = tokens(2, 8)
    with torch.no_grad():
        before = pm(input_ids=x, prefix="mem").logits
    pm.save_prefix(tmp_path / "mem", name="mem")
    loaded = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path / "mem")
    assert loaded.prefixes["default"].config.kind == "memory"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, before)
    with pytest.raises(ValueError, match="is a memory prefix: it has no key/values"):
        loaded.prefix_key_values()


def test_the_term_reads_each_query_head_s_key_value_group():
    """Two query heads per key/value head: head h reads memory h // 2, as it reads keys h // 2."""
    query = torch.randn(1, 4, 3, 8)
    memory = torch.zeros(1, 2, 8, 8)
    memory[0, 1] = torch.randn(8, 8)
    term = memory_term(query, folded(memory), scaling=8 ** -0.5)  # [B, T, heads, head_dim]
    assert term.shape == (1, 3, 4, 8)
    assert torch.equal(term[:, :, :2], torch.zeros(1, 3, 2, 8)) and term[:, :, 2:].abs().sum() > 0


@pytest.mark.parametrize("per_head_rows", [0, 10**9], ids=["per-head", "per-group"])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_term_is_phi_of_the_query_times_the_memory(rows, per_head_rows, monkeypatch):
    """Against the formula written out: ``((elu(q * s) + 1) / d) @ M`` per query head and its group's memory,
    for one memory shared by every row and for one per row, on a query in either layout, with the products
    laid out per head (long inputs) and per key/value group (decoding), and its gradients the same both ways."""
    monkeypatch.setattr(memory_module, "PER_HEAD_ROWS", per_head_rows)
    torch.manual_seed(0)
    batch, heads, groups, length, d, s = 3, 6, 2, 5, 8, 0.3
    memory = torch.randn(rows, groups, d, d)
    for query in (torch.randn(batch, heads, length, d), torch.randn(batch, length, heads, d).transpose(1, 2)):
        phi = (torch.nn.functional.elu(query * s) + 1) / d  # [B, heads, T, d]
        expected = torch.stack([phi[:, h] @ memory[:, h // (heads // groups)] for h in range(heads)], dim=2)
        assert_same(memory_term(query, folded(memory), s), expected)
    query = torch.randn(batch, heads, length, d, requires_grad=True)
    folded_memory = folded(memory).requires_grad_()
    memory_term(query, folded_memory, s).square().sum().backward()
    monkeypatch.setattr(memory_module, "PER_HEAD_ROWS", 10**9 - per_head_rows)  # the other layout
    other_query, other_memory = query.detach().requires_grad_(), folded_memory.detach().requires_grad_()
    memory_term(other_query, other_memory, s).square().sum().backward()
    assert_same(query.grad, other_query.grad)
    assert_same(folded_memory.grad, other_memory.grad)


@pytest.mark.parametrize("batch,rows", [(3, 1), (3, 3), (1, 1)], ids=["shared", "per-row", "one-row"])
def test_a_decoding_step_adds_in_place_the_term_memory_term_gives(batch, rows):
    """One query per row, no gradients (``generate``): the term goes into the output where it lies, with the
    numbers of the general path, for one memory shared by the rows, one per row, and a single row, each query
    head reading its key/value group's memory; the buffers kept in ``scratch`` serve the next layer (another
    memory) and step. With gradients, or several queries, a new tensor."""
    torch.manual_seed(0)
    heads, groups, d, s = 6, 2, 8, 0.3
    scratch = {}
    for _ in range(3):
        memory = folded(torch.randn(rows, groups, d, d))
        query = torch.randn(batch, 1, heads, d).transpose(1, 2)  # [B, heads, 1, d], as attention gets it
        output = torch.randn(batch, 1, heads, d)
        expected = output + memory_term(query, memory, s)
        with torch.no_grad():
            added = add_memory_term(output, query, memory, s, scratch)
        assert added is output and len(scratch) == 1
        torch.testing.assert_close(added, expected, rtol=1e-6, atol=1e-6)
    output = torch.randn(batch, 1, heads, d)
    assert add_memory_term(output, query, memory, s, scratch) is not output  # gradients on: autograd's tensors
    with torch.no_grad():
        query, output = torch.randn(batch, heads, 2, d), torch.randn(batch, 2, heads, d)
        assert add_memory_term(output, query, memory, s, scratch) is not output
        if batch > 1:  # memories for some rows only: refused, never read as one shared memory
            with pytest.raises(RuntimeError):
                add_memory_term(torch.randn(batch, 1, heads, d), torch.randn(batch, heads, 1, d),
                                folded(torch.randn(batch - 1, groups, d, d)), s, {})


def test_config_refuses_words_for_a_memory():
    with pytest.raises(ValueError, match="memory prefix starts at zero"):
        PrefixConfig(kind="memory", init_text="table-to-text:")
    with pytest.raises(ValueError, match="prefix.kind"):
        PrefixConfig(kind="both")


def test_beside_lora_both_train(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    pm = PrefixModel.wrap(model, MEMORY).train()
    x = tokens(2, 8)
    pm(input_ids=x, labels=x).loss.backward()
    trained = [p for p in pm.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert pm.prefixes["default"].memory in trained and any(p is q for p in pm.adapter_params for q in trained)


def test_peft_export_refuses_it_by_name(tmp_path):
    pytest.importorskip("peft")
    from prefixtune.peft.interop import NotExpressible, export_peft

    PrefixModel.wrap(tiny_model("llama"), MEMORY).save_prefix(tmp_path / "mem")
    with pytest.raises(NotExpressible, match="it is a memory prefix"):
        export_peft(tmp_path / "mem", tmp_path / "peft")
