"""A prefix on disk: ``prefix_config.json`` + ``prefix.safetensors``, nothing else (no pickle).

One folder holds everything that trained with the prefix: its key/values (always, folded,
ready for inference), optionally its reparameterization MLP (to continue training), the task
head of a classifier (P-Tuning v2 trains it with the prefix) and, for prefix + LoRA, the PEFT
adapter in ``adapter/`` (:mod:`prefixtune.peft.lora`). :func:`save_prefix` and
:func:`load_prefix` write and read all of it; ``PrefixModel.save_prefix``/``load_prefix`` call them.

Writes are atomic (temporary file, then rename), so an interrupted save never leaves a
half-written prefix behind. Reads fail with a message that names the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import ModelShape
from .base_models import class_names
from .config import PrefixConfig
from .encoder import PrefixEncoder
from .memory import MemoryPrefix
from . import runtime
from .messages import json_failure, not_utf8
from .peft import lora
from .peft.wrappers import is_peft_model

CONFIG_FILE = "prefix_config.json"
WEIGHTS_FILE = "prefix.safetensors"
FORMAT = "prefixtune.prefix.v1"


def save_prefix(directory: str | os.PathLike, encoder: PrefixEncoder, model: nn.Module, shape: ModelShape,
                heads: dict[str, nn.Module], keep_reparam: bool = False) -> Path:
    """Write ``encoder`` (a prefix of ``model``, whose geometry is ``shape``) with the task ``heads``
    and, on a PEFT model, its adapter. ``keep_reparam`` stores the MLP too, so training can resume."""
    tensors = {_TENSOR[encoder.kind]: _folded(encoder)}
    keep = keep_reparam and encoder.reparameterized
    if keep:
        tensors.update({f"reparam.{k}": v for k, v in encoder.state_dict().items()})
    tensors.update({f"head.{name}.{key}": value for name, head in heads.items()
                    for key, value in head.state_dict().items()})
    meta = {"prefix": encoder.config.to_dict(), "layers": list(encoder.layers), "base": shape.to_dict(),
            "reparameterization_saved": keep}
    if heads:  # the class names, so a scorer can rebuild the task model (base_models.load_model)
        meta["labels"] = class_names(model)
    path = write_prefix(directory, meta, tensors)
    if is_peft_model(model):  # prefix + LoRA: the adapter goes to DIR/adapter
        lora.save_adapter(model, path)
    return path


def load_prefix(directory: str | os.PathLike, model: nn.Module, shape: ModelShape,
                heads: dict[str, nn.Module]) -> PrefixEncoder:
    """The prefix saved in ``directory`` as an encoder for ``model`` (geometry ``shape``); its task
    head and PEFT adapter weights are loaded into ``heads`` and ``model`` on the way."""
    meta, tensors = read_prefix(directory)
    config, sites = _checked(meta, shape, directory)
    if not meta.get("reparameterization_saved"):
        config = config.replace(reparameterize=False)
    _check_finite(tensors, directory)
    encoder = new_prefix(config, sites, shape)
    _load_encoder(encoder, tensors, directory)
    _load_heads(heads, tensors, directory)
    if lora.has_saved_adapter(directory):  # prefix + LoRA: the LoRA weights trained with this prefix
        lora.load_adapter_weights(model, directory)
    return encoder


def load_key_values(directory: str | os.PathLike, shape: ModelShape) -> PrefixEncoder | MemoryPrefix:
    """The folded key/values (or the memory) saved in ``directory``, as a flat prefix, and nothing else:
    what a server that swaps prefixes per request needs. Only that tensor is read (not the MLP), and a
    prefix that trained with its own task head or LoRA weights is refused: loading those would
    change the shared model under every other prefix's requests."""
    meta = read_meta(directory)
    config, sites = _checked(meta, shape, directory)
    weights = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            if any(n.startswith("head.") for n in names) or lora.has_saved_adapter(directory):
                raise ValueError(f"{directory}: this prefix carries its own task head or LoRA weights, which would "
                                 "change the model for every other prefix; serve it on a server of its own")
            wanted = _TENSOR[config.kind]
            tensors = {wanted: f.get_tensor(wanted)} if wanted in names else {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: unreadable safetensors file ({err})") from err
    _check_finite(tensors, directory)
    encoder = new_prefix(config.replace(reparameterize=False), sites, shape)
    _load_encoder(encoder, tensors, directory)
    return encoder


_TENSOR = {"kv": "key_values", "memory": "memory"}
"""The tensor that holds each kind of prefix, folded: what inference reads."""


def new_prefix(config: PrefixConfig, sites: tuple[int, ...], shape: ModelShape) -> PrefixEncoder | MemoryPrefix:
    """An untrained prefix of ``config``'s kind at ``sites`` of a model of geometry ``shape``; one that
    could not fit in this machine's memory is refused before anything is allocated, naming the option."""
    _check_fits(config, len(sites), shape)
    kind = MemoryPrefix if config.kind == "memory" else PrefixEncoder
    return kind(config, sites, shape.num_kv_heads, shape.head_dim)


def _check_fits(config: PrefixConfig, sites: int, shape: ModelShape) -> None:
    """Refuse a prefix whose float32 parameters alone exceed the machine's memory (``--prefix-length 10**9``
    would otherwise die in the allocator with no word of which option asked for it)."""
    kv = sites * 2 * shape.num_kv_heads * shape.head_dim
    if config.kind == "memory":
        count, option = sites * shape.num_kv_heads * shape.head_dim ** 2, None
    elif config.reparameterize:
        width = config.reparam_hidden_size
        count, option = config.prefix_length * width + width * (width + 1) + (width + 1) * kv, "--reparam-hidden-size"
    else:
        count, option = config.prefix_length * kv, "--prefix-length"
    needed, free = 4 * count, runtime.free_memory()
    if free and needed > free:
        raise ValueError(f"{option or '--prefix-kind memory'}: this prefix needs {needed / 2**30:,.1f} GiB of parameters "
                         f"(--prefix-length {config.prefix_length}, --reparam-hidden-size {config.reparam_hidden_size}), "
                         f"more than the {free / 2**30:,.1f} GiB of memory this machine has free")


def _folded(prefix) -> torch.Tensor:
    return prefix.raw_memory() if prefix.kind == "memory" else prefix.raw_key_values()


def _checked(meta: dict, shape: ModelShape, directory) -> tuple[PrefixConfig, tuple[int, ...]]:
    """The saved prefix's config and sites, once its ``base`` block matches ``shape``."""
    saved = saved_shape(meta, directory)
    problems = saved.mismatches(shape)
    if problems:
        raise ValueError(f"{directory}: this prefix was made for another model: " + "; ".join(problems))
    if saved.name_or_path and shape.name_or_path and saved.name_or_path != shape.name_or_path:
        warnings.warn(f"prefix was trained on {saved.name_or_path!r}, loading onto {shape.name_or_path!r}")
    return saved_config(meta, directory), _sites(_entry(meta, "layers", list, directory), shape.num_layers, directory)


def _check_finite(tensors: dict[str, torch.Tensor], directory) -> None:
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise ValueError(f"{directory}: tensors {bad} hold NaN or infinite values")


def saved_config(meta: dict, directory) -> PrefixConfig:
    """The :class:`PrefixConfig` in a saved prefix's ``prefix`` block, or one line naming the file and the key."""
    return PrefixConfig.from_dict(_entry(meta, "prefix", dict, directory), where=f"{Path(directory) / CONFIG_FILE}: prefix")


def _entry(meta: dict, key: str, kind: type, directory):
    """``meta[key]``, which must be a ``kind``; else one line naming the file and the key."""
    if not isinstance(meta.get(key), kind):
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: {key!r} must be a {kind.__name__}, "
                         f"got {type(meta.get(key)).__name__}")
    return meta[key]


