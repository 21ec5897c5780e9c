"""The comparison table as text, Markdown, JSON and a plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

METRIC_NAMES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
                "accuracy": "accuracy", "exact_match": "exact match"}


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


def markdown(results: dict) -> str:
    """The table (one row per method) followed by the notes and the setup."""
    cfg, rows = results["config"], results["rows"]
    metrics = metric_names(results)
    head = ["method", "trainable params", "% of base", "peak memory", "memory rise", "s/step", "tokens/s",
            "checkpoint", "lr", "train loss", *[METRIC_NAMES.get(m, m) for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in rows:
        if row["status"] != "ok":
            cells = [row["label"]] + ["-"] * (len(head) - 1)
            cells[1] = f"{row['status']}: {row.get('reason', '')}"
            lines.append("| " + " | ".join(cells) + " |")
            continue
        trained = row["trainable_params"] > 0
        cells = [
            row["label"],
            f"{row['trainable_params']:,}",
            _pct(row["trainable_pct"]),
            f"{row['peak_memory_mib']:,.0f} MiB" if trained else "-",
            f"{row['memory_increase_mib']:+,.0f} MiB" if trained else "-",
            f"{row['seconds_per_step']:.2f}" if trained else "-",
            f"{row['tokens_per_s']:,.0f}" if trained else "-",
            human_bytes(row["checkpoint_bytes"]) if trained else "-",
            f"{row['lr']:g}" if trained else "-",
            f"{row['final_loss']:.3f}" if trained else "-",
            *[f"{row['metrics'][m]:.2f}" if m in row.get("metrics", {}) else "-" for m in metrics],
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row['label']}: {note}" for note in row.get("notes", [])]
    m = results["machine"]
    threads = cfg.get("threads")
    decoding = "greedy" if cfg["num_beams"] == 1 else f"beam-{cfg['num_beams']}"
    setup = (f"{cfg['max_steps']} steps of batch {cfg['batch_size']} per method, seed {cfg['seed']}, "
             f"{_schedule(cfg)}; scored on {rows and _eval_prompts(rows)} evaluation prompts "
             f"({decoding} decoding, "
             f"at most {cfg['max_new_tokens']} new tokens). Model: {cfg['model'] or 'bundled SmolLM2-135M-Instruct'}; "
             f"data: {cfg['data'] or 'built-in demo task'}. Machine: {m['device']}"
             f"{f', {threads} torch thread(s) per method' if threads else ''}; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m.get('peft')}.")
    kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "")
    memory = f"Peak memory: {kind}; memory rise: above the level just before the first training step."
    return "\n".join([*lines, "", setup, memory, *([""] + notes if notes else [])]) + "\n"


def text_table(results: dict) -> str:
    """A fixed-width version of the table for the terminal."""
    metrics = metric_names(results)
    head = f"{'method':46}{'trainable':>13}{'%':>10}{'peak MiB':>10}{'s/step':>8}{'tok/s':>8}{'ckpt':>10}{'loss':>7}"
    head += "".join(f"{METRIC_NAMES.get(m, m):>9}" for m in metrics)
    lines = [head]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']:46}{row['status']}: {row.get('reason', '')}")
            continue
        trained = row["trainable_params"] > 0
        line = f"{row['label']:46}{row['trainable_params']:>13,}{_pct(row['trainable_pct']):>10}"
        line += (f"{row['peak_memory_mib']:>10,.0f}{row['seconds_per_step']:>8.2f}{row['tokens_per_s']:>8,.0f}"
                 f"{human_bytes(row['checkpoint_bytes']):>10}{row['final_loss']:>7.3f}") if trained else " " * 53
        line += "".join(f"{row['metrics'].get(m, float('nan')):>9.2f}" for m in metrics)
        lines.append(line)
    return "\n".join(lines)


def one_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"   {row['status']}: {row.get('reason', '')}"
    scores = ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.2f}" for k, v in row.get("metrics", {}).items())
    if not row["trainable_params"]:
        return f"   {scores}"
    return (f"   {row['trainable_params']:,} trainable, {row['seconds_per_step']:.2f} s/step, peak "
            f"{row['peak_memory_mib']:,.0f} MiB, loss {row['final_loss']:.3f}; {scores}")


def write(results: dict, out: Path) -> None:
    """compare.json, compare.md and compare.png in ``out``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "compare.md").write_text(markdown(results), encoding="utf-8")
    plot(results, out / "compare.png")
    print("\n" + text_table(results))
    print(f"\ncompare.md, compare.json and compare.png are in {out}")


def plot(results: dict, target: Path) -> None:
    """Task metric per method, metric against trainable parameters, and cost (s/step, memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok"]
    metrics = metric_names(results)
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [r["method"] for r in rows]
    width = 0.8 / max(1, len(metrics))
    for i, m in enumerate(metrics):
        axes[0].bar([x + i * width for x in range(len(rows))], [r["metrics"].get(m, 0) for r in rows], width,
                    label=METRIC_NAMES.get(m, m))
    axes[0].set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(rows))], labels, rotation=30,
                       ha="right")
    axes[0].set(title="task metric", ylabel="score")
    axes[0].legend(fontsize="small")
    trained = [r for r in rows if r["trainable_params"]]
    if metrics and trained:
        m = metrics[0]
        for r in trained:
            axes[1].scatter(r["trainable_params"], r["metrics"].get(m, 0))
            axes[1].annotate(r["method"], (r["trainable_params"], r["metrics"].get(m, 0)), fontsize="small",
                             xytext=(3, 3), textcoords="offset points")
        axes[1].set(xscale="log", xlabel="trainable parameters", ylabel=METRIC_NAMES.get(m, m),
                    title=f"{METRIC_NAMES.get(m, m)} vs trainable parameters")
        names = [r["method"] for r in trained]
        axes[2].bar(names, [r["seconds_per_step"] for r in trained], color="tab:gray")
        axes[2].set(ylabel="seconds per step", title="cost (bars: s/step, dots: peak memory)")
        axes[2].tick_params(axis="x", rotation=30)
        twin = axes[2].twinx()
        twin.plot(names, [r["peak_memory_mib"] for r in trained], "o", color="tab:red")
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
