"""Prefix + LoRA and prefix + QLoRA: ``peft.get_peft_model(model, LoraConfig)``
then ``PrefixModel.wrap``. Exactly the prefix and the LoRA weights train, gradient
checkpointing changes nothing, and saving writes both parts, which load back to identical
logits. QLoRA runs a 4-bit bitsandbytes base where bitsandbytes is installed."""

import pytest
import torch
import transformers as tf
from tiny import ROPE, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.artifacts import CONFIG_FILE, WEIGHTS_FILE
from prefixtune.peft.lora import ADAPTER_DIR

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"]}


def _lora_prefix(arch="llama", model=None, **lora):
    model = model if model is not None else tiny_model(arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0, **lora)
    return PrefixModel.wrap(peft.get_peft_model(model, config), PrefixConfig(prefix_length=4, reparam_hidden_size=16))


def _train(pm, steps=3, lr=1e-2):
    x = tokens(2, 8).to(pm.device)
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


def _named(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters()}


def test_prefix_and_lora_train_and_nothing_else():
    pm = _lora_prefix()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prefixes.") or ".lora_" in n for n in trainable)
    assert {n for n in trainable if ".lora_A." in n} and {n for n in trainable if ".lora_B." in n}
    assert {id(p) for p in pm.trainable_parameters()} == {id(p) for p in pm.parameters() if p.requires_grad}
    before = _named(pm)
    losses = _train(pm)
    assert losses[-1] < losses[0]
    after = _named(pm)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # LoRA B starts at zero, so A moves only from step 2 on: 3 steps move all


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_prefix_with_lora_on_other_layouts_saves_and_loads(arch, tmp_path):
    pm = _lora_prefix(arch, fan_in_fan_out=arch == "gpt2")
    _train(pm, steps=2)
    pm.save_prefix(tmp_path)
    loaded = PrefixModel.from_pretrained(tiny_model(arch), tmp_path)
    x = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, pm(x).logits)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x = tokens(2, 8)
    results = []
    for checkpointing in (False, True):
        pm = _lora_prefix()
        with torch.no_grad():  # a non-zero LoRA B, so that every LoRA weight has a gradient
            for name, p in pm.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.1)
        if checkpointing:
            pm.activation_checkpointing_enable()
        pm.train()
        loss = pm(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in pm.trainable_parameters()]))
    (loss, grads), (loss_gc, grads_gc) = results
    torch.testing.assert_close(loss_gc, loss, atol=1e-6, rtol=0)
    assert all(g.abs().sum() > 0 for g in grads_gc)
    for g, g_gc in zip(grads, grads_gc):
        torch.testing.assert_close(g_gc, g, atol=1e-6, rtol=1e-5)


def test_save_writes_the_prefix_and_a_peft_adapter(tmp_path):
    pm = _lora_prefix()
    _train(pm)
    pm.save_prefix(tmp_path)
    assert {CONFIG_FILE, WEIGHTS_FILE, ADAPTER_DIR} <= {f.name for f in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (tmp_path / ADAPTER_DIR).iterdir()}
    # the LoRA part is a plain PEFT adapter: PEFT alone loads it
    alone = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / ADAPTER_DIR)
    ours = dict(pm.model.named_parameters())
    for name, p in alone.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, ours[name])


def test_from_pretrained_restores_both_parts_with_identical_logits(tmp_path):
    pm = _lora_prefix()
    _train(pm)
    pm.save_prefix(tmp_path)
    loaded = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not any(p.requires_grad for p in loaded.model.parameters())  # loaded for inference
    x, mask = tokens(2, 7), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        assert torch.equal(loaded(x, attention_mask=mask).logits, pm(x, attention_mask=mask).logits)
        without_lora = PrefixModel.from_pretrained(tiny_model("llama"), tmp_path)
        without_lora.model.disable_adapter_layers()
        assert (without_lora(x).logits - pm(x).logits).abs().max() > 1e-4  # the LoRA part matters


def test_load_prefix_brings_back_the_lora_weights_trained_with_it(tmp_path):
    pm = _lora_prefix()
    _train(pm)
    pm.save_prefix(tmp_path)
    x = tokens(2, 7)
    with torch.no_grad():
        saved = pm(x).logits
    _train(pm)  # both parts move on
    pm.load_prefix(tmp_path)  # e.g. restoring the best checkpoint
    with torch.no_grad():
        assert torch.equal(pm(x).logits, saved)
    assert all(p.requires_grad for p in pm.adapter_params)  # still training


