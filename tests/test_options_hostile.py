"""Values that must not escape the one-line validator: each input a hostile or careless user sent, and
the one line that names the option, on the command line and in the Python API."""

import json
import math
import shutil
import socket

import pytest

from prefixtune import PrefixConfig, PrefixModel, runtime
from prefixtune.cli import main
from prefixtune.config import TrainConfig
from prefixtune.options import OptionError


@pytest.mark.parametrize("argv, message", [
    (["train", "--device", "bogus"], "--device: must be auto, cpu, cuda"),
    (["train", "--prefix-length", "1000000000"], "--prefix-length: must be at most 65536, got 1000000000"),
    (["train", "--seed", str(2 ** 70)], "--seed: must be at most"),
    (["train", "--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["train", "--lr", "nan"], "--lr: must be a finite number"),
    (["train", "--lr", "1e39"], "--lr: must be at most 1e+30"),  # beyond float32: the optimizer could not hold it
    (["compare", "--lr", "prefix=-1"], "--lr: prefix's rate must be above 0 and at most 1e+30, got -1"),
    (["compare", "--lr", "inf"], "rate must be above 0 and at most 1e+30, got inf"),
    (["train", "--layers", "0,0"], "--layers: names 0 more than once"),
    (["train", "--output-dir", ""], "--output-dir: must name a folder, got ''"),
    (["train", "--data", " "], "--data: must name a data file or a datasets name, got ' '"),  # not the current folder
    (["generate", "--prefix", "", "--prompt", "hi"], "--prefix: must name a saved prefix's folder"),  # not the base model
    (["eval", "--model", "", "--data", "d.jsonl"], "--model: must name a model folder or a Hub id"),
    (["compare", "--prompt-field", ""], "--prompt-field: must name a field"),
    (["compare", "--threads", "100000"], "--threads: must be at most 1024, got 100000"),
    (["eval", "--device", "cuda:x"], "--device: must be auto, cpu, cuda"),
    (["generate", "--seed", "-1", "--prompt", "hi"], "--seed: must be at least 0, got -1"),
    (["generate", "--prompt", ""], "--prompt: must not be empty"),
    (["generate", "--prompt", "hi", "--num-beams", "100000"], "--num-beams: must be at most 64, got 100000"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "1000000000"], "--max-new-tokens: must be at most 65536"),
    (["generate", "--prompt", "caf\udce9"], "--prompt: holds U+DCE9 at character 4, a lone surrogate"),  # argv not UTF-8
    (["generate", "--prompt", "hi", "--do-sample", "--temperature", "1e-300"], "--temperature: must be at least 0.0001"),
    # the device is looked for before the model loads (--model m does not exist)
    (["generate", "--model", "m", "--prompt", "hi", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["serve", "--model", "m", "--host", "192.0.2.1"], "--host 192.0.2.1 --port 8000: cannot listen there"),  # not ours
    (["serve", "--model", "m", "--device", "meta"], "--device meta: not a device a model runs on"),
])
def test_the_command_line_names_the_option(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig(device="bogus"), "--device: must be auto"),
    (lambda: TrainConfig(lr=math.inf), "--lr: must be a finite number"),
    (lambda: PrefixConfig(init_std=math.inf), "--init-std: must be a finite number"),
    (lambda: PrefixConfig(prefix_length=True), "--prefix-length: must be a number, not true or false"),
    (lambda: PrefixConfig(layers=(0, 0)), "--layers: names 0 more than once"),
    (lambda: PrefixConfig(layers=(True, 1)), "--layers: must be a number, not true or false"),
    (lambda: TrainConfig(output_dir=""), "--output-dir: must name a folder"),
    (lambda: TrainConfig(max_grad_norm=float("nan")), "--max-grad-norm: must be a finite number"),
])
def test_python_configs_refuse_the_same_values(build, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        build()


def test_a_yaml_true_is_not_a_step_count(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: true\n")
    assert main(["train", "--config", str(config)]) == 2
    assert f"{config}: max_steps: must be a number, not true or false" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "no-such-model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in err, err


def test_more_new_tokens_than_the_models_context_are_refused_before_decoding(model_dir, capsys):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    assert main(["generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", str(context)]) == 2
    assert f"--max-new-tokens {context}: with the longest prompt of the batch (1 tokens) it exceeds the model's " \
           f"context length ({context} tokens)" in capsys.readouterr().err


def test_a_huge_value_is_shown_cut_short(tmp_path, capsys):
    """A value echoed in a message is cut to a line, however large: a 100 KB option, or a YAML list whose
    aliases (a "billion laughs") stand for 43 million items."""
    bomb = tmp_path / "bomb.yaml"
    anchors = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]" + "".join(
        f", &{name} [{', '.join(['*' + previous] * 9)}]" for previous, name in zip("abcdefg", "bcdefgh")) + "]"
    bomb.write_text(f"device: {anchors}\n")
    for argv, message in ((["train", "--device", "x" * 100_000], "--device: must be auto, cpu, cuda"),
                          (["train", "--config", str(bomb)], f"{bomb}: device: must be text, got [['lol', ")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err) < 400, err[:400]


def test_a_config_that_is_a_folder_says_so(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"--config {tmp_path}: is a folder" in capsys.readouterr().err


def test_an_output_dir_holding_a_prefix_is_not_overwritten(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "prefix.safetensors").write_bytes(b"a prefix someone kept")
    argv = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--output-dir", str(out),
            "--max-steps", "1"]
    assert main(argv) == 1
    assert f"--output-dir {out} already holds a prefix" in capsys.readouterr().err
    assert (out / "prefix.safetensors").read_bytes() == b"a prefix someone kept"


