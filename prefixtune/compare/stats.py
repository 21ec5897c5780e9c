"""Numbers over seeds: each method's mean and standard deviation, and paired differences.

One run scored on a few dozen prompts is a noisy measurement (docs/studies/e2e.md: one seed moves
E2E BLEU by several points), so ``prefixtune compare --seeds 0,1,2`` runs every method once per
seed. Runs of the same seed share the data order, so a method's difference from the reference
method is taken seed by seed (a paired difference) before it is averaged: what the order of the
data does to both cancels out. The standard deviation is the sample one (``n - 1``), ``None``
for a single value.
"""

from __future__ import annotations

import statistics

COST = ("seconds_per_step", "tokens_per_s", "peak_memory_mib", "memory_increase_mib", "checkpoint_bytes")
"""Per-run numbers that are summarized by their mean alone (they measure the machine, not the method)."""


def mean_sd(values: list[float]) -> dict:
    """``{"mean", "sd", "n"}`` of ``values`` (``sd`` is ``None`` for fewer than two)."""
    values = list(values)
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def format_mean_sd(values: list[float], digits: int = 1, sign: bool = False) -> str:
    """``"64.4 ± 3.2"``; one value alone; ``"-"`` for none. ``sign``: ``+`` on positive means (differences)."""
    return shown(mean_sd(values), digits, sign)


def shown(summary: dict, digits: int = 1, sign: bool = False) -> str:
    """A :func:`mean_sd` result as text (see :func:`format_mean_sd`)."""
    if not summary or summary["mean"] is None:
        return "-"
    mean = f"{summary['mean']:{'+' if sign else ''}.{digits}f}"
    return mean if summary["sd"] is None else f"{mean} ± {summary['sd']:.{digits}f}"


def paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    """:func:`mean_sd` of ``values[seed] - reference[seed]`` over the seeds both have, with
    ``above``: in how many of them the difference is positive."""
    diffs = [values[seed] - reference[seed] for seed in sorted(values) if seed in reference]
    return {**mean_sd(diffs), "above": sum(d > 0 for d in diffs), "diffs": diffs}


def per_seed(rows: list[dict], key: str) -> dict[int, float]:
    """``{seed: value}`` of a metric (or ``final_loss``) over one method's ok rows that have it."""
    out = {}
    for row in rows:
        value = row.get("metrics", {}).get(key, row.get(key))
        if row.get("status") == "ok" and value is not None:
            out[row.get("seed", 0)] = value
    return out


def summarize(rows: list[dict], reference: str | None = None) -> dict[str, dict]:
    """Per method (in order of first appearance), over its ok rows: ``seeds``, mean ± sd of every
    metric and of ``final_loss`` (``scores``), the mean of each :data:`COST`, the largest spike ratio
    and the runs with a spike, and ``vs_reference``: the paired differences from ``reference``
    (default: the first method) for every score both have."""
    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    reference = reference or next(iter(methods), None)
    keys = _score_keys(rows)
    out = {}
    for method, group in methods.items():
        ok = [r for r in group if r.get("status") == "ok"]
        ratios = [r["spike_ratio"] for r in ok if r.get("spike_ratio") is not None]
        out[method] = {
            "label": group[0]["label"], "runs": len(group), "seeds": [r.get("seed", 0) for r in ok],
            "trainable_params": ok[0].get("trainable_params") if ok else None,
            "scores": {k: mean_sd(list(per_seed(ok, k).values())) for k in keys if per_seed(ok, k)},
            "cost": {k: statistics.mean(r[k] for r in ok if k in r) for k in COST if any(k in r for r in ok)},
            "spike_ratio": max(ratios, default=None), "spikes": sum(bool(r.get("spike")) for r in ok),
        }
    for method, summary in out.items():
        base = [r for r in methods.get(reference, []) if r.get("status") == "ok"]
        mine = [r for r in methods[method] if r.get("status") == "ok"]
        summary["vs_reference"] = {k: paired(per_seed(mine, k), per_seed(base, k)) for k in keys
                                   if method != reference and per_seed(mine, k) and per_seed(base, k)}
    return {"reference": reference, "methods": out}


def _score_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [m for m in row.get("metrics", {}) if m not in keys]
    return keys + ["final_loss"]
