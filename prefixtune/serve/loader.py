"""Reading one prefix folder for the server, whose files may be hostile.

A folder under a ``--prefix-dir`` is read when a request first names it, so its files are input
from whoever can write there. :func:`artifacts.load_key_values` checks a prefix completely, but
it reads the whole config and allocates the key/values its config declares before it compares
them with the weights file. So the config is checked here first: a few hundred bytes when saved,
it may be at most :data:`MAX_CONFIG_BYTES` (a larger one is refused without being read), it must
parse without deep nesting, and the ``prefix_length`` it declares must fit in the weights file
that is meant to hold those positions.
"""

from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..arch import ModelShape
from ..encoder import PrefixEncoder

MAX_CONFIG_BYTES = 64 << 10
"""Largest ``prefix_config.json`` read (a saved one is under 2 KiB)."""


def key_value_loader(shape: ModelShape):
    """The store's loader for a model of ``shape``: a folder's folded key/values as a flat encoder,
    its config checked before anything is allocated (``ValueError`` naming the file otherwise)."""

    def load(folder: Path) -> PrefixEncoder:
        check_config(Path(folder), shape)
        return artifacts.load_key_values(folder, shape)

    return load


def check_config(folder: Path, shape: ModelShape) -> None:
    """Refuse a config too large to be one, one that is not JSON or nests deeply, or one whose
    ``prefix_length`` asks for more key/values than the weights file holds (at one byte per value
    on one layer, the least any saved prefix stores)."""
    path, weights = folder / artifacts.CONFIG_FILE, folder / artifacts.WEIGHTS_FILE
    if not (path.is_file() and weights.is_file()):
        return  # the loader names what is missing
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: over {MAX_CONFIG_BYTES} bytes; a prefix config is a few hundred")
    meta = artifacts.parse_json(raw, path)
    prefix = meta.get("prefix") if isinstance(meta, dict) else None
    length = prefix.get("prefix_length") if isinstance(prefix, dict) else None
    if type(length) is not int:
        return  # a missing or ill-typed length is the loader's to name
    least, held = length * 2 * shape.num_kv_heads * shape.head_dim, weights.stat().st_size
    if least > held:
        raise ValueError(f"{path}: prefix_length {length} needs at least {least} bytes of key/values, more than "
                         f"{artifacts.WEIGHTS_FILE} holds ({held} bytes)")
