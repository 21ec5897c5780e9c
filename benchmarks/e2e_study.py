"""The E2E study: prefix tuning against LoRA (and the other methods) on the bundled model, and
the paper's low-data experiment.

Every run is one ``prefixtune.compare.runner.run_method`` call (the same code as
``prefixtune compare``), so every method sees the same data, order, schedule and decoding.
Each run's row is written to OUT/runs/ID.json as soon as it finishes, and a run whose row
exists is not run again: the study resumes where it stopped, and several workers
(``--workers N``, one process each) share the list of runs.

Phases:

- ``lr``: each method at each learning rate of its grid, 120 steps of batch 8 from the
  shuffled E2E train set, greedy decoding, the first 50 dev MRs, plus the ablations that
  explain prefix tuning's gap (gradient clipping);
- ``lowdata``: 50/100/200/500 training examples drawn at random, several seeds; prefix tuning
  initialized from real words vs random vs LoRA vs full fine-tuning, each at the learning
  rate that was best for it in ``lr``;
- ``report``: tables (Markdown) and plots from whatever rows exist.

Run from the repository root::

    python -m benchmarks.e2e_study --phase all --device cuda --workers 4     # the whole study
    python -m benchmarks.e2e_study --phase lr --methods prefix,lora          # the bar only, on CPU
    python -m benchmarks.e2e_study --phase report --out runs/e2e-study

Its runs are resumable and can be shared among processes and machines (:mod:`benchmarks.study`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from benchmarks import study
from prefixtune.compare.config import CompareConfig
from prefixtune.compare.stats import format_mean_sd, paired

LR_GRID = {  # {1e-3, 3e-3, 1e-2} for prefix tuning and LoRA; conventional ranges for the others
    "prefix": (1e-3, 3e-3, 1e-2),
    "prefix-words": (1e-3, 3e-3, 1e-2),
    "prefix-flat": (1e-2, 3e-2, 1e-1),  # no MLP to amplify the steps: its rates sit higher (docs/studies/e2e.md)
    "prefix-flat-words": (1e-2, 3e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "peft-prefix": (1e-3, 3e-3, 1e-2),
    "prompt": (3e-3, 1e-2, 3e-2),
    "adapter": (3e-4, 1e-3, 3e-3),
    "full": (1e-5, 5e-5, 1e-4),
    "base": (0.0,),
}
ABLATIONS = [  # (method, lr, changes): why prefix tuning fell short with the engine's defaults
    ("prefix", 3e-3, {"max_grad_norm": 1.0}),
    ("prefix", 1e-2, {"max_grad_norm": 1.0}),
    ("lora", 1e-2, {"max_grad_norm": 1.0}),
]
LOWDATA_METHODS = ("prefix-flat-words", "prefix-flat", "lora", "full")  # the prefixes that were level with LoRA
PAPER = {  # Li & Liang 2021, table 1, E2E, GPT-2 medium (full training set)
    "prefix (paper, GPT-2 medium)": {"bleu": 69.7, "nist": 8.81, "meteor": 46.1, "rouge_l": 71.4, "cider": 2.49},
    "fine-tune (paper, GPT-2 medium)": {"bleu": 68.2, "nist": 8.62, "meteor": 46.2, "rouge_l": 71.0, "cider": 2.47},
}


def base_config(args) -> CompareConfig:
    return CompareConfig(
        data=str(study.data_root(args.data_dir) / "e2e" / "trainset.csv"),
        eval_data=str(study.data_root(args.data_dir) / "e2e" / "devset.csv"),
        prompt_field="mr", completion_field="ref", prompt_template="Table: {prompt}\nText:", max_length=160,
        max_steps=args.steps, batch_size=8, warmup_steps=10, schedule="linear", max_grad_norm=0.0,
        eval_prompts=args.eval_prompts, eval_batch_size=args.eval_batch_size, metrics="bleu,rouge_l", max_new_tokens=64, num_beams=1,
        model=args.model, device=args.device, threads=args.threads, isolate=False, quiet=True, output_dir=args.out,
    )


def grid(args) -> dict[str, list[float]]:
    """``--grid prefix=1e-2:3e-3,lora=1e-2`` (a method named twice gets both lists), else LR_GRID."""
    if not args.grid:
        return {m: list(LR_GRID[m]) for m in args.methods.split(",")}
    out = {}
    for part in args.grid.split(","):
        method, _, rates = part.partition("=")
        out.setdefault(method.strip(), []).extend(
            [float(r) for r in rates.split(":")] if rates else LR_GRID[method.strip()])
    return out


def lr_runs(args) -> list[dict]:
    """Interleaved (each method's first rate, then each one's second...), so a run cut short
    has the most important pairs."""
    rates = grid(args)
    extra = settings(args)
    named = "".join(f"-{k}{v}" for k, v in extra.items())
    runs = []
    for seed in (int(s) for s in args.lr_seeds.split(",")):
        for i in range(max(map(len, rates.values()))):
            for method, values in rates.items():
                if i < len(values):
                    lr = values[i]
                    changes = {**extra, **({"seed": seed} if seed else {})}
                    runs.append({"id": f"lr-{method}-{lr:g}{named}" + (f"-s{seed}" if seed else ""), "method": method,
                                 "lr": lr, "changes": changes})
    if args.ablations:
        for method, lr, changes in ABLATIONS:
            tag = "-".join(f"{k}{v:g}" for k, v in changes.items())
            runs.append({"id": f"ablation-{method}-{lr:g}-{tag}", "method": method, "lr": lr, "changes": changes})
    return runs


def settings(args) -> dict:
    """``--set prefix_length=20,max_grad_norm=1`` as CompareConfig changes; each value is read as
    YAML, as the same key in a ``--config`` file would be (so ``true``, ``20`` and ``1e-2`` are typed)."""
    import yaml

    names = {f.name for f in dataclasses.fields(CompareConfig)}
    out = {}
    for part in filter(None, (args.set or "").split(",")):
        key, _, value = part.partition("=")
        if key not in names:
            raise SystemExit(f"--set: {key!r} is not a compare option")
        out[key] = yaml.safe_load(value)
    return out


def lowdata_runs(args, rows: dict) -> list[dict]:
    """Seed by seed: a run stopped part-way leaves whole seeds (every size and method) behind,
    which the report and plot can use, rather than some sizes with all seeds."""
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            for method in LOWDATA_METHODS:
                lr = best_lr(rows, method)
                runs.append({"id": f"low-{method}-n{size}-s{seed}", "method": method, "lr": lr,
                             "changes": {"train_sample": size, "seed": seed}})
    return runs


def best_lr(rows: dict, method: str) -> float:
    """The rate of ``method``'s grid with the best mean of BLEU and ROUGE-L over seeds, among its
    runs with no other change (the method's default rate if none ran)."""
    from prefixtune.compare.methods import METHODS

    cells = {key: group for key, group in grid_cells(rows).items() if key[1] == method}
    if not cells:
        return METHODS[method].lr
    return max(cells, key=lambda k: statistics.mean(r["metrics"]["bleu"] + r["metrics"]["rouge_l"] for r in cells[k]))[2]


def grid_cells(rows: dict) -> dict[tuple, list[dict]]:
    """The cells of the grid itself: no ablation, no other change, every seed's run ok."""
    return {key: group for key, group in lr_cells(rows).items()
            if not key[0] and not key[3] and all(r.get("status") == "ok" for r in group)}


def lr_cells(rows: dict) -> dict[tuple, list[dict]]:
    """Learning-rate rows grouped by (ablation?, method, lr, other changes): one cell per setting, its seeds inside."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows.values():
        if r["id"].startswith(("lr-", "ablation-")):
            other = tuple(sorted((k, v) for k, v in r.get("changes", {}).items() if k != "seed"))
            cells.setdefault((r["id"].startswith("ablation"), r["method"], r["lr"], other), []).append(r)
    for group in cells.values():
        group.sort(key=lambda r: r.get("changes", {}).get("seed", 0))
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])))


def load_rows(out: Path) -> dict:
    return study.load_rows(out)


# ---------------------------------------------------------------------------------- report
def report(args) -> str:
    rows = load_rows(Path(args.out))
    lines = []
    cells = lr_cells(rows)
    if cells:
        lines += ["### Learning rates (120 steps of batch 8, first 50 dev MRs, no clipping unless noted; "
                  "mean ± sd over seeds where several ran)", "",
                  "| method | lr | changes | seeds | train loss | BLEU | ROUGE-L | s/step | trainable |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (_, method, lr, other), group in cells.items():
            changes = ", ".join(f"{k}={v}" for k, v in other) or "-"
            seeds = ",".join(str(r.get("changes", {}).get("seed", 0)) for r in group)
            failed = [r for r in group if r.get("status") != "ok"]
            if failed:
                lines.append(f"| {group[0]['label']} | {lr:g} | {changes} | {seeds} | "
                             f"{failed[0]['status']}: {failed[0].get('reason', '')} | | | | |")
                continue
            metric = lambda key: format_mean_sd([r["metrics"][key] for r in group])  # noqa: E731
            loss = format_mean_sd([r["final_loss"] for r in group if "final_loss" in r], digits=3)
            sps = f"{statistics.median(r['seconds_per_step'] for r in group):.2f}" if "seconds_per_step" in group[0] else "-"
            lines.append(f"| {group[0]['label']} | {lr:g} | {changes} | {seeds} | {loss} | {metric('bleu')} | "
                         f"{metric('rouge_l')} | {sps} | {group[0]['trainable_params']:,} |")
        lines.append("")
        for method in sorted({k[1] for k in cells if not k[0] and k[1] != "base"}):
            lines.append(f"- best rate for {method}: {best_lr(rows, method):g}")
        lines += ["", *per_seed(rows), *all_methods(rows)]
    low = [r for r in rows.values() if r["id"].startswith("low-") and r.get("status") == "ok"]
    if low:
        sizes = sorted({r["changes"]["train_sample"] for r in low})
        lines += ["### Low-data (mean ± sd over seeds; each method at its best rate from the grid)", "",
                  "| method | " + " | ".join(f"n={s} BLEU | n={s} ROUGE-L" for s in sizes) + " |",
                  "|---|" + "---|---|" * len(sizes)]
        losses = ["", f"Final training loss (mean over seeds; every size gets the same {args.steps} steps, so the "
                  "small sets are passed over many times):", "",
                  "| method | " + " | ".join(f"n={s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for method in LOWDATA_METHODS:
            mine = [r for r in low if r["method"] == method]
            cells, loss = [], []
            for s in sizes:
                picked = [r for r in mine if r["changes"]["train_sample"] == s]
                cells += [format_mean_sd([r["metrics"]["bleu"] for r in picked]),
                          format_mean_sd([r["metrics"]["rouge_l"] for r in picked])]
                loss.append(format_mean_sd([r["final_loss"] for r in picked], digits=3))
            seeds = sorted({r["changes"]["seed"] for r in mine})
            label = f"{method} (lr {mine[0]['lr']:g}, seeds {seeds})" if mine else f"{method} (not run yet)"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            losses.append(f"| {method} | " + " | ".join(loss) + " |")
        lines += [*losses, ""]
    lines += ["### The paper, for context (GPT-2 medium, full E2E training set, test set)", "",
              "| | BLEU | NIST | METEOR | ROUGE-L | CIDEr |", "|---|---|---|---|---|---|"]
    for name, m in PAPER.items():
        lines.append(f"| {name} | {m['bleu']} | {m['nist']} | {m['meteor']} | {m['rouge_l']} | {m['cider']} |")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "study.md").write_text(text)
    plot(rows, Path(args.images))
    return text


def all_methods(rows: dict) -> list[str]:
    """The comparison table: every method at its best rate of the grid, the same data,
    steps and seed; what ``prefixtune compare`` prints, with the E2E budget."""
    from prefixtune.compare.methods import METHODS

    cells = grid_cells(rows)
    lines = ["### All methods at the same budget (each at its best rate; mean over seeds where several ran)", "",
             "| method | lr | seeds | trainable | % of model | peak memory MiB (step increase) | s/step | tokens/s "
             "| checkpoint | BLEU | ROUGE-L |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, method in METHODS.items():
        group = cells.get((False, name, best_lr(rows, name) if name != "base" else 0.0, ()))
        if not group:
            continue
        def mean(key: str, fmt: str = ".0f") -> str:  # "-" where a row lacks it (the untuned base trains nothing)
            values = [r[key] for r in group if r.get(key) is not None]
            return format(statistics.mean(values), fmt) if len(values) == len(group) else "-"

        first = group[0]
        size = _size(first["checkpoint_bytes"]) if first.get("checkpoint_bytes") else "-"
        lines.append(
            f"| {method.label} | {first['lr']:g} | {len(group)} | {first['trainable_params']:,} | "
            f"{mean('trainable_pct', '.3f')} | {mean('peak_memory_mib')} ({mean('memory_increase_mib')}) | "
            f"{mean('seconds_per_step', '.2f')} | {mean('tokens_per_s')} | {size} | "
            f"{statistics.mean(r['metrics']['bleu'] for r in group):.1f} | "
            f"{statistics.mean(r['metrics']['rouge_l'] for r in group):.1f} |")
    return lines + [""]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def per_seed(rows: dict) -> list[str]:
    """Every grid cell run with several seeds, seed by seed, and each prefix cell minus LoRA's best
    cell on the seeds they share (paired: the same seed gives both the same data order)."""
    cells = {k: g for k, g in grid_cells(rows).items() if len(g) > 1}
    if not cells:
        return []
    lines = ["### Seed by seed (BLEU / ROUGE-L)", ""]
    for (_, method, lr, _), group in cells.items():
        scores = ", ".join(f"seed {r.get('changes', {}).get('seed', 0)}: {r['metrics']['bleu']:.2f} / "
                           f"{r['metrics']['rouge_l']:.2f}" for r in group)
        means = " / ".join(format_mean_sd([r["metrics"][key] for r in group], digits=2) for key in ("bleu", "rouge_l"))
        lines.append(f"- {method} at {lr:g}: {scores}; mean ± sd {means}")
    lora = cells.get((False, "lora", best_lr(rows, "lora"), ()))
    for (_, method, lr, _), group in cells.items():
        if lora is None or not method.startswith("prefix"):
            continue
        for key in ("bleu", "rouge_l"):
            diff = paired(_by_seed(group, key), _by_seed(lora, key))
            if diff["n"] > 1:
                lines.append(f"- {method} at {lr:g} minus LoRA, {key}: per seed "
                             + ", ".join(f"{d:+.2f}" for d in diff["diffs"]) + f"; mean {diff['mean']:+.2f}, "
                             f"sd {diff['sd']:.2f}, prefix ahead in {diff['above']} of {diff['n']}")
    return lines + [""]


def _by_seed(group: list[dict], key: str) -> dict[int, float]:
    """``{seed: metric}`` of a cell's rows (the seed is in the row's changes; 0 where none is)."""
    return {r.get("changes", {}).get("seed", 0): r["metrics"][key] for r in group}


def plot(rows: dict, images: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    cells = {k: g for k, g in grid_cells(rows).items() if k[2]}  # lr 0 (base) has no place on a log axis
    if cells:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, axis in zip(("bleu", "rouge_l"), axes):
            for method in sorted({k[1] for k in cells}):
                picked = sorted((k[2], g) for k, g in cells.items() if k[1] == method)
                axis.plot([lr for lr, _ in picked], [statistics.mean(r["metrics"][key] for r in g) for _, g in picked],
                          marker="o", label=method)
            axis.set(xscale="log", xlabel="peak learning rate", ylabel=key.upper().replace("_", "-"),
                     title=f"E2E dev (first 50 MRs): {key.upper().replace('_', '-')} after 120 steps")
        axes[0].legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(images / "compare-e2e-lr.png", dpi=100)
        plt.close(fig)
    low = [r for r in rows.values() if r["id"].startswith("low-") and r.get("status") == "ok"]
    if low:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, axis in zip(("bleu", "rouge_l"), axes):
            for method in LOWDATA_METHODS:
                sizes = sorted({r["changes"]["train_sample"] for r in low if r["method"] == method})
                means, sds = [], []
                for s in sizes:
                    values = [r["metrics"][key] for r in low if r["method"] == method and r["changes"]["train_sample"] == s]
                    means.append(statistics.mean(values))
                    sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
                if sizes:
                    axis.errorbar(sizes, means, yerr=sds, marker="o", capsize=3, label=method)
            axis.set(xscale="log", xlabel="training examples", ylabel=key.upper().replace("_", "-"),
                     title=f"low-data E2E: {key.upper().replace('_', '-')} (mean ± sd over seeds)")
            axis.set_xticks([50, 100, 200, 500], ["50", "100", "200", "500"])
            axis.minorticks_off()  # the log axis' minor labels ("6 x 10^1") would crowd the four sizes
        axes[0].legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(images / "compare-e2e-lowdata.png", dpi=100)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("lr", "lowdata", "all", "report"), default="all")
    study.add_arguments(parser, out="runs/e2e-study")
    parser.add_argument("--images", default="docs/images")
    parser.add_argument("--methods", default="prefix,prefix-words,prefix-flat,prefix-flat-words,lora,peft-prefix,"
                        "prompt,adapter,full,base",
                        help="methods of the learning-rate phase")
    parser.add_argument("--grid", default=None, help="learning rates to try, in order: 'prefix=1e-2:3e-3,lora=1e-2' "
                        "(default: LR_GRID for --methods)")
    parser.add_argument("--lr-seeds", default="0", help="seeds of the learning-rate phase (rows of seed > 0 are "
                        "named ...-sSEED; the report gives mean ± sd over seeds)")
    parser.add_argument("--set", default=None, help="compare options changed for the learning-rate phase, e.g. "
                        "'prefix_length=20' (they name the rows)")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--sizes", default="50,100,200,500")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-prompts", type=int, default=50)
    args = parser.parse_args()
    config_of = lambda run: base_config(args)  # noqa: E731 - every run of the study starts from the same config
    if args.worker:
        study.worker(args, config_of)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.phase in ("lr", "all"):
        study.run_phase(lr_runs(args), args, "benchmarks.e2e_study", config_of)
    if args.phase in ("lowdata", "all"):
        study.run_phase(lowdata_runs(args, load_rows(Path(args.out))), args, "benchmarks.e2e_study", config_of)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
