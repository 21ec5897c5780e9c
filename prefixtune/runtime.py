"""What every entry point needs to run a model: the device, mixed precision, the learning-rate schedule,
and errors told in one line.

Shared by ``prefixtune train``, ``compare`` and ``serve``, so that each option means the same
thing everywhere.
"""

from __future__ import annotations

import contextlib
import math

import torch


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA where there is one, else the CPU), or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast(precision: str, device: torch.device):
    """``--precision``: bf16/fp16 autocast where the device supports it; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


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


def first_line(error: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (at most ``limit`` characters): an error told in one line."""
    text = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
