"""Helpers shared by the benchmark scripts: machine description, arm rotation, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch


def machine_info(threads: int) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
    }


def start(threads: int) -> dict:
    """Common start of a benchmark: torch threads, quiet FutureWarnings, and the machine printed and returned."""
    import warnings

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = machine_info(threads)
    print("  ".join(f"{key}={value}" for key, value in info.items()))
    return info


class use_variant:
    """``with use_variant("mask", chunk=1 << 28):`` sets ``prefixtune.attention.FUSED_CAUSAL``
    (and, if given, ``prefixtune.lm_loss.CHUNK_ELEMENTS``) for the block: arms that differ only
    in these run side by side in one process."""

    def __init__(self, variant: str | None, chunk: int | None = None):
        self.variant, self.chunk = variant, chunk

    def __enter__(self):
        from prefixtune import attention, lm_loss

        self.old = attention.FUSED_CAUSAL, lm_loss.CHUNK_ELEMENTS
        attention.FUSED_CAUSAL = self.variant or attention.FUSED_CAUSAL
        lm_loss.CHUNK_ELEMENTS = self.chunk or lm_loss.CHUNK_ELEMENTS

    def __exit__(self, *exc):
        from prefixtune import attention, lm_loss

        attention.FUSED_CAUSAL, lm_loss.CHUNK_ELEMENTS = self.old


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def build_each(builders: dict) -> tuple[dict, dict]:
    """Call each arm builder: ``({name: built}, {name: error line})``; a failing arm does not stop the others."""
    arms, failed = {}, {}
    for name, build in builders.items():
        try:
            arms[name] = build()
        except Exception as error:  # noqa: BLE001 - a failing arm must not stop the others
            failed[name] = first_line(error)
    return arms, failed


def rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def peft_prefix_model(model, prefix_length: int, hidden: int):
    """PEFT's prefix tuning with the paper's MLP, configured like prefixtune's arm."""
    import peft

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_length,
                                     prefix_projection=True, encoder_hidden_size=hidden)
    return peft.get_peft_model(model, config)
