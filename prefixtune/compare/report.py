"""The comparison table as text, Markdown, JSON and a plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from ..metrics import lower_is_better
from ..spikes import THRESHOLD
from .stats import shown, summarize

METRIC_NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
                "ter": "TER", "accuracy": "accuracy", "exact_match": "exact match", "final_loss": "train loss"}


def machine(device: torch.device) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for package in ("peft", "bitsandbytes"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: either way, not used
            info[package] = None
    return info


def metric_names(results: dict) -> list[str]:
    names: list[str] = []
    for row in results["rows"]:
        names += [m for m in row.get("metrics", {}) if m not in names]
    return names


def seeds_of(results: dict) -> list[int]:
    """The seeds the runs used, in order (one for a run without ``--seeds``)."""
    seeds = results["config"].get("seeds") or [results["config"]["seed"]]
    return list(seeds)


def markdown(results: dict) -> str:
    """The table (one row per run), with several seeds the table over seeds, then the notes and the setup."""
    cfg, rows = results["config"], results["rows"]
    metrics = metric_names(results)
    several = len(seeds_of(results)) > 1
    head = ["method", *(["seed"] if several else []), "trainable params", "% of base", "peak memory", "memory rise",
            "s/step", "tokens/s", "checkpoint", "lr", "train loss", "spike ratio", *[METRIC_NAMES.get(m, m) for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {} if several else _best_runs(rows, metrics)
    notes = []
    for row in rows:
        seed = [str(row.get("seed", "-"))] if several else []
        if row["status"] != "ok":
            cells = [row["label"], *seed] + ["-"] * (len(head) - 1 - len(seed))
            cells[1 + len(seed)] = f"{row['status']}: {row.get('reason', '')}"
            lines.append("| " + " | ".join(cells) + " |")
            continue
        trained = row["trainable_params"] > 0
        cells = [
            row["label"], *seed,
            f"{row['trainable_params']:,}",
            _pct(row["trainable_pct"]),
            f"{row['peak_memory_mib']:,.0f} MiB" if trained else "-",
            f"{row['memory_increase_mib']:+,.0f} MiB" if trained else "-",
            f"{row['seconds_per_step']:.2f}" if trained else "-",
            f"{row['tokens_per_s']:,.0f}" if trained else "-",
            human_bytes(row["checkpoint_bytes"]) if trained else "-",
            f"{row['lr']:g}" if trained else "-",
            f"{row['final_loss']:.3f}" if trained else "-",
            spike_cell(row.get("spike_ratio")) if trained else "-",
            *[_bold(f"{row['metrics'][m]:.2f}", best.get(m) is row) if m in row.get("metrics", {}) else "-"
              for m in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row['label']}: {note}" for note in row.get("notes", []) if not several or row.get("seed") ==
                  seeds_of(results)[0]]
    if several:
        lines += ["", *summary_markdown(results)]
    m = results["machine"]
    threads = cfg.get("threads")
    decoding = "greedy" if cfg["num_beams"] == 1 else f"beam-{cfg['num_beams']}"
    seeds = seeds_of(results)
    setup = (f"{cfg['max_steps']} steps of batch {cfg['batch_size']} per method, "
             f"{'seeds ' + ', '.join(map(str, seeds)) if several else f'seed {seeds[0]}'}, "
             f"{_schedule(cfg)}; scored on {rows and _eval_prompts(rows)} evaluation prompts "
             f"({decoding} decoding, "
             f"at most {cfg['max_new_tokens']} new tokens). Model: {cfg['model'] or 'bundled SmolLM2-135M-Instruct'}; "
             f"data: {cfg['data'] or 'built-in demo task'}{_filters(cfg)}. Machine: {m['device']}"
             f"{f', {threads} torch thread(s) per method' if threads else ''}; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m.get('peft')}.")
    kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "")
    memory = f"Peak memory: {kind}; memory rise: above the level just before the first training step."
    spikes = (f"Spike ratio: the largest training loss over the median of the 20 losses before it, after warmup; "
              f"above {THRESHOLD:g} is a spike (prefixtune.spikes).")
    lower = [METRIC_NAMES.get(m, m) for m in metrics if lower_is_better(m)]
    better = [f"Lower is better for {', '.join(lower)}; higher for the other metrics."] if lower else []
    return "\n".join([*lines, "", setup, memory, spikes, *better, *([""] + notes if notes else [])]) + "\n"


def summary_markdown(results: dict) -> list[str]:
    """The table over seeds: per method, mean ± sd of the training loss and every metric, the paired
    differences from the reference (method - reference, seed by seed) and the largest spike ratio."""
    summary, metrics = results["summary"], metric_names(results)
    reference = summary["reference"]
    keys = ["final_loss", *metrics]
    best = _best_methods(summary, keys)
    head = ["method", "seeds", *[METRIC_NAMES.get(k, k) for k in keys],
            *[f"{METRIC_NAMES.get(k, k)} - {reference}" for k in keys], "largest spike ratio (runs with a spike)"]
    lines = [f"Over seeds (mean ± sd; differences paired by seed, method - `{reference}`):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summary["methods"].items():
        digits = {"final_loss": 3}
        cells = [s["label"], str(len(s["seeds"]))]
        cells += [_bold(shown(s["scores"].get(k), digits.get(k, 2)), best.get(k) == method) for k in keys]
        cells += [shown(s["vs_reference"].get(k), digits.get(k, 2), sign=True) if method != reference else "-"
                  for k in keys]
        ratio = s["spike_ratio"]
        cells.append("-" if ratio is None else f"{ratio:.2f} ({s['spikes']} of {len(s['seeds'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def text_table(results: dict) -> str:
    """A fixed-width version of the table for the terminal: the runs, or with several seeds the
    table over seeds."""
    if len(seeds_of(results)) > 1:
        return summary_text(results)
    metrics = metric_names(results)
    head = f"{'method':46}{'trainable':>13}{'%':>10}{'peak MiB':>10}{'s/step':>8}{'tok/s':>8}{'ckpt':>10}{'loss':>7}"
    head += f"{'spike':>12}" + "".join(f"{METRIC_NAMES.get(m, m):>9}" for m in metrics)
    lines = [head]
    best = _best_runs(results["rows"], metrics)
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']:46}{row['status']}: {row.get('reason', '')}")
            continue
        trained = row["trainable_params"] > 0
        line = f"{row['label']:46}{row['trainable_params']:>13,}{_pct(row['trainable_pct']):>10}"
        line += (f"{row['peak_memory_mib']:>10,.0f}{row['seconds_per_step']:>8.2f}{row['tokens_per_s']:>8,.0f}"
                 f"{human_bytes(row['checkpoint_bytes']):>10}{row['final_loss']:>7.3f}"
                 f"{spike_cell(row.get('spike_ratio')):>12}") if trained else " " * 65
        line += "".join(f"{row['metrics'].get(m, float('nan')):>8.2f}{'*' if best.get(m) is row else ' '}"
                        for m in metrics)
        lines.append(line)
    return "\n".join(lines + _best_note(metrics))


def summary_text(results: dict) -> str:
    """The table over seeds, fixed-width: mean ± sd, then the paired differences from the reference."""
    summary, metrics = results["summary"], metric_names(results)
    reference, keys = summary["reference"], ["final_loss", *metrics]
    best = _best_methods(summary, keys)
    names = [METRIC_NAMES.get(k, k) for k in keys]
    head = f"{'method':46}{'seeds':>6}" + "".join(f"{n:>17}" for n in names)
    head += "".join(f"{'d ' + n:>17}" for n in names) + f"{'spike':>8}"
    lines = [f"mean ± sd over seeds; d = method - {reference}, paired by seed", head]
    for method, s in summary["methods"].items():
        digits = lambda k: 3 if k == "final_loss" else 2  # noqa: E731
        line = f"{s['label']:46}{len(s['seeds']):>6}"
        line += "".join(f"{shown(s['scores'].get(k), digits(k)):>16}{'*' if best.get(k) == method else ' '}"
                        for k in keys)
        line += "".join(f"{shown(s['vs_reference'].get(k), digits(k), sign=True) if method != reference else '-':>17}"
                        for k in keys)
        line += f"{spike_cell(s['spike_ratio']):>8}"
        lines.append(line)
    return "\n".join(lines + _best_note(metrics))


def spike_cell(ratio: float | None) -> str:
    """The largest loss / running-median ratio of a run, marked where it is a spike."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + (" spike" if ratio > THRESHOLD else "")


