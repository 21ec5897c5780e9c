"""The recipe study: which prefix recipe should ``prefixtune train`` default to, judged on three tasks.

Stage 1 (screen, seed 0) runs :data:`STAGE1` on E2E, WebNLG and SST-2 at 120 steps of batch 8: the
paper's MLP at 3e-3, clipped at 1.0, the MLP at 1e-3 unclipped, the first with 10 % warmup,
the MLP with width-scaled (muP) rates at three base rates, the flat prefix at two rates and from real
words, a flat prefix beside LoRA, the memory prefix at two rates, LoRA r=8, the reference, and the
base model untrained, the floor (no training, so its row costs one evaluation);
stage 2 (confirm) runs the two best prefix arms and LoRA over seeds 0, 1 and 2 (and E2E at 600
steps); stage 3 made :data:`CHOSEN` ``prefixtune train``'s defaults (``prefixtune.recipe``); the
report gives, per task, each arm's mean ± sd over seeds, its final training loss, its largest loss /
running-median ratio (``prefixtune.spikes``) and its paired difference to LoRA seed by seed, on
every column where seeds are paired.

Tasks (:data:`TASKS`): E2E (the first 50 distinct dev inputs, BLEU and ROUGE-L), WebNLG
(trained on 7 of its 10 categories, scored on 50 dev inputs of the 7 and of the 3 held out, as
``benchmarks.webnlg_study``: BLEU, METEOR, TER) and SST-2 (the label generated as text,
accuracy on 50 dev inputs drawn with seed 0). Arms (:data:`ARMS`): a compare method at a rate,
with its clipping and warmup.

Rows that earlier studies measured under exactly the same setup (``benchmarks/results/
e2e-study.json``, ``webnlg-study.json``) are taken over rather than run again (:func:`reuse`);
they say so in ``reused_from``. So are the rows already in this study's own results file
(``--results``), so that a fresh checkout continues a study run in slices from its committed rows.
Every other run is one ``prefixtune.compare.runner.run_method`` call; rows are resumable and can be
shared among processes and machines (:mod:`benchmarks.study`).
Run from the repository root::

    python -m benchmarks.recipe_study --workers 1 --threads 1           # stage 1, then the report
    python -m benchmarks.recipe_study --arms mup-3e-2,memory-1e-2,flat-lora-1e-2,lora --seeds 0,1,2   # stage 2
    python -m benchmarks.recipe_study --tasks e2e --arms mup-3e-2,lora --budgets 600 --seeds 0,1,2
    python -m benchmarks.recipe_study --phase report --doc docs/studies/recipe.md   # stage 1's tables in the page
    python -m benchmarks.recipe_study --phase report --arms mup-3e-2,memory-1e-2,flat-lora-1e-2,lora \\
        --seeds 0,1,2 --budgets 120,600 \\
        --doc docs/studies/recipe.md --section "stage 2"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from pathlib import Path

from benchmarks import common, study, webnlg_study
from prefixtune.compare.config import CompareConfig
from prefixtune.compare.stats import format_mean_sd, paired
from prefixtune.metrics import lower_is_better

TASKS = {  # paths under --data-dir; the options of prefixtune compare that make each task
    "e2e": dict(data="e2e/trainset.csv", eval_data="e2e/devset.csv", prompt_field="mr", completion_field="ref",
                prompt_template="Table: {prompt}\nText:", max_length=160, metrics="bleu,rouge_l", max_new_tokens=64,
                init_text="table-to-text:"),
    "webnlg": dict(data="webnlg/train.jsonl", eval_data="webnlg/dev.jsonl", prompt_template=webnlg_study.TEMPLATE,
                   train_where=f"category!={','.join(webnlg_study.UNSEEN)}", eval_sets=webnlg_study.sets(),
                   max_length=256, metrics="bleu,meteor,ter", max_new_tokens=96, init_text="table-to-text:"),
    "sst2": dict(data="sst2/train_full.tsv", eval_data="sst2/dev.tsv", text_field="sentence", label_field="label",
                 prompt_template="Review: {prompt}\nSentiment (0 negative, 1 positive):", max_length=128,
                 metrics="accuracy", max_new_tokens=2, init_text="sentiment classification:"),
}
CAPTIONS = {"e2e": ("E2E", "dev BLEU and ROUGE-L"),
            "webnlg": ("WebNLG", "trained on 7 categories; seen and unseen dev inputs"),
            "sst2": ("SST-2", "dev accuracy, 50 sentences")}
"""How the report names each task and what its table holds."""
EVAL_SAMPLE = {"e2e": None, "webnlg": True, "sst2": True}
"""Whether a task scores ``--eval-prompts`` inputs drawn with seed 0 (``True``) or the first ones
(``None``): E2E keeps the E2E study's first 50 MRs, so that its rows carry over."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One recipe: a ``prefixtune compare`` method at a peak rate, with its clipping and warmup."""

    method: str
    lr: float
    max_grad_norm: float = 0.0
    warmup: float = 10
    """Warmup steps; a number below 1 is a share of the budget (0.1: 12 steps of 120)."""

    def changes(self, budget: int) -> dict:
        steps = round(self.warmup * budget) if self.warmup < 1 else min(int(self.warmup), budget // 4)
        return {"max_grad_norm": self.max_grad_norm, "max_steps": budget, "warmup_steps": steps}


ARMS = {
    "mlp-3e-3-clip": Arm("prefix", 3e-3, max_grad_norm=1.0),  # the paper's MLP, clipped (configs/e2e-cpu.yaml)
    "mlp-1e-3": Arm("prefix", 1e-3),
    "mlp-3e-3-clip-warm10pct": Arm("prefix", 3e-3, max_grad_norm=1.0, warmup=0.1),
    "mup-1e-2": Arm("prefix-mup", 1e-2),  # the MLP's matrices at lr / 512 (PrefixConfig.reparam_lr="width")
    "mup-3e-2": Arm("prefix-mup", 3e-2),
    "mup-1e-1": Arm("prefix-mup", 1e-1),
    "flat-1e-2": Arm("prefix-flat", 1e-2),
    "flat-3e-2": Arm("prefix-flat", 3e-2),
    "flat-words-3e-2": Arm("prefix-flat-words", 3e-2),
    "flat-lora-1e-2": Arm("prefix-lora", 1e-2),
    "memory-3e-3": Arm("prefix-memory", 3e-3),
    "memory-1e-2": Arm("prefix-memory", 1e-2),
    "lora": Arm("lora", 1e-2),
    "full": Arm("full", 5e-5),
    "base": Arm("base", 0.0),
}
CHOSEN = "mup-3e-2"
"""The arm stage 3 adopted: ``prefixtune train``'s defaults (``prefixtune.recipe``; tests/test_recipe.py holds
them equal)."""
STAGE1 = ("mlp-3e-3-clip", "mlp-1e-3", "mlp-3e-3-clip-warm10pct", "mup-1e-2", "mup-3e-2", "mup-1e-1", "flat-1e-2",
          "flat-3e-2", "flat-words-3e-2", "flat-lora-1e-2", "memory-3e-3", "memory-1e-2", "lora", "base")
"""The screen's arms (the default of ``--arms``)."""
REFERENCE = "lora"
"""The arm every other is compared with, seed by seed."""


def base_config(args, task: str) -> CompareConfig:
    spec = dict(TASKS[task])
    for key in ("data", "eval_data"):
        spec[key] = str(study.data_root(args.data_dir) / spec[key])
    sample = args.eval_prompts if EVAL_SAMPLE[task] else None
    return CompareConfig(**spec, batch_size=8, schedule="linear", train_limit=args.train_limit,
                         eval_prompts=args.eval_prompts, eval_sample=sample, eval_batch_size=args.eval_batch_size,
                         num_beams=1, model=args.model, device=args.device, threads=args.threads, isolate=False,
                         quiet=True, output_dir=args.out)


def runs(args) -> list[dict]:
    """Seed after seed, then budget, task and arm: a study stopped part-way leaves whole seeds."""
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for budget in (int(b) for b in args.budgets.split(",")):
            for task in args.tasks.split(","):
                for name in args.arms.split(","):
                    arm = ARMS[name]
                    out.append({"id": f"{task}-{name}-{budget}-s{seed}", "method": arm.method, "lr": arm.lr,
                                "task": task, "arm": name, "changes": {**arm.changes(budget), "seed": seed}})
    return out


def check(args) -> None:
    """Unknown tasks or arms, said before any run starts."""
    for option, names, known in (("--tasks", args.tasks, TASKS), ("--arms", args.arms, ARMS)):
        unknown = [n for n in names.split(",") if n not in known]
        if unknown:
            raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")


# ----------------------------------------------------------------------- rows measured before
EARLIER = {"e2e": "benchmarks/results/e2e-study.json", "webnlg": "benchmarks/results/webnlg-study.json"}
"""Studies whose setup a task repeats exactly: 120 steps of batch 8, 10 warmup steps, no clipping, the
same data, template, evaluation inputs and decoding."""


def earlier_row(task: str, run: dict) -> dict | None:
    """The row an earlier study measured for ``run``, in this study's row format, or ``None``."""
    changes = run["changes"]
    if task not in EARLIER or changes != {"max_grad_norm": 0.0, "max_steps": 120, "warmup_steps": 10,
                                          "seed": changes["seed"]}:
        return None
    path = common.ROOT / EARLIER[task]
    if task == "e2e":
        suffix = "" if changes["seed"] == 0 else f"-s{changes['seed']}"
        wanted = f"lr-{run['method']}-{run['lr']:g}{suffix}"
        found = [r for r in json.loads(path.read_text())["runs"] if r["id"] == wanted and r["status"] == "ok"]
        if not found or found[0]["options"].get("prefix_length", 10) != 10:
            return None
        row = {k: v for k, v in found[0].items() if k not in ("bleu", "rouge_l", "options", "phase")}
        row["metrics"] = {"bleu": found[0]["bleu"], "rouge_l": found[0]["rouge_l"]}
    else:
        found = [r for r in json.loads(path.read_text())["rows"]
                 if r["method"] == run["method"] and r["lr"] == run["lr"] and r["changes"] == {"seed": changes["seed"]}]
        if not found:
            return None
        row = dict(found[0])
    return {**row, "id": run["id"], "changes": changes, "reused_from": f"{EARLIER[task]}#{found[0]['id']}"}


def committed_rows(args) -> dict:
    """The rows of this study already in its results file (``--results``), by id: a fresh checkout resumes
    from them, so a study run in slices keeps every slice's rows once they are committed."""
    path = Path(args.results) if getattr(args, "results", None) else None
    if path is None or not path.is_file():
        return {}
    return {row["id"]: row for row in json.loads(path.read_text())["rows"]}


def reuse(args, plan: list[dict]) -> None:
    """Write the rows this study's results file or earlier studies already hold for runs of ``plan`` that
    have none yet."""
    folder = Path(args.out) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    committed = {} if args.train_limit else committed_rows(args)
    for run in plan:
        target = folder / f"{run['id']}.json"
        if target.exists() or args.train_limit:
            continue
        row = committed.get(run["id"]) or earlier_row(run["task"], run)
        if row is not None:
            target.write_text(json.dumps(row, indent=1))
            print(f"{run['id']}: taken from {row.get('reused_from') or args.results}", flush=True)


# ---------------------------------------------------------------------------------- report
def columns(task: str) -> list[tuple[str, str | None, str]]:
    """``(label, set, metric)`` of a task's report: each metric of each evaluation set."""
    metrics = TASKS[task]["metrics"].split(",")
    sets = ("seen", "unseen") if TASKS[task].get("eval_sets") else (None,)
    return [(f"{s} {m.upper()}" if s else m.upper().replace("_", "-"), s, m) for s in sets for m in metrics]


def score(row: dict, part: str | None, metric: str) -> float:
    return (row["sets"][part] if part else row)["metrics"][metric]


LEGEND = ("Mean ± sd over seeds; spike: the largest loss / running median after warmup, and in how many runs it "
          "exceeded 2 (`-`: a row taken over from an earlier study, which did not record it, or `base`, which "
          "does not train); Δ: the arm minus "
          f"`{REFERENCE}` on the task's first column, seed by seed (mean ± sd; better in how many seeds; `-` until "
          f"`{REFERENCE}`'s row exists); a classification task's last line: the accuracy of always answering its "
          "scored inputs' most common label.")


def report(args) -> str:
    """The tables of ``--tasks`` x ``--budgets`` for ``--arms`` over ``--seeds``: written to OUT/study.md, and
    between the markers of ``--section`` in ``--doc`` when given; every row, of any seed, to ``--results``."""
    rows = [r for r in study.load_rows(Path(args.out)).values() if r.get("status") == "ok"]
    seeds = {int(seed) for seed in args.seeds.split(",")}
    shown = [r for r in rows if r["changes"]["seed"] in seeds]
    lines = [LEGEND, ""]
    for task in args.tasks.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            lines += table(shown, task, budget, args.arms.split(","))
            lines += differences(shown, task, budget, args.arms.split(","))
    text = "\n".join(lines).strip() + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study.md").write_text(text)
    if getattr(args, "doc", None):
        write_section(Path(args.doc), args.section, text)
    if args.results:
        results = {"benchmark": "recipe_study", **common.header(__file__, None), "tasks": TASKS,
                   "arms": {k: dataclasses.asdict(v) for k, v in ARMS.items()},
                   "rows": [curated(r) for r in rows]}
        Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    return text


def write_section(doc: Path, section: str, text: str) -> None:
    """Replace what lies between ``<!-- SECTION: begin -->`` and ``<!-- SECTION: end -->`` in ``doc``."""
    begin, end = f"<!-- {section}: begin -->", f"<!-- {section}: end -->"
    page = doc.read_text()
    if begin not in page or end not in page:
        raise SystemExit(f"--doc {doc}: no lines {begin!r} and {end!r} to write section {section!r} between")
    head, rest = page.split(begin, 1)
    doc.write_text(f"{head}{begin}\n\n{text}\n{end}{rest.split(end, 1)[1]}")


def curated(row: dict) -> dict:
    """A row as the results file keeps it: without per-step losses, generated texts (of each evaluation
    set too) or the machine's checkpoint path; every score, summary and timing stays."""
    out = {k: v for k, v in row.items() if k not in ("losses", "samples", "checkpoint")}
    if "samples" in row and "accuracy" in row.get("metrics", {}):
        out["label_counts"] = label_counts(row)
    if "sets" in out:
        out["sets"] = {name: {k: v for k, v in part.items() if k != "samples"} for name, part in out["sets"].items()}
    return out


def label_counts(row: dict) -> dict[str, int]:
    """How often each label is the answer among a classification row's scored inputs."""
    if "label_counts" in row:
        return row["label_counts"]
    return dict(Counter(sample["references"][0] for sample in row["samples"]))


def train_loss(rows: list[dict]) -> str:
    """The rows' final training loss, mean ± sd (``-`` for an arm that does not train, as ``base``)."""
    losses = [r.get("final_loss") for r in rows]
    if any(loss is None or math.isnan(loss) for loss in losses):
        return "-"
    return format_mean_sd(losses, 3)


def by_arm(rows: list[dict], task: str, budget: int, arms: list[str]) -> dict[str, list[dict]]:
    """Each arm's rows of ``task`` at ``budget`` steps (one per seed)."""
    return {arm: [r for r in rows if r["id"].startswith(f"{task}-{arm}-{budget}-s")] for arm in arms}


def by_seed(rows: list[dict], part: str | None, metric: str) -> dict[int, float]:
    """``{seed: score}`` of one arm's rows on one column."""
    return {r["changes"]["seed"]: score(r, part, metric) for r in rows}


def better(difference: dict, metric: str) -> int:
    """In how many seeds of a :func:`paired` difference the arm beats the reference (lower TER is better)."""
    return difference["n"] - difference["above"] if lower_is_better(metric) else difference["above"]


def table(rows: list[dict], task: str, budget: int, arms: list[str]) -> list[str]:
    cols = columns(task)
    mine = by_arm(rows, task, budget, arms)
    if not any(mine.values()):
        return []
    name, holds = CAPTIONS[task]
    lines = [f"**{name}, {budget} steps** ({holds}):", "", "| arm | seeds | " + " | ".join(c[0] for c in cols)
             + f" | train loss | spike | Δ {cols[0][0]} |", "|---|---|" + "---|" * (len(cols) + 3)]
    label, part, metric = cols[0]
    reference = by_seed(mine.get(REFERENCE, []), part, metric)
    for arm, got in mine.items():
        if not got:
            continue
        ratios = [r["spike_ratio"] for r in got if r.get("spike_ratio") is not None]
        spike = f"{max(ratios):.2f} ({sum(bool(r.get('spike')) for r in got)})" if ratios else "-"
        d = paired(by_seed(got, part, metric), reference)
        delta = (f"{format_mean_sd(d['diffs'], 2, sign=True)} ({better(d, metric)}/{d['n']})"
                 if d["n"] and arm != REFERENCE else "-")
        cells = [format_mean_sd([score(r, s, m) for r in got]) for _, s, m in cols]
        lines.append(f"| {arm} | {len(got)} | " + " | ".join(cells)
                     + f" | {train_loss(got)} | {spike} | {delta} |")
    scored = next((r for got in mine.values() for r in got if "samples" in r or "label_counts" in r), None)
    if metric == "accuracy" and scored is not None:  # every row scores the same inputs: one row's labels
        counts = label_counts(scored)
        most, total = max(counts.values()), sum(counts.values())
        lines.append(f"| *always the most common label* | | {100 * most / total:.1f} |" + " |" * (len(cols) + 2))
    return lines + [""]


def differences(rows: list[dict], task: str, budget: int, arms: list[str]) -> list[str]:
    """Each arm minus :data:`REFERENCE` on every column of the task, seed by seed: ``mean ± sd``, the
    standard error of the mean in brackets, and in how many seeds the arm is better. Shown where some arm
    has two or more seeds paired with the reference's (a screen's single seed says all in its table)."""
    cols = columns(task)
    mine = by_arm(rows, task, budget, arms)
    reference = mine.get(REFERENCE, [])
    cells = {}
    for arm, got in mine.items():
        if arm == REFERENCE or not got:
            continue
        cells[arm] = [paired(by_seed(got, s, m), by_seed(reference, s, m)) | {"metric": m} for _, s, m in cols]
    if not any(d["n"] >= 2 for row in cells.values() for d in row):
        return []
    lines = [f"Paired differences to `{REFERENCE}`, {budget} steps: mean ± sd (standard error) over the seeds both "
             "have; better in how many:", "", "| arm | seeds | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for arm, row in cells.items():
        shown_cells = []
        for d in row:
            error = f" ({d['sd'] / math.sqrt(d['n']):.2f})" if d["n"] >= 2 else ""
            shown_cells.append(f"{format_mean_sd(d['diffs'], 2, sign=True)}{error} {better(d, d['metric'])}/{d['n']}"
                               if d["n"] else "-")
        lines.append(f"| {arm} | {row[0]['n']} | " + " | ".join(shown_cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser, out="runs/recipe-study", results="benchmarks/results/recipe-study.json")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--arms", default=",".join(STAGE1), help=f"of {', '.join(ARMS)} (default: stage 1's)")
    parser.add_argument("--budgets", default="120", help="optimizer steps of batch 8")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training rows (a smoke run; "
                        "earlier studies' rows are then not taken over)")
    parser.add_argument("--eval-prompts", type=int, default=50, help="dev inputs scored (per set on WebNLG)")
    parser.add_argument("--doc", default=None, help="a Markdown page whose section --section the report's tables "
                        "replace (docs/studies/recipe.md)")
    parser.add_argument("--section", default="stage 1", help="the name in the page's markers "
                        "<!-- NAME: begin --> and <!-- NAME: end -->")
    args = parser.parse_args(argv)
    check(args)
    if args.phase == "run" and not args.worker:
        reuse(args, runs(args))
    config_of = lambda run: base_config(args, run["task"])  # noqa: E731 - each task has its own data and metric
    return study.run_study(args, "benchmarks.recipe_study", lambda: runs(args), config_of, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
