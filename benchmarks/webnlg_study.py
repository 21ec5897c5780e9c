"""The WebNLG extrapolation study: do the defaults chosen on E2E hold on categories no training row has?

Li & Liang 2021 (table 2, GPT-2 medium) found prefix tuning far ahead of fine-tuning on WebNLG's
"unseen" categories (BLEU 45.6 against 27.7) while slightly behind on the seen ones (62.9
against 64.2). Here the 10 categories of the WebNLG 2017 train/dev files are split by
:data:`UNSEEN`: every method trains on the other 7 (``--train-where``) and is scored on the dev
inputs of the 7 ("seen") and of the 3 ("unseen") with one training (``--eval-sets``), at an
equal budget (the same steps of the same batch, each method at its compare default rate),
over several seeds: BLEU, METEOR and TER, mean ± sd, and each method minus the prefix seed by seed.

Every run is one ``prefixtune.compare.runner.run_method`` call; rows are resumable and can be
shared among processes and machines (:mod:`benchmarks.study`). Run from the repository root::

    python -m benchmarks.webnlg_study                        # every run, then the report
    python -m benchmarks.webnlg_study --workers 4 --threads 1 --device cuda
    python -m benchmarks.webnlg_study --shard 0/3            # machine 0 of 3 (same --out, or rows copied together)
    python -m benchmarks.webnlg_study --phase report         # the report of the rows that exist
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common, study
from prefixtune.compare.config import CompareConfig
from prefixtune.compare.methods import METHODS
from prefixtune.compare.stats import format_mean_sd, paired
from prefixtune.metrics import lower_is_better

UNSEEN = ("City", "Food", "Monument")
"""The categories held out of training: three of the ten, with 72, 461 and 98 of the 2,268 dev rows.
Training keeps Airport, Astronaut, Building, ComicsCharacter, SportsTeam, University and WrittenWork."""
METHODS_RUN = ("prefix", "prefix-flat", "lora", "adapter", "full")
"""The default prefix (MLP) and the flat one, LoRA r=8, bottleneck adapters and full fine-tuning,
each at its ``prefixtune compare`` default rate (``--list-methods``)."""
REFERENCE = "prefix"
"""The method the others are compared with, seed by seed (``--reference``): the default prefix."""
PAPER = {  # Li & Liang 2021, table 2, WebNLG, GPT-2 medium: BLEU on the seen (S) and unseen (U) categories
    "prefix": {"seen": 62.9, "unseen": 45.6},
    "full": {"seen": 64.2, "unseen": 27.7},
}
TEMPLATE = "Triples: {prompt}\nText:"


def sets() -> str:
    """``--eval-sets`` of the study: the dev inputs of the kept categories, and of the held-out ones."""
    held_out = ",".join(UNSEEN)
    return f"seen:category!={held_out};unseen:category={held_out}"


def base_config(args) -> CompareConfig:
    return CompareConfig(
        data=str(study.data_root(args.data_dir) / "webnlg" / "train.jsonl"),
        eval_data=str(study.data_root(args.data_dir) / "webnlg" / "dev.jsonl"),
        train_where=f"category!={','.join(UNSEEN)}", eval_sets=sets(), train_limit=args.train_limit,
        prompt_template=TEMPLATE, max_length=256, max_steps=args.steps, batch_size=8, warmup_steps=min(10, args.steps // 4),
        schedule="linear", max_grad_norm=0.0, eval_sample=args.eval_prompts, eval_batch_size=args.eval_batch_size,
        metrics=args.metrics, max_new_tokens=args.max_new_tokens, num_beams=1, model=args.model, device=args.device,
        threads=args.threads, isolate=False, quiet=True, output_dir=args.out)


def runs(args) -> list[dict]:
    """Seed after seed, every method of a seed together (a study stopped part-way leaves whole seeds)."""
    return [{"id": f"{method}-s{seed}", "method": method, "lr": METHODS[method].lr, "changes": {"seed": seed}}
            for seed in (int(s) for s in args.seeds.split(",")) for method in args.methods.split(",")]


# ---------------------------------------------------------------------------------- report
def report(args) -> str:
    rows = [r for r in study.load_rows(Path(args.out)).values() if r.get("status") == "ok" and "sets" in r]
    metrics = args.metrics.split(",")
    lines = [f"### WebNLG, trained on 7 categories, scored on them (seen) and on {', '.join(UNSEEN)} (unseen)", "",
             "Mean ± sd over seeds; TER is lower-is-better. Paper: Li & Liang 2021 table 2, GPT-2 medium, BLEU.", "",
             "| method | seeds | train loss | " + " | ".join(f"{s} {m.upper()}" for s in ("seen", "unseen")
                                                           for m in metrics) + " | paper BLEU seen / unseen |",
             "|---|---|---|" + "---|" * (2 * len(metrics)) + "---|"]
    for method in args.methods.split(","):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            lines.append(f"| {method} | not run yet |")
            continue
        cells = [format_mean_sd([r["sets"][s]["metrics"][m] for r in mine]) for s in ("seen", "unseen") for m in metrics]
        paper = PAPER.get(method)
        beside = f"{paper['seen']} / {paper['unseen']}" if paper else "-"
        lines.append(f"| {method} | {len(mine)} | {format_mean_sd([r['final_loss'] for r in mine], 3)} | "
                     + " | ".join(cells) + f" | {beside} |")
    lines += ["", *differences(rows, args.methods.split(","), metrics, args.reference), "", *spikes(rows)]
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "study.md").write_text(text)
    if args.results:
        results = {"benchmark": "webnlg_study", **common.header(__file__, None), "unseen": list(UNSEEN),
                   "paper": PAPER, "rows": [{k: v for k, v in r.items() if k != "losses"} for r in rows]}
        Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    return text


def differences(rows: list[dict], methods: list[str], metrics: list[str], reference: str) -> list[str]:
    """Each method minus the reference, seed by seed, on the unseen categories (and the seen)."""
    def by_seed(method, part, metric):
        return {r["seed"]: r["sets"][part]["metrics"][metric] for r in rows if r["method"] == method}

    lines = [f"Each method minus `{reference}`, paired by seed (mean ± sd; in how many seeds the difference is "
             "better for the method):", ""]
    for method in (m for m in methods if m != reference):
        for part in ("unseen", "seen"):
            for metric in metrics:
                d = paired(by_seed(method, part, metric), by_seed(reference, part, metric))
                if d["n"]:
                    better = d["n"] - d["above"] if lower_is_better(metric) else d["above"]
                    lines.append(f"- {method}, {part} {metric.upper()}: {format_mean_sd(d['diffs'], 2, sign=True)} "
                                 f"(better in {better} of {d['n']})")
    return lines


def spikes(rows: list[dict]) -> list[str]:
    flagged = [f"{r['id']} ({r['spike_ratio']:.2f})" for r in rows if r.get("spike")]
    return [f"Runs with a loss spike (loss over twice the running median after warmup): "
            f"{', '.join(flagged) if flagged else 'none'}."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser, out="runs/webnlg-study", results="benchmarks/results/webnlg-study.json")
    parser.add_argument("--methods", default=",".join(METHODS_RUN))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--reference", default=REFERENCE, help="the method the others are compared with, seed by seed")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of batch 8, every method")
    parser.add_argument("--train-limit", type=int, default=None, help="first N kept training rows (a smoke run)")
    parser.add_argument("--eval-prompts", type=int, default=50, help="dev inputs per set, drawn with seed 0")
    parser.add_argument("--metrics", default="bleu,meteor,ter")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    config_of = lambda run: base_config(args)  # noqa: E731 - every run starts from the same config
    return study.run_study(args, "benchmarks.webnlg_study", lambda: runs(args), config_of, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
