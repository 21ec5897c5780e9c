"""Prefix artifacts on disk: ``prefix_config.json`` + ``prefix.safetensors``, nothing else.

Writes are atomic (temporary file, then rename), so an interrupted save never leaves a
half-written prefix behind. Reads fail with a message that names the file and the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "prefix_config.json"
WEIGHTS_FILE = "prefix.safetensors"
FORMAT = "prefixtune.prefix.v1"


def write_prefix(directory: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one prefix to ``directory`` (created if needed) and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu", torch.float32).contiguous() for key, t in tensors.items()}
    _atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    _atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def read_prefix(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read what ``write_prefix`` wrote: ``(meta, tensors)``."""
    meta = read_meta(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({err})") from err
    return meta, tensors


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``prefix_config.json`` of a saved prefix (the tensors are not read), once both files
    are known to be there."""
    path = Path(directory)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not found (a saved prefix holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_json(config_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a prefixtune prefix config (expected format {FORMAT!r})")
    return meta


def read_json(path: Path):
    """The JSON in ``path``, or a ValueError naming the file and the line where it breaks."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