def _best_runs(rows: list[dict], metrics: list[str]) -> dict:
    """The run with the best value of each metric (the lowest for TER)."""
    out = {}
    for m in metrics:
        scored = [r for r in rows if r["status"] == "ok" and m in r.get("metrics", {})]
        if len({r["metrics"][m] for r in scored}) > 1:  # a column of equal values has no best
            pick = min if lower_is_better(m) else max
            out[m] = pick(scored, key=lambda r: r["metrics"][m])
    return out


def _best_methods(summary: dict, keys: list[str]) -> dict:
    """The method with the best mean of each score (the lowest for TER and the loss)."""
    out = {}
    for k in keys:
        means = {m: s["scores"][k]["mean"] for m, s in summary["methods"].items() if k in s["scores"]}
        if len(set(means.values())) > 1:
            out[k] = (min if lower_is_better(k if k != "final_loss" else "loss") else max)(means, key=means.get)
    return out


def _best_note(metrics: list[str]) -> list[str]:
    lower = [METRIC_NAMES.get(m, m) for m in metrics if lower_is_better(m)]
    return [f"* best of its column (lowest for {', '.join(['train loss', *lower])}, highest otherwise)"]


def _bold(text: str, best: bool) -> str:
    return f"**{text}**" if best and text != "-" else text


