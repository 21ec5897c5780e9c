"""A PrefixModel trained by transformers' Trainer and by TRL's SFTTrainer, with
``use_prefix_checkpoints``: checkpoints hold the prefix (never the base), resume exactly, restore
the best prefix, and are read by ``PrefixModel.from_pretrained`` and ``prefixtune generate``."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import PrefixConfig, PrefixModel, data
from prefixtune.base_models import load_model
from prefixtune.cli import main
from prefixtune.hf_trainer import use_prefix_checkpoints

transformers = pytest.importorskip("transformers")


def _rows(tokenizer, data_files):
    examples = data.load_examples(str(data_files / "train.jsonl"))
    rows, _ = data.tokenize(examples, tokenizer, max_length=64)
    return rows


def _args(out, **changes):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                  save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                  data_seed=0, disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=1)
    values.update(changes)
    return transformers.TrainingArguments(**values)


def _trainer(model_dir, data_files, out, prefix_checkpoints=True, config=None, **changes):
    model, tokenizer = load_model(model_dir)
    torch.manual_seed(0)
    pm = PrefixModel.wrap(model, config or PrefixConfig(prefix_length=3, reparam_hidden_size=16), tokenizer=tokenizer)
    rows = _rows(tokenizer, data_files)
    trainer = transformers.Trainer(model=pm, args=_args(out, **changes), train_dataset=rows, eval_dataset=rows[:4],
                                   data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id),
                                   processing_class=tokenizer)
    return (use_prefix_checkpoints(trainer) if prefix_checkpoints else trainer), pm


def _prefix(folder):
    return load_file(str(Path(folder) / "prefix.safetensors"))["key_values"]


def _kv(pm):
    """The active prefix's key/values, as a checkpoint's ``prefix.safetensors`` holds them."""
    return pm.prefixes[pm.active].raw_key_values().detach()


def _size(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def test_trainer_checkpoints_hold_the_prefix_resume_exactly_and_load_anywhere(model_dir, data_files, tmp_path,
                                                                               capsys):
    trainer, pm = _trainer(model_dir, data_files, tmp_path / "straight")
    trainer.train()
    checkpoints = sorted((tmp_path / "straight").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for folder in checkpoints:
        names = {f.name for f in folder.iterdir()}
        assert {"prefix_config.json", "prefix.safetensors", "trainer_state.json"} <= names, names
        assert "model.safetensors" not in names and _size(folder) < 1 << 20, (names, _size(folder))
    assert torch.equal(_prefix(checkpoints[-1]), _kv(pm))

    resumed, resumed_pm = _trainer(model_dir, data_files, tmp_path / "straight")
    resumed.train(resume_from_checkpoint=str(checkpoints[0]))  # from step 2 to 6 again
    torch.testing.assert_close(_kv(resumed_pm), _kv(pm),
                               atol=1e-6, rtol=1e-5)

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "prefix_config.json").is_file() and _size(tmp_path / "saved") < 1 << 20
    model, _ = load_model(model_dir)
    loaded = PrefixModel.from_pretrained(model, checkpoints[-1])
    assert torch.equal(_kv(loaded), _kv(pm))
    assert main(["generate", "--model", model_dir, "--prefix", str(checkpoints[-1]), "--prompt", "colour[red] ->",
                 "--max-new-tokens", "3"]) == 0


def test_a_trainer_without_the_line_saves_what_trains_says_so_once_and_resumes(model_dir, data_files, tmp_path,
                                                                               caplog):
    """``Trainer(model=prefix_model)`` as a user first writes it, without ``use_prefix_checkpoints``."""
    with caplog.at_level("WARNING", logger="prefixtune"):
        trainer, pm = _trainer(model_dir, data_files, tmp_path / "plain", prefix_checkpoints=False)
        trainer.train()
    told = [r for r in caplog.records if "use_prefix_checkpoints(trainer)" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    first = tmp_path / "plain" / "checkpoint-2"
    saved = load_file(str(first / "model.safetensors"))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and all(k.startswith("prefixes.") for k in saved), sorted(saved)
    assert (first / "model.safetensors").stat().st_size < 1 << 20
    assert len(pm.state_dict()) > len(saved)  # anyone else still gets the whole module

    resumed, resumed_pm = _trainer(model_dir, data_files, tmp_path / "plain", prefix_checkpoints=False)
    resumed.train(resume_from_checkpoint=str(first))  # from step 2 to 6 again
    torch.testing.assert_close(_kv(resumed_pm), _kv(pm), atol=1e-6, rtol=1e-5)


def test_the_trainer_trains_the_mlp_matrices_at_the_rate_over_the_width(model_dir, data_files, tmp_path):
    """With ``use_prefix_checkpoints`` the trainer's optimizer takes the prefix's rate multipliers (the default
    ``reparam_lr="width"``): AdamW's first step moves each weight by about its rate, so the MLP's matrices move
    by about lr / 16 and its embedding by about lr. Without the line, the whole MLP moves by about lr."""
    moved = {}
    for line in (True, False):
        trainer, pm = _trainer(model_dir, data_files, tmp_path / str(line), prefix_checkpoints=line, max_steps=1,
                               warmup_steps=0, lr_scheduler_type="constant", save_strategy="no")
        mlp = pm.prefixes[pm.active].mlp
        before = [p.detach().clone() for p in (pm.prefixes[pm.active].embedding.weight, mlp[0].weight, mlp[2].weight)]
        trainer.train()
        after = (pm.prefixes[pm.active].embedding.weight, mlp[0].weight, mlp[2].weight)
        moved[line] = [(a - b).abs().max().item() for a, b in zip(after, before)]
    assert moved[True][0] == pytest.approx(1e-2, rel=1e-3)
    assert moved[True][1] == pytest.approx(1e-2 / 16, rel=1e-3) and moved[True][2] == pytest.approx(1e-2 / 16, rel=1e-3)
    assert moved[False] == pytest.approx([1e-2] * 3, rel=1e-3)


def test_a_memory_prefix_through_trainer_checkpoints_gives_the_same_logits(model_dir, data_files, tmp_path):
    trainer, pm = _trainer(model_dir, data_files, tmp_path / "mem", config=PrefixConfig(kind="memory"),
                           max_steps=2)
    trainer.train()
    checkpoint = tmp_path / "mem" / "checkpoint-2"
    assert "memory" in load_file(str(checkpoint / "prefix.safetensors"))
    ids = torch.tensor([[5, 6, 7, 8]])
    model, _ = load_model(model_dir)
    loaded = PrefixModel.from_pretrained(model, checkpoint)
    pm.eval()
    with torch.no_grad():
        assert pm.prefixes["default"].memory.abs().sum() > 0
        assert torch.equal(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)
    resumed, resumed_pm = _trainer(model_dir, data_files, tmp_path / "mem", config=PrefixConfig(kind="memory"),
                                   max_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed_pm.prefixes["default"].memory, pm.prefixes["default"].memory)


def test_load_best_model_at_end_restores_the_best_prefix(model_dir, data_files, tmp_path):
    trainer, pm = _trainer(model_dir, data_files, tmp_path / "run", learning_rate=0.3, eval_strategy="steps",
                           eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and Path(best).name in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert torch.equal(_kv(pm), _prefix(best))
    losses = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    assert trainer.state.best_metric == min(losses)


def test_checkpointing_accumulation_and_lora_through_the_trainer(model_dir, data_files, tmp_path):
    """Gradient checkpointing and accumulation as the Trainer runs them; a prefix trained beside LoRA
    saves both parts in each checkpoint, and they load back."""
    peft = pytest.importorskip("peft")
    model, tokenizer = load_model(model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparam_hidden_size=16))
    trainer = use_prefix_checkpoints(transformers.Trainer(
        model=pm, args=_args(tmp_path, max_steps=2, gradient_checkpointing=True, gradient_accumulation_steps=2),
        train_dataset=_rows(tokenizer, data_files),
        data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id)))
    lora_before = [p.detach().clone() for p in pm.adapter_params]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, pm.adapter_params)), "LoRA trained"
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file() and _size(checkpoint) < 1 << 20
    reloaded = PrefixModel.from_pretrained(load_model(model_dir)[0], checkpoint)
    x = torch.tensor([[5, 6, 7, 8]])
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, pm(input_ids=x).logits)


def test_a_trainer_of_another_model_is_refused(model_dir):
    model, _ = load_model(model_dir)
    trainer = transformers.Trainer(model=model, args=_args("unused"))
    with pytest.raises(TypeError, match="not a PrefixModel"):
        use_prefix_checkpoints(trainer)


def test_trl_sft_trainer_checkpoints_hold_the_prefix_resume_and_load_anywhere(model_dir, data_files, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in (data_files / "train.jsonl").read_text().splitlines()]

    def sft(out, **changes):
        model, tokenizer = load_model(model_dir)
        torch.manual_seed(0)
        pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=3, reparam_hidden_size=16), tokenizer=tokenizer)
        config = trl.SFTConfig(**{**_args(out, **changes).to_dict(), "output_dir": str(out), "max_length": 64,
                                  "completion_only_loss": True})
        trainer = trl.SFTTrainer(model=pm, args=config, train_dataset=datasets.Dataset.from_list(records),
                                 eval_dataset=datasets.Dataset.from_list(records[:4]), processing_class=tokenizer)
        return use_prefix_checkpoints(trainer), pm

    trainer, pm = sft(tmp_path / "sft")
    trainer.train()
    checkpoints = sorted((tmp_path / "sft").glob("checkpoint-*"))
    assert len(checkpoints) == 3 and all(_size(c) < 1 << 20 for c in checkpoints)
    assert not any((c / "model.safetensors").exists() for c in checkpoints)
    resumed, resumed_pm = sft(tmp_path / "sft")
    resumed.train(resume_from_checkpoint=str(checkpoints[0]))
    torch.testing.assert_close(_kv(resumed_pm), _kv(pm), atol=1e-6, rtol=1e-5)
    loaded = PrefixModel.from_pretrained(load_model(model_dir)[0], checkpoints[-1])
    assert torch.equal(_kv(loaded), _kv(pm))
    assert main(["generate", "--model", model_dir, "--prefix", str(checkpoints[-1]), "--prompt", "colour[red] ->",
                 "--max-new-tokens", "3"]) == 0

    best, best_pm = sft(tmp_path / "best", learning_rate=0.3, eval_strategy="steps", eval_steps=2,
                        load_best_model_at_end=True, metric_for_best_model="loss")
    best.train()
    assert torch.equal(_kv(best_pm), _prefix(best.state.best_model_checkpoint))


def test_the_documented_trainer_script_is_the_one_in_examples():
    root = Path(__file__).resolve().parents[1]
    script = (root / "examples" / "trainer_e2e.py").read_text()
    assert f"```python\n{script}```" in (root / "docs" / "training.md").read_text()