def saved_shape(meta: dict, directory) -> ModelShape:
    """The model facts the prefix was saved with (its ``base`` block), checked key by key."""
    base = _entry(meta, "base", dict, directory)
    known = {f.name for f in dataclasses.fields(ModelShape)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: unknown key(s) {unknown} in its 'base' block")
    try:
        return ModelShape(**base)
    except TypeError as err:
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: its 'base' block is incomplete ({err})") from None


def _sites(layers: list, num_sites: int, directory) -> tuple[int, ...]:
    """The saved prefix's sites: whole numbers, each once, each a site of the model."""
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: 'layers' must list distinct layer indices, got {layers}")
    outside = [i for i in layers if not 0 <= i < num_sites]
    if outside or not layers:
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: layers {outside or layers} are not layers of this model, "
                         f"which has {num_sites}")
    return tuple(layers)


def _load_encoder(encoder: PrefixEncoder, tensors: dict, directory) -> None:
    if encoder.reparameterized:
        state = {k.removeprefix("reparam."): v for k, v in tensors.items() if k.startswith("reparam.")}
    else:
        state = {_TENSOR[encoder.kind]: tensors.get(_TENSOR[encoder.kind])}
    expected = encoder.state_dict()
    bad = [k for k in expected if k not in state or state[k] is None or state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{directory}: prefix tensors {bad} are missing or have the wrong shape")
    encoder.load_state_dict(state)


def _load_heads(heads: dict[str, nn.Module], tensors: dict, directory) -> None:
    """Copy a saved task head into the model's (the head trains with the prefix, P-Tuning v2)."""
    saved = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    if not saved:
        return
    names = sorted({key.split(".", 1)[0] for key in saved})
    missing = [n for n in names if n not in heads]
    if missing:
        raise ValueError(
            f"{directory}: this prefix carries a task head ({', '.join(names)}) that the model lacks: load the base "
            "model as a task model (e.g. AutoModelForSequenceClassification with the same num_labels)"
        )
    for name in names:
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == name}
        expected = heads[name].state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if bad:
            shapes = {k: tuple(state[k].shape) for k in bad if k in state}
            raise ValueError(f"{directory}: task head {name!r} does not fit the model (different num_labels?): "
                             f"{bad} missing or of shape {shapes}, model expects "
                             f"{ {k: tuple(expected[k].shape) for k in bad} }")
        with torch.no_grad():
            heads[name].load_state_dict(state)


def write_prefix(directory: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one prefix to ``directory`` (created if needed) and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().to("cpu", torch.float32).contiguous() for key, t in tensors.items()}
    write_safetensors(path / WEIGHTS_FILE, tensors, {"format": FORMAT})
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    atomic_write(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file, written atomically."""
    tensors = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_prefix(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read what ``write_prefix`` wrote: ``(meta, tensors)``."""
    return read_meta(directory), read_safetensors(Path(directory) / WEIGHTS_FILE)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, or a ValueError naming it (truncated, not safetensors)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from err


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
    """The JSON in ``path``, or a ValueError naming the file and what is wrong: bytes that are not UTF-8, the
    line where the text breaks, or nesting deeper than the parser goes."""
    return parse_json(path.read_bytes(), path)


def parse_json(raw: bytes, path: Path):
    """``raw`` (UTF-8 JSON from the file ``path``) parsed, or a ValueError naming the file."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(not_utf8(str(path), err)) from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({json_failure(err)})") from None


def atomic_write(target: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``target``, then rename it to ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
