"""One data root, ``$PREFIXTUNE_DATA``: configs name ``${PREFIXTUNE_DATA}/...``, the example and the studies read
the same variable, and without it each says so in one line naming the variable and docs/data.md."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA

from benchmarks import study
from prefixtune import options
from prefixtune.cli import main
from prefixtune.compare.config import CompareConfig
from prefixtune.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"e2e.yaml": ("train", TrainConfig), "e2e-cpu.yaml": ("train", TrainConfig),
           "compare-e2e.yaml": ("compare", CompareConfig)}


def test_every_config_is_listed_here():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_config_without_prefixtune_data_is_one_line_naming_it(name, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # whatever a run would write lands here, and nothing may
    command, _ = CONFIGS[name]
    assert main([command, "--config", str(ROOT / "configs" / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prefixtune {command}: error: {ROOT / 'configs' / name}: "
                                               "PREFIXTUNE_DATA is not set")
    assert "docs/data.md" in err[0] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_with_prefixtune_data_set_every_config_names_real_files(name, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(DATA))
    _, config_cls = CONFIGS[name]
    cfg = options.build(config_cls, {}, str(ROOT / "configs" / name))
    assert cfg.data == str(DATA / "e2e" / "trainset.csv") and cfg.eval_data == str(DATA / "e2e" / "devset.csv")
    assert Path(cfg.data).is_file() and Path(cfg.eval_data).is_file()


def test_only_the_data_placeholder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_DATA", "/data/root")
    monkeypatch.setenv("HOME", "/home/someone")
    config = tmp_path / "run.yaml"
    config.write_text("data: ${PREFIXTUNE_DATA}/e2e/trainset.csv\noutput_dir: ${HOME}/runs/$PREFIXTUNE_DATA\n"
                      "prompt_template: 'Table: {prompt}'\nmax_steps: 3\n")
    loaded = options.load_file(str(config), TrainConfig)
    assert loaded == {"data": "/data/root/e2e/trainset.csv", "output_dir": "${HOME}/runs/$PREFIXTUNE_DATA",
                      "prompt_template": "Table: {prompt}", "max_steps": 3}


def test_the_example_script_without_prefixtune_data_exits_with_one_line(monkeypatch):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.setattr(sys, "argv", ["examples/trainer_e2e.py"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "examples" / "trainer_e2e.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("examples/trainer_e2e.py: PREFIXTUNE_DATA is not set") and "docs/data.md" in message
    assert "\n" not in message


def test_the_studies_data_dir_defaults_to_prefixtune_data_and_names_both(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert study.data_root(None) == tmp_path and study.data_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("PREFIXTUNE_DATA")
    with pytest.raises(SystemExit, match=r"^--data-dir: not given, and PREFIXTUNE_DATA is not set: .*docs/data\.md"):
        study.data_root(None)


def test_only_ci_and_the_test_fixture_name_the_shared_data_folder():
    shared = re.compile(r"shared/data|shared\W+/\W+data")  # "../shared/data" or Path(...) / "shared" / "data"
    allowed = {".ci/run", "tests/conftest.py"}
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    naming = sorted(f for f in files if (ROOT / f).is_file() and f != "tests/test_data_location.py"
                    and shared.search((ROOT / f).read_text(encoding="utf-8", errors="replace")))
    assert naming == sorted(allowed)