def test_a_users_own_files_in_the_output_dir_are_kept_and_a_runs_are_replaced(model_dir, data_files, tmp_path, capsys):
    """A fresh run writes config.yaml, metrics.jsonl, curves.png and eval.json. Where a user's own files by
    those names lie (a config.yaml beside which they run, with --output-dir .), it stops and keeps them; where
    a run left them (killed before its first checkpoint), it starts again over them."""
    out = tmp_path / "here"
    out.mkdir()
    (out / "config.yaml").write_text("max_steps: 1  # my own notes\n")
    argv = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--max-steps", "1",
            "--output-dir", str(out)]
    assert main([*argv, "--config", str(out / "config.yaml")]) == 1
    assert f"--output-dir {out} holds config.yaml, not written there by a prefixtune run" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "max_steps: 1  # my own notes\n"
    (out / "config.yaml").unlink()
    (out / "curves.png").write_bytes(b"my own plot")
    assert main(argv) == 1
    assert "holds curves.png, not written there" in capsys.readouterr().err
    assert (out / "curves.png").read_bytes() == b"my own plot"
    (out / "curves.png").unlink()
    assert main(argv) == 0
    shutil.rmtree(out / "checkpoint")  # as a run killed before its first checkpoint
    for name in ("prefix_config.json", "prefix.safetensors"):
        (out / name).unlink()
    (out / "metrics.jsonl").write_text("a line a killed run half wrote")
    assert main(argv) == 0, capsys.readouterr().err
    assert all(json.loads(line)["step"] >= 0 for line in (out / "metrics.jsonl").read_text().splitlines())


def test_an_output_dir_that_is_a_file_is_named(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a folder")
    argv = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--output-dir", str(out)]
    assert main(argv) == 1
    assert f"--output-dir {out}: is a file, not a folder" in capsys.readouterr().err


def test_a_prefix_larger_than_the_machine_is_refused_before_it_is_allocated(monkeypatch):
    from tiny import tiny_model

    monkeypatch.setattr(runtime, "free_memory", lambda: 2 ** 20)  # a machine with 1 MiB free
    with pytest.raises(ValueError, match=r"--prefix-length: this prefix needs .* GiB of parameters .* more than the 0.0 "
                                         r"GiB of memory this machine has free"):
        PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=60000, reparameterize=False))
    PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=10, reparameterize=False))  # a small one fits


def test_a_prefix_whose_training_would_not_fit_is_refused_before_its_first_step(model_dir, data_files, tmp_path,
                                                                                monkeypatch, capsys):
    """Its parameters fit, but not their gradients and AdamW's moments too: refused, naming the options,
    before the optimizer allocates them or the output folder is made."""
    from prefixtune.base_models import load_model

    model, _ = load_model(model_dir)
    count = sum(p.numel() for p in PrefixModel.wrap(model, TrainConfig().prefix_config).parameters() if p.requires_grad)
    monkeypatch.setattr(runtime, "free_memory", lambda: 8 * count)  # room for the parameters, not for 3 more copies
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--output-dir", str(out)]) == 1
    assert (f"--prefix-length / --reparam-hidden-size: training {count:,} parameters needs 0.0 GiB more for their "
            "gradients and AdamW's two moments") in capsys.readouterr().err
    assert not out.exists()


def test_what_a_command_would_write_over_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    """Outputs never land on the run's own input, a folder, the current folder (an empty name) or a
    prefix or adapter already there; an empty ``--host`` (which binds every interface) is refused too."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "folder").mkdir()
    kept = {name: tmp_path / "kept" / name for name in ("adapter_config.json", "prefix_config.json")}
    for path in kept.values():
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    cases = [
        (["generate", "--input", "data.jsonl", "--output", str(data)], "--output: " + str(data) + " is the --input file"),
        (["eval", "--data", str(data), "--output", "./data.jsonl"], "--output: ./data.jsonl is the --data file"),
        (["eval", "--data", "data.jsonl", "--output", "folder"], "--output: folder is a folder"),
        (["generate", "--prompt", "hi", "--output", ""], "--output: must name a file"),
        (["serve", "--host", ""], "--host: must name an address"),
        (["export-peft", "missing", "kept"], "PEFT_DIR: kept already holds adapter_config.json"),
        (["export-peft", "missing", ""], "PEFT_DIR: must name a folder"),
        (["import-peft", "missing", "kept"], "OUT: kept already holds prefix_config.json"),
    ]
    for argv, message in cases:
        model = ["--model", "m"] if argv[0] in ("generate", "eval", "serve") else []  # refused before it is looked for
        assert main([argv[0], *model, *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert data.read_text() == '{"prompt": "a", "completion": "b"}\n'
    assert all(path.read_text() == "mine" for path in kept.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "folder", "kept"]


def test_a_file_name_of_bytes_that_are_not_utf8_is_still_a_name():
    """Python gives such a command-line name lone surrogates (``\\udce9`` for a Latin-1 é); it names a real file,
    so the options that name files take it, while a prompt, which is text for the tokenizer, does not."""
    config = TrainConfig(output_dir="run-caf\udce9", data="caf\udce9.jsonl")
    assert config.output_dir == "run-caf\udce9" and config.data == "caf\udce9.jsonl"
