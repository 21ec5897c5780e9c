"""``prefixtune compare``: every method on a tiny random Llama (seconds), the report, the options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch
from tiny import tiny_model

from prefixtune import cli
from prefixtune.compare import build_config, runner
from prefixtune.compare.adapters import add_adapters
from prefixtune.compare.config import QUICK, CompareConfig
from prefixtune.compare.methods import METHODS, learning_rates, parse_methods
from prefixtune.compare.report import markdown, text_table

TRAINED = ("prefix", "prefix-words", "prefix-flat", "prefix-mup", "prefix-memory", "prefix-lora", "peft-prefix", "prompt", "lora", "adapter", "full")


def tiny_config(model_dir, tmp_path, **changes) -> CompareConfig:
    values = dict(model=model_dir, max_steps=3, batch_size=4, train_limit=24, eval_prompts=3, max_new_tokens=6,
                  warmup_steps=1, output_dir=str(tmp_path / "out"), isolate=False, quiet=True, init_text="hello",
                  methods="base," + ",".join(TRAINED))
    values.update(changes)
    return CompareConfig(**values)


def test_every_method_trains_and_is_measured(model_dir, tmp_path):
    results = runner.compare(tiny_config(model_dir, tmp_path))
    rows = {r["method"]: r for r in results["rows"]}
    assert [r["status"] for r in rows.values()] == ["ok"] * len(rows), {k: r.get("reason") for k, r in rows.items()}
    total = rows["base"]["total_params"]
    assert rows["base"]["trainable_params"] == 0 and set(rows["base"]["metrics"]) == {"bleu", "rouge_l"}
    assert rows["full"]["trainable_params"] == total and rows["full"]["trainable_pct"] == 100.0
    # LoRA r=8 on q_proj and v_proj of 2 layers: A (8 x 32) and B (out x 8) each
    shape = tiny_model("llama").config
    kv_out = shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads)
    assert rows["lora"]["trainable_params"] == 2 * (8 * 32 + 32 * 8 + 8 * 32 + kv_out * 8)
    assert rows["prompt"]["trainable_params"] == 10 * 32  # 10 virtual tokens of width 32
    head_dim = shape.hidden_size // shape.num_attention_heads  # a memory per layer and key/value head
    assert rows["prefix-memory"]["trainable_params"] == 2 * shape.num_key_value_heads * head_dim * head_dim
    flat = 2 * 2 * shape.num_key_value_heads * 10 * head_dim  # layers x (k, v) x kv heads x length x head size
    assert rows["prefix-lora"]["trainable_params"] == rows["lora"]["trainable_params"] + flat
    for name in TRAINED:
        row = rows[name]
        assert 0 < row["trainable_params"] <= total
        assert row["steps"] == 3 and len(row["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(row["losses"])))
        assert row["seconds_per_step"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_memory_mib"] > 0 and "memory_kind" in row
        assert row["checkpoint_bytes"] > 0
        assert set(row["metrics"]) == {"bleu", "rouge_l"} and len(row["samples"]) == 3
    assert rows["full"]["checkpoint_bytes"] > rows["lora"]["checkpoint_bytes"]
    out = tmp_path / "out"
    assert json.loads((out / "compare.json").read_text())["rows"][1]["method"] == "prefix"
    table = (out / "compare.md").read_text()
    assert "| prefix tuning, the paper's MLP (prefixtune) |" in table and "Houlsby" in table
    assert (out / "compare.png").stat().st_size > 0
    assert (out / "prefix" / "checkpoint" / "prefix.safetensors").is_file()


def test_methods_see_the_same_batches_and_runs_repeat(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path, methods="prefix")
    first = runner.run_method(cfg, "prefix", 1e-2, tmp_path / "a")
    again = runner.run_method(cfg, "prefix", 1e-2, tmp_path / "b")
    assert first["losses"] == again["losses"]
    # the first loss is taken before any update: methods that start as the base model agree on it
    lora = runner.run_method(cfg, "lora", 1e-2, tmp_path / "c")
    adapter = runner.run_method(cfg, "adapter", 1e-3, tmp_path / "d")
    assert lora["first_loss"] == pytest.approx(adapter["first_loss"], rel=1e-5)


def test_adapters_start_as_the_identity_and_only_they_train():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 7))
    before = model(input_ids=ids).logits
    params = add_adapters(model, size=4)
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("adapter" in n) or ("norm" in n) for n in trainable)
    assert len(params) == len(trainable)
    assert sum(p.numel() for p in params) == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32) + 32 * (2 * 2 + 1)


def test_adapters_refuse_an_unknown_architecture():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(NotImplementedError, match="mystery"):
        add_adapters(model, 4)


def test_a_failing_method_costs_one_row(model_dir, tmp_path, monkeypatch):
    def broken(model, tokenizer, cfg):
        raise RuntimeError("boom")

    monkeypatch.setitem(METHODS, "adapter", dataclasses.replace(METHODS["adapter"], build=broken))
    results = runner.compare(tiny_config(model_dir, tmp_path, methods="adapter,lora"))
    statuses = {r["method"]: (r["status"], r.get("reason")) for r in results["rows"]}
    assert statuses == {"adapter": ("failed", "RuntimeError: boom"), "lora": ("ok", None)}
    assert "failed: RuntimeError: boom" in (tmp_path / "out" / "compare.md").read_text()


def test_qlora_says_why_it_is_skipped(model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    row = runner.run_method(tiny_config(model_dir, tmp_path), "qlora", 1e-2, tmp_path / "q")
    assert row["status"] == "skipped" and "bitsandbytes is not installed" in row["reason"]


@pytest.mark.slow
def test_isolated_worker_process(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path, methods="lora", isolate=True)
    row = runner.run_isolated(cfg, "lora", 1e-2, tmp_path / "iso")
    assert row["status"] == "ok" and row["trainable_params"] > 0 and row["peak_memory_mib"] > 0


def test_train_sample_draws_a_seeded_subset(tmp_path):
    cfg = CompareConfig(train_sample=20, eval_prompts=4, seed=3)
    first, groups = runner.examples(cfg)
    again, _ = runner.examples(cfg)
    other, _ = runner.examples(dataclasses.replace(cfg, seed=4))
    assert len(first) == 20 and len(groups) == 4
    assert [e.prompt for e in first] == [e.prompt for e in again] != [e.prompt for e in other]
    with pytest.raises(ValueError, match="only"):
        runner.examples(dataclasses.replace(cfg, train_sample=10_000))


def test_learning_rates_and_method_names():
    methods = parse_methods("base,prefix,lora")
    assert learning_rates(None, methods) == {"base": 0.0, "prefix": METHODS["prefix"].lr, "lora": METHODS["lora"].lr}
    assert learning_rates("3e-3", methods) == {"base": 0.0, "prefix": 3e-3, "lora": 3e-3}
    assert learning_rates("lora=1e-3", methods)["lora"] == 1e-3
    for bad in ("lora=fast", "nope=1e-3", "lora"):
        with pytest.raises(ValueError, match="--lr"):
            learning_rates(bad, methods)
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("prefix,dora")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("lora,lora")


def test_quick_defaults_yield_to_explicit_options(tmp_path):
    parser = argparse.ArgumentParser()
    from prefixtune.compare import add_arguments

    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--quick", "--max-steps", "5"]))
    assert cfg.max_steps == 5 and cfg.batch_size == QUICK["batch_size"] and cfg.eval_prompts == QUICK["eval_prompts"]
    config_file = tmp_path / "c.yaml"
    config_file.write_text("quick: true\nbatch_size: 2\n")
    cfg = build_config(parser.parse_args(["--config", str(config_file)]))
    assert cfg.quick and cfg.batch_size == 2 and cfg.max_steps == QUICK["max_steps"]
    assert build_config(parser.parse_args([])).max_steps == 120


def test_command_line(model_dir, tmp_path, capsys):
    assert cli.main(["compare", "--list-methods"]) == 0
    assert "qlora" in capsys.readouterr().out
    code = cli.main(["compare", "--model", model_dir, "--methods", "base,prefix", "--max-steps", "2",
                     "--batch-size", "2", "--train-limit", "8", "--eval-prompts", "2", "--max-new-tokens", "4",
                     "--no-isolate", "--quiet", "--output-dir", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0 and "prefix tuning, the paper's MLP (prefixtune)" in out and (tmp_path / "cli" / "compare.md").is_file()
    assert cli.main(["compare", "--methods", "dora"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_report_of_skipped_and_failed_rows():
    results = {
        "config": dataclasses.asdict(CompareConfig()),
        "machine": {"device": "CPU", "torch": "x", "transformers": "y", "peft": None},
        "rows": [
            {"method": "qlora", "label": "QLoRA", "status": "skipped", "reason": "no GPU", "notes": []},
            {"method": "base", "label": "base", "status": "ok", "trainable_params": 0, "trainable_pct": 0.0,
             "checkpoint_bytes": 0, "metrics": {"bleu": 1.0}, "notes": []},
        ],
    }
    md = markdown(results)
    assert "| QLoRA | skipped: no GPU |" in md and "| base | 0 | 0 |" in md
    assert "skipped: no GPU" in text_table(results)


def test_e2e_study_plan_picks_best_rates_and_reports(tmp_path):
    from benchmarks import e2e_study as study
    args = argparse.Namespace(grid="prefix-flat=3e-3,lora=1e-2,prefix-flat=1e-3", methods="", ablations=False, lr_seeds="0,1",
                              set=None, sizes="50,100", seeds="0,1", out=str(tmp_path), images=str(tmp_path / "img"),
                              steps=120)
    assert [r["id"] for r in study.lr_runs(args)] == ["lr-prefix-flat-0.003", "lr-lora-0.01", "lr-prefix-flat-0.001",
                                                      "lr-prefix-flat-0.003-s1", "lr-lora-0.01-s1", "lr-prefix-flat-0.001-s1"]
    rows = {}  # prefix-flat at 3e-3 has the best single run (seed 1) but the worse mean over seeds
    for run, (bleu, rouge) in zip(study.lr_runs(args), [(10, 20), (60, 70), (50, 60), (90, 90), (60, 70), (50, 60)]):
        rows[run["id"]] = {**run, "label": run["method"], "status": "ok", "final_loss": 1.0, "seconds_per_step": 1.0,
                           "trainable_params": 5, "metrics": {"bleu": bleu, "rouge_l": rouge}}
    assert study.best_lr(rows, "prefix-flat") == 1e-3 and study.best_lr(rows, "lora") == 1e-2
    assert study.settings(argparse.Namespace(set="prefix_length=20,max_grad_norm=1.5,isolate=false")) == {
        "prefix_length": 20, "max_grad_norm": 1.5, "isolate": False}
    with pytest.raises(SystemExit, match="prefix_len"):
        study.settings(argparse.Namespace(set="prefix_len=20"))
    low = study.lowdata_runs(args, rows)
    per_seed = 2 * len(study.LOWDATA_METHODS)
    assert [r["changes"]["seed"] for r in low] == [0] * per_seed + [1] * per_seed  # whole seeds first
    assert {r["lr"] for r in low if r["method"] == "prefix-flat"} == {1e-3}
    for run in low:
        if run["method"] != "full":  # a method with no low-data row yet
            rows[run["id"]] = {**run, "label": run["method"], "status": "ok", "final_loss": 0.5 + run["changes"]["seed"],
                               "metrics": {"bleu": 40.0 + run["changes"]["seed"], "rouge_l": 50.0}}
    (tmp_path / "runs").mkdir()
    for key, row in rows.items():
        (tmp_path / "runs" / f"{key}.json").write_text(json.dumps(row))
    text = study.report(args)
    assert "| prefix-flat (lr 0.001, seeds [0, 1]) | 40.5 ± 0.7 |" in text and "69.7" in text
    assert "| prefix-flat | 1.000 ± 0.707 | 1.000 ± 0.707 |" in text  # final training loss, n=50 and n=100
    assert "| full (not run yet) | - | - | - | - |" in text
    assert "- prefix-flat at 0.001 minus LoRA, bleu: per seed -10.00, -10.00; mean -10.00, sd 0.00, prefix ahead in 0 of 2" in text
    assert "| prefix-flat | 0.003 | - | 0,1 | 1.000 ± 0.000 | 50.0 ± 56.6 | 55.0 ± 49.5 |" in text
    # the all-methods table: each method at its best rate, means over its seeds
    assert "| LoRA (PEFT) | 0.01 | 2 | 5 | - | - (-) | 1.00 | - | - | 60.0 | 70.0 |" in text
    assert "| prefix tuning, flat (prefixtune) | 0.001 | 2 | 5 | - | - (-) | 1.00 | - | - | 50.0 | 60.0 |" in text
    assert (tmp_path / "img" / "compare-e2e-lowdata.png").is_file()
    assert (tmp_path / "img" / "compare-e2e-lr.png").is_file()


def test_bad_data_is_one_clear_error(tmp_path, capsys):
    code = cli.main(["compare", "--data", str(tmp_path / "missing.jsonl"), "--eval-data", str(tmp_path / "x.jsonl"),
                     "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "missing.jsonl" in capsys.readouterr().err
    assert cli.main(["compare", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--eval-data: is required with --data" in capsys.readouterr().err


def test_compare_trains_and_scores_on_the_rows_its_filters_keep(tmp_path):
    data = tmp_path / "cats.jsonl"
    data.write_text("".join(json.dumps({"category": c, "prompt": f"{c} {i}", "completion": f"t {i}"}) + "\n"
                            for i, c in enumerate(["City", "Food", "Airport", "Astronaut"] * 2)))
    cfg = CompareConfig(data=str(data), eval_data=str(data), train_where="category!=City,Food",
                        eval_where="category=City,Food")
    train_examples, groups = runner.examples(cfg)
    assert {e.fields["category"] for e in train_examples} == {"Airport", "Astronaut"} and len(train_examples) == 4
    assert [ex.prompt for ex, _ in groups] == ["City 0", "Food 1", "City 4", "Food 5"]
    demo_only, _ = runner.examples(CompareConfig(train_where="food=Italian", eval_prompts=2))
    assert demo_only and {e.fields["food"] for e in demo_only} == {"Italian"}


def test_seeds_run_every_method_per_seed_and_report_means_and_paired_differences(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path, methods="prefix-flat,lora", seeds=(0, 1), max_steps=7, warmup_steps=1,
                      metrics="bleu,ter", reference="lora")
    results = runner.compare(cfg)
    rows = results["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("prefix-flat", 0), ("lora", 0), ("prefix-flat", 1), ("lora", 1)]
    assert all(r["status"] == "ok" and r["spike_ratio"] > 0 and r["spike"] is (r["spike_ratio"] > 2) for r in rows)
    flat = [r for r in rows if r["method"] == "prefix-flat"]
    assert flat[0]["losses"] != flat[1]["losses"]  # another seed, another order and initialization
    summary = results["summary"]
    assert summary["reference"] == "lora" and list(summary["methods"]) == ["prefix-flat", "lora"]
    mine = summary["methods"]["prefix-flat"]
    diffs = [a["metrics"]["ter"] - b["metrics"]["ter"] for a, b in zip(rows[0::2], rows[1::2])]
    assert mine["vs_reference"]["ter"]["diffs"] == pytest.approx(diffs)
    assert mine["scores"]["bleu"]["mean"] == pytest.approx((flat[0]["metrics"]["bleu"] + flat[1]["metrics"]["bleu"]) / 2)
    assert mine["scores"]["final_loss"]["sd"] is not None and summary["methods"]["lora"]["vs_reference"] == {}
    out = tmp_path / "out"
    assert (out / "lora" / "seed-1" / "checkpoint").is_dir() and (out / "compare.png").stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["summary"]["methods"]["prefix-flat"]["vs_reference"]["bleu"]["n"] == 2
    md = (out / "compare.md").read_text()
    assert "Over seeds" in md and "| BLEU - lora |" in md and "seeds 0, 1" in md
    printed = capsys.readouterr().out
    assert "d = method - lora" in printed and "d TER" in printed


def test_summary_marks_the_lowest_ter_and_loss_as_best():
    from prefixtune.compare import stats
    from prefixtune.compare.report import summary_markdown

    def row(method, seed, bleu, ter, loss):
        return {"method": method, "label": method, "seed": seed, "status": "ok", "trainable_params": 5,
                "final_loss": loss, "spike_ratio": 1.0, "spike": False, "metrics": {"bleu": bleu, "ter": ter}}

    rows = [row("a", 0, 50, 40, 1.0), row("b", 0, 60, 50, 2.0), row("a", 1, 52, 42, 1.2), row("b", 1, 58, 46, 2.2)]
    summary = stats.summarize(rows)
    assert summary["reference"] == "a"
    assert summary["methods"]["b"]["vs_reference"]["bleu"] == {"mean": 8.0, "sd": pytest.approx(2 ** 1.5), "n": 2,
                                                                "above": 2, "diffs": [10, 6]}
    table = "\n".join(summary_markdown({"summary": summary, "rows": rows}))
    assert "| a | 2 | **1.100 ± 0.141** | 51.00 ± 1.41 | **41.00 ± 1.41** |" in table  # lower TER and loss win
    assert "| b | 2 | 2.100 ± 0.141 | **59.00 ± 1.41** | 48.00 ± 2.83 | +1.000 ± 0.000 | +8.00 ± 2.83 | +7.00 ± 4.24 |" in table
    assert stats.format_mean_sd([1.0]) == "1.0" and stats.format_mean_sd([]) == "-"


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1,0"], "--seeds: names a seed twice: 0,1,0"),
    (["--methods", "prefix,lora", "--reference", "full"], "--reference: must be one of --methods (prefix,lora), got 'full'"),
])
def test_bad_seeds_or_reference_are_one_line(capsys, argv, message):
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_sets_score_each_named_subset(model_dir, tmp_path):
    data = tmp_path / "cats.jsonl"
    data.write_text("".join(json.dumps({"category": c, "prompt": f"{c} {i} ->", "completion": f" {i}"}) + "\n"
                            for i, c in enumerate(["City", "Food", "Airport", "Astronaut"] * 3)))
    cfg = tiny_config(model_dir, tmp_path, data=str(data), eval_data=str(data), train_where="category!=City",
                      eval_sets="seen:category!=City; unseen:category=City", eval_prompts=2, metrics="bleu,ter")
    row = runner.run_method(cfg, "prefix-flat", 3e-2, tmp_path / "run")
    assert list(row["sets"]) == ["seen", "unseen"] and row["metrics"] == row["sets"]["seen"]["metrics"]
    assert [s["prompt"] for s in row["sets"]["unseen"]["samples"]] == ["City 0 ->", "City 4 ->"]
    assert [s["prompt"] for s in row["sets"]["seen"]["samples"]] == ["Food 1 ->", "Airport 2 ->"]
    sampled = runner.held_out_sets(dataclasses.replace(cfg, eval_sample=3))
    assert [ex.prompt for ex, _ in sampled["seen"]] == [ex.prompt for ex, _ in runner.held_out_sets(
        dataclasses.replace(cfg, eval_sample=3, seed=5))["seen"]]  # the same draw whatever the seed
    assert len(sampled["unseen"]) == 3 and [ex.prompt for ex, _ in sampled["seen"]] != [
        "Food 1 ->", "Airport 2 ->", "Astronaut 3 ->"]  # drawn, not the first three
    with pytest.raises(ValueError, match="--eval-sets: expected NAME:FILTER"):
        CompareConfig(eval_sets="seen=category")
    with pytest.raises(ValueError, match="not both"):
        CompareConfig(eval_sets="a:x=1", eval_where="x=2")


def test_an_earlier_comparison_or_a_method_folder_in_the_output_dir_is_kept(tmp_path, data_files, capsys):
    out = tmp_path / "o"
    (out / "lora").mkdir(parents=True)
    (out / "compare.md").write_text("an earlier comparison")
    argv = ["compare", "--data", str(data_files / "train.jsonl"), "--eval-data", str(data_files / "eval.jsonl"),
            "--methods", "prefix,lora", "--output-dir", str(out)]
    assert cli.main(argv) == 2
    assert f"--output-dir {out} already holds compare.md, lora, which this comparison would" in capsys.readouterr().err
    assert (out / "compare.md").read_text() == "an earlier comparison" and sorted(os.listdir(out)) == ["compare.md", "lora"]
