"""The picture of a training run (``curves.png``): what it learned, how fast, and what each evaluation said.

Three panels, against the optimizer step: the training loss (each step's value faint, an
exponential moving average over it), the learning rate, and every evaluation's loss and
metrics (the loss on its own axis; metrics, all on a 0-100 scale, on the other). A run
evaluated once has no curve to draw there, so its scores are written on the panel as numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

SMOOTHING = 0.9
"""Weight of the past in the moving average of the training loss (TensorBoard's default slider)."""


def series(rows: list[dict]) -> dict:
    """The data the figure draws, from ``metrics.jsonl`` rows: ``step``, ``loss``, ``smoothed``, ``lr``,
    and ``evaluations``: ``{"step": [...], name: [...]}`` for every evaluated quantity."""
    train = [r for r in rows if "loss" in r]
    evaluations = [r for r in rows if "eval" in r]
    names = list(dict.fromkeys(k for r in evaluations for k in r["eval"] if k != "perplexity"))
    return {
        "step": [r["step"] for r in train],
        "loss": [r["loss"] for r in train],
        "smoothed": smoothed([r["loss"] for r in train]),
        "lr": [r.get("lr") for r in train],
        "evaluations": {"step": [r["step"] for r in evaluations],
                        **{n: [r["eval"].get(n) for r in evaluations] for n in names}},
    }


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """An exponential moving average, debiased so that the first values are not pulled towards 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot(metrics_file: Path, target: Path) -> dict:
    """Draw ``metrics_file`` (a run's ``metrics.jsonl``) as ``target`` (a PNG). Returns what was drawn:
    per panel title, each line's ``(x, y)`` by its label, and the panel's text, if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    data = series(rows)
    fig, (loss_axis, lr_axis, eval_axis) = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_axis.plot(data["step"], data["loss"], color="tab:blue", alpha=0.25, lw=1, label="each step")
    loss_axis.plot(data["step"], data["smoothed"], color="tab:blue", lw=2, label="moving average")
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    loss_axis.legend(fontsize="small")
    lr_axis.plot(data["step"], data["lr"], color="tab:green", label="learning rate")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _evaluations(eval_axis, data["evaluations"])
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    drawn = _drawn(fig)
    plt.close(fig)
    return drawn


def _drawn(fig) -> dict:
    """``{panel title: {"lines": {label: (x, y)}, "text": [...]}}`` of a figure (twin axes join their panel)."""
    drawn: dict = {}
    for axis in fig.axes:
        panel = drawn.setdefault(axis.get_title() or "evaluation", {"lines": {}, "text": []})
        panel["lines"].update({line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                               for line in axis.get_lines()})
        panel["text"] += [text.get_text() for text in axis.texts]
    return drawn


def _evaluations(axis, evaluations: dict) -> None:
    """The evaluation panel: curves when there are several evaluations, the scores as text when one."""
    steps = evaluations["step"]
    names = [n for n in evaluations if n != "step"]
    axis.set(xlabel="step", title="evaluation")
    if len(steps) < 2:
        text = "\n".join(f"{n}: {evaluations[n][0]:.4g}" for n in names) if steps else "no evaluation"
        where = f"at step {steps[0]}\n" if steps else ""
        axis.text(0.5, 0.5, where + text, ha="center", va="center", fontsize=12, transform=axis.transAxes)
        axis.set_xticks([])
        axis.set_yticks([])
        return
    metric_axis = axis.twinx()
    for name in names:
        target = axis if name == "loss" else metric_axis
        target.plot(steps, evaluations[name], marker="o", label=name,
                    color="tab:gray" if name == "loss" else None, linestyle="--" if name == "loss" else "-")
    axis.set_ylabel("eval loss")
    metric_axis.set_ylabel("score (0-100)")
    lines = axis.get_lines() + metric_axis.get_lines()
    axis.legend(lines, [line.get_label() for line in lines], fontsize="small", loc="center right")
