"""Resumable training checkpoints, as safetensors + JSON only (no pickle).

A checkpoint folder holds the prefix with its MLP (``save_prefix(keep_reparam=True)``),
``optimizer.safetensors`` (AdamW moments and the RNG state), and ``trainer_state.json``
(step, best metric, optimizer hyper-parameters, scheduler counters). It is written to a
temporary folder and swapped in with renames, so a crash mid-write leaves the previous
checkpoint intact.

Nothing in it belongs to one process of a distributed run: every process holds the same
prefix and optimizer state, the main process writes them, and any number of processes can
resume from them. The RNG state is the writer's; only a single-process resume restores it
(``train`` reseeds each process of a distributed run, see ``distributed.Processes.seed``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .artifacts import read_json
from .model import PrefixModel
from .messages import first_line

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def save(directory: Path, pm: PrefixModel, optimizer, scheduler, state: dict, processes: int = 1) -> None:
    """Write a checkpoint of everything needed to continue exactly where training is.

    ``processes`` (how many trained) is recorded for the record only: resuming does not need it.
    """
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pm.save_prefix(staging, keep_reparam=True)
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(staging / OPTIMIZER_FILE))
    meta = {"state": state, "param_groups": groups, "scheduler": scheduler.state_dict(), "processes": processes}
    (staging / STATE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():  # else an interrupted swap left `old` as the only good copy: keep it until the end
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def find(directory: Path) -> Path | None:
    """The checkpoint folder to resume from (the previous one if a swap was interrupted)."""
    for candidate in (Path(directory), Path(directory).with_name(f".{Path(directory).name}.old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_state(directory: Path) -> dict:
    """The saved trainer state (step, best metric, ...). Load the prefix first with
    ``pm.load_prefix(directory)``, build the optimizer over it, then call :func:`restore`."""
    return _meta(directory)["state"]


def restore(directory: Path, optimizer, scheduler, rng: bool = True) -> None:
    """Restore optimizer moments, scheduler counters and (with ``rng``) the RNG from ``directory``."""
    meta = _meta(directory)
    path = Path(directory) / OPTIMIZER_FILE
    try:
        tensors = load_file(str(path))
        rng_state = tensors.pop("rng.torch")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["param_groups"]))
        scheduler.load_state_dict(meta["scheduler"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: the checkpoint is damaged ({first_line(err)}); remove {directory} to start "
                         "again from step 0") from None
    if rng:
        torch.set_rng_state(rng_state)


def _meta(directory: Path) -> dict:
    """``trainer_state.json``, checked for what resuming reads."""
    meta = read_json(Path(directory) / STATE_FILE)
    if not isinstance(meta, dict) or not {"state", "param_groups", "scheduler"} <= set(meta):
        raise ValueError(f"{Path(directory) / STATE_FILE}: the checkpoint is damaged (its state is incomplete); "
                         f"remove {directory} to start again from step 0")
    step = meta["state"].get("step") if isinstance(meta["state"], dict) else None
    if type(step) is not int or step < 0:  # a resumed run counts on from it and cuts the log back to it
        raise ValueError(f"{Path(directory) / STATE_FILE}: the checkpoint is damaged (its step is {step!r}, not a "
                         f"count of steps); remove {directory} to start again from step 0")
    return meta



def _flatten_optimizer(state_dict: dict) -> tuple[dict, list]:
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict, groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}
