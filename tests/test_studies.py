"""The study scripts (benchmarks.webnlg_study, benchmarks.recipe_study) end to end on a tiny model and a
few steps: their plans, resumable rows and reports. The real studies are hours of CPU; these are smoke runs."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import DATA

from benchmarks import study, webnlg_study


@pytest.mark.slow  # about 10 s: two methods, two seeds, real WebNLG rows
def test_webnlg_study_trains_on_seen_categories_and_scores_seen_and_unseen(model_dir, tmp_path, capsys):
    out = tmp_path / "webnlg"
    argv = ["--model", model_dir, "--out", str(out), "--results", str(tmp_path / "webnlg.json"), "--methods",
            "prefix-flat,lora", "--seeds", "0,1", "--reference", "prefix-flat", "--steps", "2", "--train-limit", "16",
            "--eval-prompts", "2", "--metrics", "bleu,ter", "--max-new-tokens", "4", "--data-dir", str(DATA)]
    assert webnlg_study.main(argv) == 0
    rows = study.load_rows(out)
    assert sorted(rows) == ["lora-s0", "lora-s1", "prefix-flat-s0", "prefix-flat-s1"]
    row = rows["lora-s1"]
    assert row["status"] == "ok" and row["seed"] == 1 and set(row["sets"]) == {"seen", "unseen"}
    unseen = {json.loads(line)["prompt"]: json.loads(line)["category"]
              for line in (DATA / "webnlg" / "dev.jsonl").read_text().splitlines()}
    assert {unseen[s["prompt"]] for s in row["sets"]["unseen"]["samples"]} <= set(webnlg_study.UNSEEN)
    assert not {unseen[s["prompt"]] for s in row["sets"]["seen"]["samples"]} & set(webnlg_study.UNSEEN)
    text = (out / "study.md").read_text()
    assert "| lora | 2 |" in text and "| 64.2 / 27.7 |" not in text and "- lora, unseen TER:" in text
    saved = json.loads((tmp_path / "webnlg.json").read_text())
    assert saved["unseen"] == list(webnlg_study.UNSEEN) and len(saved["rows"]) == 4 and "command" in saved
    # resumable: a second run finds every row and trains nothing
    (out / "runs" / "lora-s1.json").write_text(json.dumps({**row, "final_loss": 9.0}))
    capsys.readouterr()
    assert webnlg_study.main(argv) == 0
    assert "lora-s1:" not in capsys.readouterr().out and study.load_rows(out)["lora-s1"]["final_loss"] == 9.0


def test_webnlg_study_plan_and_report_beside_the_paper(tmp_path):
    import argparse

    args = argparse.Namespace(methods="prefix,full", seeds="0,1,2", out=str(tmp_path), metrics="bleu,ter", results="",
                              reference="prefix")
    assert [r["id"] for r in webnlg_study.runs(args)][:3] == ["prefix-s0", "full-s0", "prefix-s1"]
    assert webnlg_study.sets() == "seen:category!=City,Food,Monument;unseen:category=City,Food,Monument"
    (tmp_path / "runs").mkdir()
    for i, (method, seed, ter) in enumerate([("prefix", 0, 40.0), ("full", 0, 50.0), ("prefix", 1, 42.0),
                                             ("full", 1, 41.0)]):
        sets = {part: {"metrics": {"bleu": 10.0 * (i + 1), "ter": ter}} for part in ("seen", "unseen")}
        (tmp_path / "runs" / f"{method}-s{seed}.json").write_text(json.dumps(
            {"id": f"{method}-s{seed}", "method": method, "seed": seed, "status": "ok", "final_loss": 1.0,
             "sets": sets, "spike": method == "full" and seed == 1, "spike_ratio": 2.5}))
    text = webnlg_study.report(args)
    assert "| prefix | 2 | 1.000 ± 0.000 | 20.0 ± 14.1 | 41.0 ± 1.4 | 20.0 ± 14.1 | 41.0 ± 1.4 | 62.9 / 45.6 |" in text
    assert "| full | 2 |" in text and "| 64.2 / 27.7 |" in text
    assert "- full, unseen TER: +4.50 ± 7.78 (better in 1 of 2)" in text  # lower TER is better: seed 1 only
    assert "full-s1 (2.50)" in text


def test_recipe_study_plan_covers_the_grid():
    import argparse

    from benchmarks import recipe_study

    args = argparse.Namespace(tasks="e2e,webnlg,sst2", arms=",".join(recipe_study.ARMS), budgets="120,600", seeds="0,1,2")
    plan = recipe_study.runs(args)
    assert len(plan) == 3 * 2 * 3 * len(recipe_study.ARMS)  # seeds x budgets x tasks x arms
    assert len({r["id"] for r in plan}) == len(plan)
    warm = next(r for r in plan if r["id"] == "sst2-mlp-3e-3-clip-warm10pct-600-s2")
    assert warm["method"] == "prefix" and warm["lr"] == 3e-3
    assert warm["changes"] == {"max_grad_norm": 1.0, "max_steps": 600, "seed": 2, "warmup_steps": 60}
    assert next(r for r in plan if r["id"] == "e2e-lora-120-s0")["changes"]["warmup_steps"] == 10
    per_seed = 2 * 3 * len(recipe_study.ARMS)
    assert [r["changes"]["seed"] for r in plan[:per_seed]] == [0] * per_seed  # whole seeds first
    with pytest.raises(SystemExit, match="--arms: unknown dora"):
        recipe_study.check(argparse.Namespace(tasks="e2e", arms="lora,dora"))


def test_recipe_study_takes_over_rows_measured_under_the_same_setup(tmp_path):
    import argparse

    from benchmarks import recipe_study

    args = argparse.Namespace(tasks="e2e,webnlg", arms="mlp-1e-3,mlp-3e-3-clip,lora", budgets="120,600", seeds="1",
                              out=str(tmp_path), train_limit=None, results=None)
    recipe_study.reuse(args, recipe_study.runs(args))
    rows = study.load_rows(tmp_path)
    assert sorted(rows) == ["e2e-lora-120-s1", "e2e-mlp-1e-3-120-s1", "webnlg-lora-120-s1", "webnlg-mlp-1e-3-120-s1"]
    assert rows["e2e-mlp-1e-3-120-s1"]["reused_from"] == "benchmarks/results/e2e-study.json#lr-prefix-0.001-s1"
    assert rows["e2e-lora-120-s1"]["reused_from"] == "benchmarks/results/e2e-study.json#lr-lora-0.01-s1"
    assert set(rows["e2e-lora-120-s1"]["metrics"]) == {"bleu", "rouge_l"} and rows["e2e-lora-120-s1"]["seed"] == 1
    assert rows["webnlg-mlp-1e-3-120-s1"]["reused_from"] == "benchmarks/results/webnlg-study.json#prefix-s1"


def test_recipe_study_resumes_from_the_rows_of_its_committed_results_file(tmp_path):
    import argparse

    from benchmarks import recipe_study

    row = {"id": "sst2-lora-120-s0", "status": "ok", "metrics": {"accuracy": 90.0}, "final_loss": 0.3,
           "changes": {"max_steps": 120, "seed": 0}}
    results = tmp_path / "recipe-study.json"
    results.write_text(json.dumps({"rows": [row]}))
    args = argparse.Namespace(tasks="sst2", arms="lora,flat-3e-2", budgets="120", seeds="0", out=str(tmp_path / "out"),
                              train_limit=None, results=str(results))
    recipe_study.reuse(args, recipe_study.runs(args))
    assert study.load_rows(tmp_path / "out") == {"sst2-lora-120-s0": row}  # flat-3e-2 on SST-2 is still to run


@pytest.mark.slow  # about 20 s: two tasks, three arms, two budgets on a tiny model
def test_recipe_study_runs_each_task_and_records_spike_ratios(model_dir, tmp_path):
    from benchmarks import recipe_study

    out = tmp_path / "recipe"
    assert recipe_study.main(["--model", model_dir, "--out", str(out), "--results", str(tmp_path / "recipe.json"),
                              "--tasks", "sst2,e2e", "--arms", "flat-3e-2,mlp-3e-3-clip,lora", "--budgets", "7,3",
                              "--seeds", "0", "--train-limit", "16", "--eval-prompts", "2",
                              "--data-dir", str(DATA)]) == 0
    rows = study.load_rows(out)
    assert len(rows) == 2 * 3 * 2 and all(r["status"] == "ok" for r in rows.values())
    assert not any("reused_from" in r for r in rows.values())  # a smoke run (--train-limit) measures everything
    assert set(rows["sst2-flat-3e-2-7-s0"]["metrics"]) == {"accuracy"}
    assert set(rows["e2e-flat-3e-2-7-s0"]["metrics"]) == {"bleu", "rouge_l"}
    assert rows["e2e-flat-3e-2-7-s0"]["spike_ratio"] > 0 and rows["e2e-flat-3e-2-3-s0"]["spike_ratio"] is None
    text = (out / "study.md").read_text()
    assert "**SST-2, 7 steps**" in text and "| mlp-3e-3-clip | 1 |" in text and "| lora | 1 |" in text
    assert "| *always the most common label* | | 50.0 |" in text  # the two sentences drawn: one of each label
    assert len(json.loads((tmp_path / "recipe.json").read_text())["rows"]) == 12


def test_recipe_study_report_writes_its_tables_into_the_page_between_the_markers(tmp_path):
    import argparse

    from benchmarks import recipe_study

    def row(arm, seed, accuracy):
        return {"id": f"sst2-{arm}-120-s{seed}", "status": "ok", "metrics": {"accuracy": accuracy}, "final_loss": 0.3,
                "changes": {"max_steps": 120, "seed": seed}, "spike_ratio": 1.2, "spike": False,
                "samples": [{"references": [label]} for label in "1110"]}

    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    for r in (row("lora", 0, 75.0), row("lora", 1, 50.0), row("flat-3e-2", 0, 25.0), row("flat-3e-2", 1, 75.0)):
        (out / "runs" / f"{r['id']}.json").write_text(json.dumps(r))
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\n<!-- stage 1: begin -->\nold table\n<!-- stage 1: end -->\n\n## Reading\n")
    results = tmp_path / "results.json"
    args = argparse.Namespace(out=str(out), tasks="sst2", arms="flat-3e-2,lora", budgets="120", seeds="0",
                              doc=str(doc), section="stage 1", results=str(results))
    recipe_study.report(args)
    page = doc.read_text()
    assert "old table" not in page and page.startswith("# Page\n\n<!-- stage 1: begin -->\n\nMean ± sd")
    assert page.endswith("<!-- stage 1: end -->\n\n## Reading\n")
    assert "| flat-3e-2 | 1 | 25.0 |" in page and "-50.00 (0/1)" in page  # seed 0 only: the stage's seeds
    assert "| *always the most common label* | | 75.0 |" in page
    assert "Paired differences" not in page  # one seed: the table's Δ column says it all
    args.seeds = "0,1"
    two = recipe_study.report(args)  # flat - lora: -50 and +25, mean -12.5, sd 53.03, SE 37.50
    assert "| flat-3e-2 | 2 | -12.50 ± 53.03 (37.50) 1/2 |" in two
    args.seeds = "0"
    saved = json.loads(results.read_text())["rows"]
    assert len(saved) == 4 and all(r["label_counts"] == {"1": 3, "0": 1} and "samples" not in r for r in saved)
    args.section = "stage 2"
    with pytest.raises(SystemExit, match="stage 2: begin"):
        recipe_study.report(args)


@dataclasses.dataclass
class _Config:
    seed: int = 0


def _fake_runs(monkeypatch, ran: list):
    """Three runs, with ``run_method`` replaced by one that records the run and returns a row."""
    from prefixtune.compare import runner

    def run_method(cfg, method, lr, checkpoint):
        ran.append(method)
        return {"status": "ok", "metrics": {}, "final_loss": 1.0}

    monkeypatch.setattr(runner, "run_method", run_method)
    return [{"id": name, "method": name, "lr": 1e-2, "changes": {}} for name in ("a", "b", "c")]


def test_a_study_skips_a_run_a_live_process_has_claimed_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    ran: list = []
    runs = _fake_runs(monkeypatch, ran)
    claims = tmp_path / "claims"
    claims.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (claims / "a").write_text(str(live.pid))  # another worker is running "a"
        (claims / "b").write_text(str(dead.pid))  # "b"'s worker was killed part-way
        study.execute(runs, lambda run: _Config(), tmp_path, (0, 1))
        assert ran == ["b", "c"] and sorted(study.load_rows(tmp_path)) == ["b", "c"]
        assert sorted(p.name for p in claims.iterdir()) == ["a"]  # a claim goes when its row is written
        assert not study.claim(tmp_path, "a")
    finally:
        live.kill()
        live.wait()
    assert study.claim(tmp_path, "a") and (claims / "a").read_text() == str(os.getpid())  # its claimant is gone


def test_two_commands_over_one_out_folder_run_each_run_once(tmp_path, monkeypatch):
    ran: list = []
    runs = _fake_runs(monkeypatch, ran)
    study.execute(runs, lambda run: _Config(), tmp_path, (0, 1))
    study.execute(runs, lambda run: _Config(), tmp_path, (0, 1))
    assert ran == ["a", "b", "c"]
