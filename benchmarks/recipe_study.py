"""The recipe grid: which prefix recipe wins across tasks, budgets and seeds, and which ones spike.

Arms (:data:`ARMS`): the flat prefix and the MLP prefix, each from a random start and from real
words (``--init-text``), each with and without gradient clipping at 1.0, at their ``prefixtune
compare`` default rates; LoRA r=8; full fine-tuning at the first budget only. Tasks
(:data:`TASKS`): E2E and WebNLG (generation, BLEU and ROUGE-L) and SST-2 (the label generated as
text, accuracy). Budgets: 120 and 600 steps of batch 8. Seeds 0, 1, 2. Every run records its
largest loss / running-median ratio (``prefixtune.spikes``), so the report says which recipes
spike where.

Every run is one ``prefixtune.compare.runner.run_method`` call; rows are resumable and can be
shared among processes and machines (:mod:`benchmarks.study`). Run from the repository root::

    python -m benchmarks.recipe_study                                   # the whole grid, then the report
    python -m benchmarks.recipe_study --tasks sst2 --budgets 120        # a part of it
    python -m benchmarks.recipe_study --shard 1/4 --threads 1           # machine 1 of 4
    python -m benchmarks.recipe_study --phase report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common, study
from prefixtune.compare.config import CompareConfig
from prefixtune.compare.methods import METHODS
from prefixtune.compare.stats import format_mean_sd

TASKS = {  # paths under --data-dir; the options of prefixtune compare that make each task
    "e2e": dict(data="e2e/trainset.csv", eval_data="e2e/devset.csv", prompt_field="mr", completion_field="ref",
                prompt_template="Table: {prompt}\nText:", max_length=160, metrics="bleu,rouge_l", max_new_tokens=64,
                init_text="table-to-text:"),
    "webnlg": dict(data="webnlg/train.jsonl", eval_data="webnlg/dev.jsonl", prompt_template="Triples: {prompt}\nText:",
                   max_length=256, metrics="bleu,rouge_l", max_new_tokens=96, init_text="table-to-text:"),
    "sst2": dict(data="sst2/train_full.tsv", eval_data="sst2/dev.tsv", text_field="sentence", label_field="label",
                 prompt_template="Review: {prompt}\nSentiment (0 negative, 1 positive):", max_length=128,
                 metrics="accuracy", max_new_tokens=2, init_text="sentiment classification:"),
}
ARMS = {  # name: (compare method, changes)
    **{f"{method}{'-clip' if clip else ''}": (method, {"max_grad_norm": 1.0 if clip else 0.0})
       for method in ("prefix-flat", "prefix-flat-words", "prefix", "prefix-words") for clip in (False, True)},
    "lora": ("lora", {"max_grad_norm": 0.0}),
    "full": ("full", {"max_grad_norm": 0.0}),
}
FULL_BUDGETS = 1
"""Full fine-tuning runs at the first budget only (it is the slowest arm by far)."""


def base_config(args, task: str) -> CompareConfig:
    spec = dict(TASKS[task])
    for key in ("data", "eval_data"):
        spec[key] = str(Path(args.data_dir) / spec[key])
    return CompareConfig(**spec, batch_size=8, warmup_steps=10, schedule="linear", train_limit=args.train_limit,
                         eval_sample=args.eval_prompts, eval_batch_size=args.eval_batch_size, num_beams=1,
                         model=args.model, device=args.device, threads=args.threads, isolate=False, quiet=True,
                         output_dir=args.out)


def runs(args) -> list[dict]:
    """Seed after seed, then budget, task and arm: a grid stopped part-way leaves whole seeds."""
    budgets = [int(b) for b in args.budgets.split(",")]
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for budget in budgets:
            for task in args.tasks.split(","):
                for arm in args.arms.split(","):
                    if arm == "full" and budget not in budgets[:FULL_BUDGETS]:
                        continue
                    method, changes = ARMS[arm]
                    out.append({"id": f"{task}-{arm}-{budget}-s{seed}", "method": method, "lr": METHODS[method].lr,
                                "task": task, "changes": {**changes, "max_steps": budget, "seed": seed,
                                                          "warmup_steps": min(10, budget // 4)}})
    return out


def check(args) -> None:
    """Unknown tasks or arms, said before any run starts."""
    for option, names, known in (("--tasks", args.tasks, TASKS), ("--arms", args.arms, ARMS)):
        unknown = [n for n in names.split(",") if n not in known]
        if unknown:
            raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")


# ---------------------------------------------------------------------------------- report
def report(args) -> str:
    rows = [r for r in study.load_rows(Path(args.out)).values() if r.get("status") == "ok"]
    lines = ["### The recipe grid (mean ± sd over seeds; the spike column: largest loss / running median, and "
             "how many runs exceeded 2)", ""]
    for task in args.tasks.split(","):
        metric = TASKS[task]["metrics"].split(",")[0]
        budgets = sorted({r["changes"]["max_steps"] for r in rows if r["id"].startswith(f"{task}-")})
        if not budgets:
            continue
        lines += [f"{task} ({metric}):", "", "| arm | " + " | ".join(f"{b} steps | loss | spike" for b in budgets) + " |",
                  "|---|" + "---|---|---|" * len(budgets)]
        for arm in args.arms.split(","):
            cells = []
            for budget in budgets:
                mine = [r for r in rows if r["id"].startswith(f"{task}-{arm}-{budget}-s")]
                ratios = [r["spike_ratio"] for r in mine if r.get("spike_ratio") is not None]
                spike = f"{max(ratios):.2f} ({sum(bool(r.get('spike')) for r in mine)})" if ratios else "-"
                cells += [format_mean_sd([r["metrics"][metric] for r in mine]),
                          format_mean_sd([r["final_loss"] for r in mine], 3), spike]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study.md").write_text(text)
    if args.results:
        results = {"benchmark": "recipe_study", **common.header(__file__, None), "tasks": TASKS,
                   "arms": {k: list(v) for k, v in ARMS.items()},
                   "rows": [{k: v for k, v in r.items() if k != "losses"} for r in rows]}
        Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser, out="runs/recipe-study", results="benchmarks/results/recipe-study.json")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--budgets", default="120,600", help="optimizer steps of batch 8 (full fine-tuning: the first)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training rows (a smoke run)")
    parser.add_argument("--eval-prompts", type=int, default=50, help="dev inputs scored, drawn with seed 0")
    args = parser.parse_args(argv)
    check(args)
    config_of = lambda run: base_config(args, run["task"])  # noqa: E731 - each task has its own data and metric
    return study.run_study(args, "benchmarks.recipe_study", lambda: runs(args), config_of, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
