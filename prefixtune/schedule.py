"""The optimizer and its learning-rate schedule: AdamW over what trains, linear warmup, then decay.

Shared by ``prefixtune train`` and ``prefixtune compare`` (both build their optimizer here), so
that ``--lr``, ``--warmup-steps`` and ``--schedule`` mean the same thing in both.
"""

from __future__ import annotations

import math

import torch

from .config import StepOptions


def optimizer_for(params: list, lr: float, options: StepOptions, total: int):
    """AdamW over ``params`` and its warmup-then-decay schedule over ``total`` steps. ``params`` may be
    parameter groups with an ``lr_scale`` each (``PrefixModel.parameter_groups``): a group's peak rate is
    ``lr * lr_scale``, and the schedule scales every group alike."""
    if params and isinstance(params[0], dict):
        params = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=options.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(options.schedule, options.warmup_steps,
                                                                             total))


def lr_lambda(schedule: str, warmup_steps: int, total: int):
    """Multiplier of the peak rate at each step: linear warmup over ``warmup_steps``, then
    ``schedule`` (linear or cosine decay to zero at step ``total``, or constant)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor
