"""The command line: every command end to end on a tiny model, each bad input ends in a
clear message naming the file and line (exit code 2), and the README it must not contradict."""

import json
import re
from pathlib import Path

import pytest

from prefixtune.artifacts import WEIGHTS_FILE
from prefixtune.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"n={i} ->", "completion": f" {i % 3}"}) + "\n" for i in range(12)))
    out = folder / "out"
    assert main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--prefix-length", "2", "--reparam-hidden-size", "8", "--batch-size", "4"]) == 0
    return data, out


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) == 2, "the README's quick start is exactly two commands"
    assert commands[0].endswith("prefixtune train") and commands[1].endswith("pytest -q")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("train", "eval", "generate"))


def test_train_help_has_a_line_for_every_required_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--eval-data", "--output-dir", "--prompt-field", "--completion-field",
                   "--prefix-length", "--reparam-hidden-size", "--lr", "--epochs", "--max-steps", "--batch-size",
                   "--max-length", "--seed", "--init-text", "--resume", "--config"):
        assert re.search(rf"^\s+{option}\b.*\S", out, flags=re.M), option


def test_eval_writes_metrics_json(model_dir, trained, tmp_path, capsys):
    data, out = trained
    target = tmp_path / "metrics.json"
    assert main(["eval", "--model", model_dir, "--prefix", str(out), "--data", str(data), "--metrics", "bleu,accuracy",
                 "--max-new-tokens", "3", "--output", str(target)]) == 0
    result = json.loads(target.read_text())
    assert {"loss", "perplexity", "bleu", "accuracy"} <= set(result) and len(result["generations"]) == 12
    shown = capsys.readouterr()
    assert "with prefix" in shown.out
    for phase in ("eval: loss", "generate", "metrics"):  # progress of each phase, as whole lines (not a terminal)
        assert f"{phase}: 100%" in shown.err, shown.err
    assert "\r" not in shown.err


def test_progress_written_to_a_log_is_a_few_whole_lines():
    import io

    from prefixtune import progress

    stream = io.StringIO()
    with progress.bar(400, "eval: generate", unit="batch", stream=stream) as shown:
        for _ in range(400):
            shown.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 1 <= len(lines) <= 12
    assert lines[-1].startswith("eval: generate: 100%") and "400/400" in lines[-1]


