"""Nothing a user types hurts a run or a server: every bad option value, file and prefix is refused in
one line before anything is written, and each defect a probe of the command line found stays fixed.
(The server's protocol is fuzzed in tests/test_serve_fuzz.py; launch modes and kills are in
tests/test_distributed.py and tests/test_train_command.py.)"""

import json
import os
import pickle
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CharTokenizer, tiny_model, tokens

from prefixtune import PrefixConfig, PrefixModel, options
from prefixtune.cli import main
from prefixtune.config import TrainConfig

# ------------------------------------------------------------------ one validation layer
# (command, arguments, what the one-line message must say)
BAD_OPTIONS = [
    ("train", ["--max-grad-norm", "-1"], "--max-grad-norm: must be at least 0, got -1.0"),
    ("train", ["--warmup-steps", "-5"], "--warmup-steps: must be at least 0, got -5"),
    ("train", ["--save-every", "-1"], "--save-every: must be at least 0, got -1"),
    ("train", ["--max-steps", "-5"], "--max-steps: must be at least 1, got -5"),
    ("train", ["--max-steps", "x"], "argument --max-steps: invalid int value: 'x'"),
    ("train", ["--prefix-length", "0"], "--prefix-length: must be at least 1, got 0"),
    ("train", ["--prefix-dropout", "1.5"], "--prefix-dropout: must be less than 1, got 1.5"),
    ("train", ["--lr", "-0.1"], "--lr: must be at least 0, got -0.1"),
    ("train", ["--epochs", "0"], "--epochs: must be more than 0, got 0.0"),
    ("train", ["--batch-size", "4", "--micro-batch-size", "5"], "--micro-batch-size: must be at most --batch-size (4)"),
    ("train", ["--metric", "bleu", "--metrics", "rouge_l"], "--metric: must be loss, perplexity or one of --metrics"),
    ("train", ["--layers", "0,x"], "argument --layers: invalid comma-separated list of whole numbers value"),
    ("train", ["--targets", "decoder,crosss"], "--targets: must be one of encoder, decoder, cross, got 'crosss'"),
    ("train", ["--init", "words"], "argument --init: invalid choice: 'words'"),
    ("train", ["--init", "text"], "init='text' needs init_text"),
    ("train", ["--data", "d.jsonl", "--eval-every", "5"], "--eval-every: needs --eval-data"),
    ("compare", ["--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
    ("compare", ["--lora-r", "0"], "--lora-r: must be at least 1, got 0"),
    ("compare", ["--eval-prompts", "-1"], "--eval-prompts: must be at least 1, got -1"),
    ("compare", ["--data", "d.jsonl"], "--eval-data: is required with --data"),
    ("serve", ["--max-batch", "0"], "--max-batch: must be at least 1, got 0"),
    ("serve", ["--port", "70000"], "--port: must be at most 65535, got 70000"),
    ("serve", ["--max-queue", "-1"], "--max-queue: must be at least 1, got -1"),
    ("serve", ["--device", "bogus"], "--device: must be auto, cpu, cuda, cuda:N, mps or another torch device name, got 'bogus'"),
    ("serve", ["--dtype", "bogus"], "--dtype: must be auto or a torch dtype (float32, bfloat16, float16), got 'bogus'"),
    ("serve", ["--max-body-mb", "1e12"], "--max-body-mb: must be at most 1024, got 1000000000000.0"),
    ("serve", ["--body-timeout", "inf"], "--body-timeout: must be a finite number, got inf"),
    ("serve", ["--max-header-kb", "0"], "--max-header-kb: must be at least 1, got 0"),
    ("serve", ["--max-connections", "0"], "--max-connections: must be at least 1, got 0"),
    ("eval", ["--limit", "0"], "--limit: must be at least 1, got 0"),
    ("generate", ["--temperature", "0"], "--temperature: must be at least 0.0001, got 0.0"),
    ("generate", ["--top-p", "1.5"], "--top-p: must be at most 1, got 1.5"),
]


@pytest.mark.parametrize("command, argv, message", BAD_OPTIONS, ids=[" ".join([c[0], *c[1]]) for c in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_it_and_nothing_is_written(command, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ["--output-dir", str(tmp_path / "out")] if command in ("train", "compare") else []
    with pytest.raises(SystemExit) if "argument --" in message else _no_raise() as parsed:
        assert main([command, *argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "argument --" in message:  # argparse's: the error and where to read more, not its 40-line usage
        assert parsed.value.code == 2 and err.strip().splitlines()[1:] == [f"(see `prefixtune {command} --help`)"], err
    else:
        assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("yaml_text, message", [
    ("layers: 99\n", "run.yaml: layers: must be a list, got 99"),
    ("max_grad_norm: -1\n", "run.yaml: max_grad_norm: must be at least 0, got -1"),
    ("prefix_length: ten\n", "run.yaml: prefix_length: must be a whole number, got 'ten'"),
    ("reparameterize: maybe\n", "run.yaml: reparameterize: must be true or false, got 'maybe'"),
    ("learning_rate: 3\n", "unknown option(s) learning_rate"),
])
def test_a_bad_value_in_a_config_file_names_the_file_and_the_key(yaml_text, message, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(yaml_text)
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_config_file_values_of_the_right_meaning_are_converted(tmp_path):
    (tmp_path / "run.yaml").write_text('reparameterize: "no"\nmax_steps: "2"\nlayers: "0,1"\nprefix_dropout: 0\n')
    cfg = options.build(TrainConfig, {}, str(tmp_path / "run.yaml"))
    assert cfg.prefix_config.reparameterize is False and cfg.max_steps == 2 and cfg.prefix_config.layers == (0, 1)


def test_the_python_api_checks_the_same_way():
    with pytest.raises(options.OptionError, match="--max-grad-norm: must be at least 0"):
        TrainConfig(max_grad_norm=-1)
    with pytest.raises(options.OptionError, match="--prefix-length: must be at least 1"):
        PrefixConfig(prefix_length=0)


# ------------------------------------------------------------------ resume
def _train(model_dir, data_files, out, *extra):
    return main(["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--prefix-length", "3",
                 "--reparam-hidden-size", "16", "--batch-size", "4", "--max-length", "64", "--save-every", "1",
                 "--output-dir", str(out), *extra])


def test_resume_refuses_a_changed_option_by_name_and_applies_a_longer_run(model_dir, data_files, tmp_path, capsys):
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "2") == 0
    capsys.readouterr()
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "2", "--prefix-length", "5", "--resume") == 1
    err = capsys.readouterr().err
    assert "--resume: --prefix-length is 5 here but 3 in the run being resumed" in err and "Traceback" not in err
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "2", "--lr", "0.5", "--resume") == 1
    assert "--lr is 0.5 here" in capsys.readouterr().err
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "4", "--resume") == 0
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text(), "config.yaml records what the run did"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def test_a_damaged_optimizer_checkpoint_is_one_line_on_resume(model_dir, data_files, tmp_path, capsys):
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "2") == 0
    optimizer = tmp_path / "checkpoint" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors: the checkpoint is damaged" in err and len(err.strip().splitlines()) == 1, err


def test_a_checkpoint_step_that_is_no_count_or_past_the_run_is_refused_and_the_log_kept(model_dir, data_files,
                                                                                     tmp_path, capsys, monkeypatch):
    """A resumed run counts on from the checkpoint's step and cuts its log back to it: a step that is not a
    count (negative, text) or lies past ``--max-steps`` is refused before the model loads, and so before the
    log or config.yaml change."""
    from prefixtune import train

    assert _train(model_dir, data_files, tmp_path, "--max-steps", "2") == 0
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    saved = state_file.read_text()
    kept = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    for step, argv, message in ((-5, ("--max-steps", "3"), "its step is -5, not a count of steps"),
                                ("x", ("--max-steps", "3"), "its step is 'x', not a count of steps"),
                                (2, ("--max-steps", "1"), "is at step 2, past the 1 steps of this run")):
        meta = json.loads(saved)
        meta["state"]["step"] = step
        state_file.write_text(json.dumps(meta))
        capsys.readouterr()
        assert _train(model_dir, data_files, tmp_path, *argv, "--resume") == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    monkeypatch.undo()  # a damaged log is found where it is cut back, after the model loads
    state_file.write_text(saved)
    (tmp_path / "metrics.jsonl").write_bytes(kept["metrics.jsonl"] + b"{not json\n")
    assert _train(model_dir, data_files, tmp_path, "--max-steps", "3", "--resume") == 1
    lines = len(kept["metrics.jsonl"].splitlines())
    assert f"metrics.jsonl:{lines + 1}: not a row of a run's log" in capsys.readouterr().err


# ------------------------------------------------------------------ prefixes checked at load
def _saved_prefix(tmp_path, change):
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2, reparameterize=False))
    folder = pm.save_prefix(tmp_path / "prefix")
    meta = json.loads((folder / "prefix_config.json").read_text())
    tensors = load_file(str(folder / "prefix.safetensors"))
    change(meta, tensors)
    (folder / "prefix_config.json").write_text(json.dumps(meta))
    save_file(tensors, str(folder / "prefix.safetensors"))
    return folder


def _nan(meta, tensors):
    tensors["key_values"][0, 0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize("change, message", [
    (lambda meta, t: meta.update(layers=[0, 5]), r"layers \[5\] are not layers of this model, which has 2"),
    (lambda meta, t: meta.update(layers=[1, 1]), "'layers' must list distinct layer indices"),
    (_nan, r"tensors \['key_values'\] hold NaN or infinite values"),
    (lambda meta, t: meta["base"].update(colour="red"), r"unknown key\(s\) \['colour'\] in its 'base' block"),
    (lambda meta, t: meta.update(base="llama"), "'base' must be a dict"),
    # the saved keys are named as saved, in their file, not as command-line options
    (lambda meta, t: meta["prefix"].update(prefix_length=-2), r"prefix_config.json: prefix: prefix_length: must be at "
                                                               r"least 1, got -2"),
    (lambda meta, t: meta["prefix"].update(dropout=3), r"prefix_config.json: prefix: dropout: must be less than 1"),
    (lambda meta, t: meta["prefix"].update(colour=1), r"prefix_config.json: prefix: unknown field\(s\) colour"),
])
def test_a_broken_prefix_is_refused_at_load_in_one_line(change, message, tmp_path):
    folder = _saved_prefix(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        PrefixModel.from_pretrained(tiny_model("llama"), folder)


def test_export_peft_names_what_is_broken_in_a_saved_prefix(tmp_path, capsys):
    for key in ("prefix", "base"):
        folder = _saved_prefix(tmp_path / key, lambda meta, t: meta.pop(key))
        assert main(["export-peft", str(folder), str(tmp_path / key / "peft")]) == 2
        err = capsys.readouterr().err
        assert f"prefix_config.json: '{key}' must be a dict, got NoneType" in err and "internal" not in err, err


def test_the_server_refuses_a_broken_prefix_with_a_400_and_serves_on(tmp_path):
    from prefixtune.serve import Batcher
    from prefixtune.serve.errors import APIError

    folder = _saved_prefix(tmp_path, lambda meta, t: meta.update(layers=[0, 5]))
    batcher = Batcher(PrefixModel(tiny_model("llama")), tokenizer=CharTokenizer(), base_name="base").start()
    try:
        with pytest.raises(APIError) as refused:
            batcher.add_prefix("broken", str(folder)).result(timeout=30)
        assert refused.value.status == 400 and "not layers of this model" in refused.value.message
        assert batcher.alive and batcher.model_names() == ["base"]
    finally:
        batcher.close()


# ------------------------------------------------------------------ files
def test_a_csv_field_over_128_kib_is_read(tmp_path):
    from prefixtune.data import load_examples

    (tmp_path / "long.csv").write_text("prompt,completion\n" + "w " * 100_000 + ",done\n")
    assert len(load_examples(str(tmp_path / "long.csv"))[0].prompt) == 200_000


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.json"])
def test_text_that_is_not_utf8_names_the_file_and_the_line(name, tmp_path):
    from prefixtune.data import DataError, load_examples

    rows = {"d.jsonl": b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "c"}\n',
            "d.csv": b"prompt,completion\na,b\n\xff,c\n",
            "d.json": b'[{"prompt": "a", "completion": "b"},\n {"prompt": "\xff", "completion": "c"}]'}[name]
    (tmp_path / name).write_bytes(rows)
    line = 2 if name != "d.csv" else 3
    with pytest.raises(DataError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xff"):
        load_examples(str(tmp_path / name))


DEEP = "[" * 100_000 + "]" * 100_000
"""Nested deeper than Python's JSON and YAML parsers go: they end in RecursionError."""


@pytest.mark.parametrize("name, content, message", [
    ("prefix_config.json", DEEP, "prefix_config.json: not valid JSON (nested too deeply)"),
    ("prefix_config.json", '{"format": 1' + "0" * 5000 + "}", "prefix_config.json: not valid JSON (ValueError: Exceeds"),
    ("prefix_config.json", b'{"note": "caf\xe9"}', "prefix_config.json:1: not UTF-8 text (byte 0xe9 at column 14)"),
    ("data.jsonl", DEEP, "data.jsonl:1: malformed JSON: nested too deeply"),
    ("data.json", DEEP, "data.json: malformed JSON: nested too deeply"),
    ("data.jsonl", '{"prompt": "caf\\ud800", "completion": "x"}',
     "data.jsonl:1: field 'prompt': holds U+D800 at character 4, a lone surrogate"),
    ("data.jsonl", '{"messages": [{"role": "user", "content": "\\udc00"}]}',
     "data.jsonl:1: field 'messages', message 1: holds U+DC00 at character 1"),
    ("config.yaml", "max_steps: " + DEEP, "config.yaml: nested too deeply to be a config of options"),
    ("config.yaml", b"# caf\xe9\nmax_steps: 3\n", "config.yaml:1: not UTF-8 text (byte 0xe9 at column 6)"),
    ("config.yaml", "max_steps: 3\nlr: 0.1\nmax_steps: 5\n", "config.yaml:3: not valid YAML ('max_steps' is given twice)"),
    ("config.yaml", "max_steps: [1\n", "config.yaml:2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
])
def test_a_file_no_parser_reads_is_one_line_naming_it(name, content, message, tmp_path, capsys, model_dir):
    """What the parsers give up on (nesting, huge numbers, bytes or escapes that are not text) is a bad file,
    named, with the exit code of bad input: not an internal error."""
    if name == "prefix_config.json":
        folder = _saved_prefix(tmp_path, lambda meta, tensors: None)
        argv = ["generate", "--model", model_dir, "--prefix", str(folder), "--prompt", "hi"]
    elif name == "config.yaml":
        folder, argv = tmp_path, ["train", "--config", str(tmp_path / name)]
    else:
        folder, argv = tmp_path, ["eval", "--model", model_dir, "--data", str(tmp_path / name)]
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err and len(err.splitlines()) == 1, err[:500]


def test_a_pickled_adapter_is_not_loaded_and_refused_in_one_line(tmp_path, capsys, model_dir):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                                                               "num_virtual_tokens": 2, "base_model_name_or_path": "x"}))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (peft_dir / "adapter_model.bin").write_bytes(pickle.dumps({"prompt_embeddings": Payload()}))
    assert main(["import-peft", str(peft_dir), str(tmp_path / "out"), "--base-model", model_dir]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin: not loaded: it holds more than tensors" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("config, weights, message", [
    ([], None, "adapter_config.json: not a PEFT adapter config (a JSON object with 'peft_type'), but a list"),
    (None, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\"", "adapter_model.safetensors: unreadable safetensors file"),
])
def test_a_peft_folder_of_the_wrong_shape_is_one_line_naming_the_file(config, weights, message, tmp_path, capsys,
                                                                      model_dir):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2} if config is None \
        else config
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    (peft_dir / "adapter_model.safetensors").write_bytes(weights or b"")  # truncated: a header cut short
    assert main(["import-peft", str(peft_dir), str(tmp_path / "out"), "--base-model", model_dir]) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_fails_fast_with_a_message_that_says_what_to_do(monkeypatch, capsys):
    from prefixtune import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub.reachable.cache_clear()
    start = time.monotonic()
    assert main(["generate", "--model", "someone/not-here", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 15
    assert "cannot reach the Hugging Face Hub" in err and "local folder" in err, err
    hub.reachable.cache_clear()


def test_an_error_no_check_anticipated_is_still_one_line(monkeypatch, capsys):
    from prefixtune import cli

    def broken(config):
        raise ZeroDivisionError("something inside")

    monkeypatch.setitem(cli.RUNNERS, "eval", broken)
    assert main(["eval", "--data", "x.jsonl"]) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: something inside (this is a bug; the traceback is in" in err
    assert len(err.strip().splitlines()) == 1


def test_generate_with_a_prefix_for_missing_layers_is_one_line(tmp_path, capsys, model_dir):
    pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=2, reparameterize=False))
    folder = pm.save_prefix(tmp_path / "prefix")
    meta = json.loads((folder / "prefix_config.json").read_text())
    meta["layers"] = [0, 5]
    (folder / "prefix_config.json").write_text(json.dumps(meta))
    assert main(["generate", "--model", model_dir, "--prefix", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "not layers of this model" in err and "Traceback" not in err


def test_exit_codes_tell_bad_input_from_a_refused_run_a_bug_and_ctrl_c(model_dir, data_files, tmp_path, capsys,
                                                                       monkeypatch):
    from prefixtune import cli

    run = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--max-steps", "1"]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "curves.png").write_bytes(b"mine")
    assert main([*run, "--output-dir", str(tmp_path / "kept")]) == 1  # a run refused: the folder holds a user's file
    assert main([*run, "--output-dir", str(tmp_path / "run"), "--lr", "-1"]) == 2  # bad input
    for error, code in ((ZeroDivisionError("a bug"), 3), (KeyboardInterrupt(), 130)):
        def raising(cfg, error=error):
            raise error
        monkeypatch.setitem(cli.RUNNERS, "train", raising)
        assert main([*run, "--output-dir", str(tmp_path / "run")]) == code
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and err.rstrip().endswith("prefixtune train: interrupted")


def test_tokens_helper_is_deterministic():
    assert torch.equal(tokens(1, 3), tokens(1, 3))