def test_continue_training_from_a_saved_prefix_and_adapter(tmp_path):
    pm = _lora_prefix()
    _train(pm)
    pm.save_prefix(tmp_path, keep_reparam=True)
    model = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / ADAPTER_DIR, is_trainable=True)
    resumed = PrefixModel.from_pretrained(model, tmp_path)
    assert resumed.adapter_params and all(p.requires_grad for p in resumed.adapter_params)
    x = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(resumed(x).logits, pm(x).logits)


def test_a_prefix_trained_with_lora_is_not_loaded_without_it(tmp_path):
    pm = _lora_prefix()
    pm.save_prefix(tmp_path)
    with pytest.raises(ValueError, match="trained together with a PEFT adapter.*PrefixModel.from_pretrained"):
        PrefixModel(tiny_model("llama")).load_prefix(tmp_path)


def test_a_prefix_trained_with_lora_is_not_exported_to_peft_alone(tmp_path):
    from prefixtune.peft.interop import NotExpressible, export_peft

    _lora_prefix().save_prefix(tmp_path / "prefix")
    with pytest.raises(NotExpressible, match="trained together with the LoRA adapter.*not both"):
        export_peft(tmp_path / "prefix", tmp_path / "peft")


def test_generate_with_lora_continues_as_greedy_forward_does():
    pm = _lora_prefix()
    _train(pm)
    x = tokens(1, 5)
    with torch.no_grad():
        out = pm.generate(x, max_new_tokens=4, do_sample=False)
        manual = x
        for _ in range(4):
            manual = torch.cat([manual, pm(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, manual)


def test_peft_prompt_learning_model_is_refused():
    prompt = peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match="PREFIX_TUNING.*import-peft"):
        PrefixModel(prompt)


def test_several_peft_adapters_are_refused():
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(NotImplementedError, match=r"holds adapters \['default', 'other'\]"):
        PrefixModel(model)


def test_plain_models_have_no_adapter_parameters(tmp_path):
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2, reparameterize=False))
    assert pm.adapter_params == [] and len(pm.trainable_parameters()) == 1
    pm.save_prefix(tmp_path)
    assert not (tmp_path / ADAPTER_DIR).exists()


# ---------------------------------------------------------------- QLoRA
def _four_bit_folder(path):
    """A tiny Llama with hidden size 64: bitsandbytes' CPU path needs in_features >= its block size (64)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(**dict(ROPE, hidden_size=64, intermediate_size=128))
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load_4bit(path, device="cpu", dtype=torch.float32):
    """The 4-bit base, prepared as for QLoRA training (norms and embeddings in fp32)."""
    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": device},
                                                    attn_implementation="sdpa", dtype=dtype)
    return peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
])
def test_qlora_4bit_base_trains_prefix_and_lora_with_checkpointing_and_reloads(tmp_path, device, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    folder = _four_bit_folder(tmp_path / "base")
    model = _load_4bit(folder, device, dtype)
    pm = _lora_prefix(model=model)
    pm.activation_checkpointing_enable()
    assert pm.model.get_base_model().is_activation_checkpointing
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    frozen = q_proj.weight.detach().clone()
    x = tokens(2, 8).to(device)
    pm.train()
    loss = pm(x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.prefixes.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.adapter_params)
    pm.zero_grad()
    losses = _train(pm, steps=3)
    assert losses[-1] < losses[0]
    assert torch.equal(q_proj.weight, frozen)  # the 4-bit base never moves
    pm.save_prefix(tmp_path / "prefix")
    loaded = PrefixModel.from_pretrained(_load_4bit(folder, device, dtype), tmp_path / "prefix")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, pm(x).logits)


def test_cli_generate_loads_a_prefix_saved_with_lora(tmp_path, capsys):
    from tiny import tiny_model_folder

    from prefixtune.cli import main

    folder = tiny_model_folder(tmp_path / "model")
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = PrefixModel.wrap(peft.get_peft_model(model, config), PrefixConfig(prefix_length=3, reparameterize=False))
    pm.save_prefix(tmp_path / "prefix")
    argv = ["generate", "--model", str(folder), "--prefix", str(tmp_path / "prefix"), "--prompt", "Hello",
            "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_loading_a_prefix_whose_adapter_targets_other_modules_is_refused(tmp_path):
    _lora_prefix().save_prefix(tmp_path)  # q_proj and v_proj
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="does not fit this model's adapter.*k_proj"):
        PrefixModel(model).load_prefix(tmp_path)
