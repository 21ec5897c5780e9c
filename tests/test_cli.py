"""The command line and the README it must not contradict."""

import re
from pathlib import Path

import pytest

from prefixtune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) == 2, "the README's quick start is exactly two commands"
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_info_lists_the_families(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "gpt2" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_bad_demo_arguments_end_in_one_clear_line(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "prefixtune demo: error: --steps must be at least 1"


def test_missing_model_folder_is_a_clear_error(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "nope"), "--steps", "1"]) == 2
    assert "prefixtune demo: error:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help"])
def test_demo_help_explains_every_option(capsys, flag):
    with pytest.raises(SystemExit):
        main(["demo", flag])
    out = capsys.readouterr().out
    for option in ("--model", "--steps", "--batch-size", "--lr", "--seed", "--output-dir"):
        assert option in out