def test_generate_from_a_prompt_and_from_a_file(model_dir, trained, tmp_path, capsys):
    data, out = trained
    assert main(["generate", "--model", model_dir, "--prefix", str(out), "--prompt", "n=5 ->",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    target = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", model_dir, "--prefix", str(out), "--input", str(data),
                 "--max-new-tokens", "3", "--output", str(target), "--num-beams", "2"]) == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == 12 and all(set(line) == {"prompt", "generation"} for line in lines)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"bad\.jsonl:2"),
    ('{"prompt": "a"}\n', r"bad\.jsonl:1.*completion"),
    ("", r"bad\.jsonl.*no examples"),
])
def test_bad_training_data_is_named_with_file_and_line(model_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["train", "--model", model_dir, "--data", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and re.search(message, err[-1]) and err[-1].startswith("prefixtune train: error:")
    assert "Traceback" not in "\n".join(err)


def test_prompt_longer_than_max_length_fails_when_asked(model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 200, "completion": " end"}) + "\n")
    assert main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--max-length", "16", "--overflow", "fail"]) == 2
    assert re.search(r"long\.jsonl:1.*16", capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "missing.jsonl"], "missing.jsonl"),
    (["train", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["eval"], "--data is required"),
    (["generate"], "exactly one of --prompt TEXT or --input FILE"),
    (["train", "--config", "nope.yaml"], "--config nope.yaml: no such file"),
])
def test_bad_arguments_end_in_one_clear_line(capsys, argv, message, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --output-dir runs/prefix: not the one README's `prefixtune train` leaves here
    assert main([*argv, "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_data_file_is_named_before_the_output_folder_is_refused(tmp_path, capsys, model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHTS_FILE).write_bytes(b"")  # a folder train refuses without --resume
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(out), "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: file not found" in err and "already holds" not in err
    assert main(["train", "--output-dir", str(out), "--model", model_dir]) == 1  # the data fine: the folder is named
    assert "already holds a prefix" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.1\nlearning_rate: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err


def test_backslash_n_typed_in_a_prompt_template_is_a_line_break():
    from prefixtune import options
    from prefixtune.cli import _parser
    from prefixtune.config import EvalConfig

    args = _parser().parse_args(["eval", "--prompt-template", r"Table: {prompt}\nText:"])
    assert options.build(EvalConfig, args).prompt_template == "Table: {prompt}\nText:"


def test_train_and_eval_filter_rows_by_field(model_dir, tmp_path, capsys):
    data = tmp_path / "cats.jsonl"
    data.write_text("".join(json.dumps({"category": c, "prompt": f"{c} {i} ->", "completion": f" {i}"}) + "\n"
                            for i, c in enumerate(["City", "Food", "Airport", "Astronaut"] * 3)))
    out = tmp_path / "out"
    assert main(["train", "--model", model_dir, "--data", str(data), "--eval-data", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--prefix-length", "2", "--reparam-hidden-size", "8", "--batch-size", "2",
                 "--max-new-tokens", "2", "--train-where", "category!=City,Food", "--eval-where", "category=City"]) == 0
    scored = json.loads((out / "eval.json").read_text())["with prefix"]["generations"]
    assert [g["prompt"] for g in scored] == ["City 0 ->", "City 4 ->", "City 8 ->"]
    target = tmp_path / "m.json"
    assert main(["eval", "--model", model_dir, "--prefix", str(out), "--data", str(data), "--max-new-tokens", "2",
                 "--eval-where", "category=Food,Airport", "--limit", "3", "--output", str(target)]) == 0
    assert [g["prompt"] for g in json.loads(target.read_text())["generations"]] == ["Food 1 ->", "Airport 2 ->",
                                                                                   "Food 5 ->"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--train-where", "category"], "prefixtune train: error: --train-where: expected FIELD=V1,V2,..."),
    (["eval", "--eval-where", "=City"], "prefixtune eval: error: --eval-where: expected FIELD=V1,V2,..."),
    (["compare", "--eval-where", "category=="], "prefixtune compare: error: --eval-where: expected FIELD=V1,V2,..."),
    (["train", "--train-where", "categry=City"], "--train-where 'categry=City' names field 'categry'"),
    (["train", "--train-where", "category=Pasta"], "--train-where 'category=Pasta' keeps no row"),
])
def test_a_bad_filter_is_one_line_naming_the_option_and_nothing_is_written(model_dir, tmp_path, capsys, argv, message):
    data = tmp_path / "cats.jsonl"
    data.write_text(json.dumps({"category": "City", "prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "out"
    files = ["--data", str(data), "--eval-data", str(data)] if argv[0] != "eval" else ["--data", str(data)]
    assert main([*argv, "--model", model_dir, *files, "--output-dir" if argv[0] != "eval" else "--output",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_eval_group_by_scores_each_value_on_its_own_inputs_with_all_their_references(model_dir, trained, tmp_path,
                                                                                     capsys):
    from prefixtune.metrics import compute_metrics

    _, out = trained
    data = tmp_path / "groups.jsonl"
    rows = [("A", "n=1 ->", " 1"), ("A", "n=1 ->", " one"), ("B", "n=2 ->", " 2"), ("A", "n=3 ->", " 0"),
            ("B", "n=4 ->", " 1"), ("B", "n=4 ->", " four")]  # two inputs with two consecutive references each
    data.write_text("".join(json.dumps({"category": c, "prompt": p, "completion": t}) + "\n" for c, p, t in rows))
    target = tmp_path / "m.json"
    assert main(["eval", "--model", model_dir, "--prefix", str(out), "--data", str(data), "--max-new-tokens", "3",
                 "--metrics", "bleu,ter", "--group-by", "category", "--output", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["group_by"] == "category" and list(result["groups"]) == ["A", "B"]
    assert result["inputs"] == 4 and [result["groups"][g]["inputs"] for g in "AB"] == [2, 2]
    generations = result["generations"]
    assert [(g["group"], g["prompt"], g["references"]) for g in generations] == [
        ("A", "n=1 ->", [" 1", " one"]), ("A", "n=3 ->", [" 0"]), ("B", "n=2 ->", [" 2"]), ("B", "n=4 ->", [" 1", " four"])]
    for group in "AB":  # corpus metrics of the group's own inputs, not a mean
        mine = [g for g in generations if g["group"] == group]
        expected = compute_metrics(["bleu", "ter"], [g["generation"] for g in mine], [g["references"] for g in mine])
        assert result["groups"][group]["ter"] == pytest.approx(expected["ter"])
        assert result["groups"][group]["bleu"] == pytest.approx(expected["bleu"])
    overall = compute_metrics(["ter"], [g["generation"] for g in generations], [g["references"] for g in generations])
    assert result["ter"] == pytest.approx(overall["ter"])
    shown = capsys.readouterr().out
    assert re.search(r"^with prefix, all\s", shown, flags=re.M) and re.search(r"^  A\s", shown, flags=re.M)
    assert main(["eval", "--model", model_dir, "--prefix", str(out), "--data", str(data), "--group-by", "topic"]) == 2
    assert "--group-by names field 'topic'" in capsys.readouterr().err


def test_the_command_line_keeps_bitsandbytes_to_its_errors():
    """bitsandbytes (imported with PEFT) warns on CPUs with bf16 instructions that it could not fetch a kernel
    from the Hub and suggests trust_remote_code; the command line shows its errors only."""
    import logging

    from prefixtune import cli

    cli._quiet_logging()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)