def _filters(cfg: dict) -> str:
    kept = [f"{name} `{cfg[name]}`" for name in ("train_where", "eval_where") if cfg.get(name)]
    return f" ({', '.join(kept)})" if kept else ""


def one_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"   {row['status']}: {row.get('reason', '')}"
    scores = ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.2f}" for k, v in row.get("metrics", {}).items())
    if not row["trainable_params"]:
        return f"   {scores}"
    return (f"   {row['trainable_params']:,} trainable, {row['seconds_per_step']:.2f} s/step, peak "
            f"{row['peak_memory_mib']:,.0f} MiB, loss {row['final_loss']:.3f} (spike ratio "
            f"{spike_cell(row.get('spike_ratio'))}); {scores}")


FILES = ("compare.json", "compare.md", "compare.png")
"""What :func:`write` writes."""


def write(results: dict, out: Path) -> None:
    """compare.json, compare.md and compare.png in ``out``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(markdown(results), encoding="utf-8")
    plot(results, out / "compare.png")
    print("\n" + text_table(results))
    print(f"\ncompare.md, compare.json and compare.png are in {out}")


def plot(results: dict, target: Path) -> None:
    """Task metric per method, metric against trainable parameters, and cost (s/step, memory): means
    over seeds, with the standard deviation as error bars where several seeds ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary") or summarize(results["rows"])
    methods = {m: s for m, s in summary["methods"].items() if s["seeds"]}
    metrics = metric_names(results)
    if not methods:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = list(methods)
    width = 0.8 / max(1, len(metrics))
    for i, m in enumerate(metrics):
        means = [s["scores"].get(m, {}).get("mean") or 0 for s in methods.values()]
        errors = [s["scores"].get(m, {}).get("sd") or 0 for s in methods.values()]
        axes[0].bar([x + i * width for x in range(len(labels))], means, width, yerr=errors, capsize=3,
                    label=METRIC_NAMES.get(m, m) + (" (lower is better)" if lower_is_better(m) else ""))
    axes[0].set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(labels))], labels, rotation=30,
                       ha="right")
    seeds = len(seeds_of(results))
    axes[0].set(title="task metric" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else ""), ylabel="score")
    axes[0].legend(fontsize="small")
    trained = {m: s for m, s in methods.items() if s["trainable_params"]}
    if metrics and trained:
        m = metrics[0]
        name = METRIC_NAMES.get(m, m)
        for method, s in trained.items():
            score = s["scores"].get(m, {})
            axes[1].errorbar(s["trainable_params"], score.get("mean") or 0, yerr=score.get("sd") or 0, fmt="o",
                             capsize=3)
            axes[1].annotate(method, (s["trainable_params"], score.get("mean") or 0), fontsize="small",
                             xytext=(3, 3), textcoords="offset points")
        axes[1].set(xscale="log", xlabel="trainable parameters", ylabel=name, title=f"{name} vs trainable parameters")
        names = list(trained)
        axes[2].bar(names, [s["cost"].get("seconds_per_step", 0) for s in trained.values()], color="tab:gray")
        axes[2].set(ylabel="seconds per step", title="cost (bars: s/step, dots: peak memory)")
        axes[2].tick_params(axis="x", rotation=30)
        twin = axes[2].twinx()
        twin.plot(names, [s["cost"].get("peak_memory_mib", 0) for s in trained.values()], "o", color="tab:red")
        twin.set_ylabel("peak memory (MiB)", color="tab:red")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _pct(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}%" if value < 100 else "100%"


def _schedule(cfg: dict) -> str:
    clip = f"clip {cfg['max_grad_norm']:g}" if cfg["max_grad_norm"] else "no clipping"
    return (f"AdamW (wd {cfg['weight_decay']:g}), {cfg['warmup_steps']} warmup steps then {cfg['schedule']} decay, "
            f"{clip}, {cfg['precision']}")


def _eval_prompts(rows: list[dict]) -> int:
    return max((r.get("eval_prompts", 0) for r in rows), default=0)
