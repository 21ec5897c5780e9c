"""Where and in which precision a model runs: ``--device`` and ``--precision``.

Shared by ``prefixtune train``, ``compare`` and ``serve``, so that each option means the same
thing everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA where there is one, else the CPU), or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name}: not a device a model runs on; use auto, cpu, cuda or mps")
    if not backend.is_available():
        raise ValueError(f"--device {name}: this machine has no {device.type} device (torch {torch.__version__})")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if (device.index or 0) >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


def autocast(precision: str, device: torch.device):
    """``--precision``: bf16/fp16 autocast where the device supports it; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def free_memory() -> int | None:
    """Bytes of memory a new allocation can have: Linux's ``MemAvailable`` (free memory and the caches it can
    drop), else the machine's physical memory where the system says, else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
