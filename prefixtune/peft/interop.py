"""PEFT prefix-tuning checkpoints, converted to and from prefixtune prefixes.

PEFT keeps a prefix-tuning adapter as two files: ``adapter_config.json`` (a
``PrefixTuningConfig``) and ``adapter_model.safetensors`` with one tensor,
``prompt_embeddings``, of shape ``[L_p, num_layers * 2 * token_dim]``. Each row is one
virtual token; PEFT views it as ``[num_layers * 2, heads, head_dim]`` with keys and
values of a layer side by side (``get_prompt``: ``view(B, L, layers * 2, heads, hd)``,
``permute(2, 0, 3, 1, 4)``, ``split(2)``), and for grouped-query models ``heads`` is the
number of key/value heads (PEFT #1901). prefixtune keeps
``[num_layers, 2, kv_heads, L_p, head_dim]``, so the conversion is one permutation::

    PEFT      [L_p, num_layers, 2, kv_heads, head_dim]   (rows of prompt_embeddings)
    prefixtune [num_layers, 2, kv_heads, L_p, head_dim]  (prefix.safetensors "key_values")

PEFT passes the prefix as a ``past_key_values`` cache of ``L_p`` positions, so the real
tokens get positions ``L_p, L_p + 1, ...``: prefixtune's ``shift_positions=True``.

What PEFT's format cannot hold, and is refused with a message naming it: a prefix on a
subset of layers, ``shift_positions=False``, prefixes of an encoder or of cross-attention
(encoder-decoder and encoder models), a task head trained with the prefix, and model
families prefixtune has no family for.

The reparameterization MLP is always exported folded (materialized): PEFT's own files
hold only ``prompt_embeddings`` (the MLP's output) even for ``prefix_projection=True``,
and ``PeftModel.from_pretrained`` loads a prefix-tuning adapter for inference only (PEFT
0.21 refuses ``is_trainable=True`` for prompt-learning adapters). The exported config
says ``prefix_projection=False``, which is what the file holds. To train on, import the
PEFT prefix into prefixtune (``import-peft``) instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .. import arch
from ..artifacts import (CONFIG_FILE, WEIGHTS_FILE, read_json, read_prefix, read_safetensors, saved_config,
                         saved_shape, write_prefix, write_safetensors)
from ..config import PrefixConfig
from . import lora

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_LEGACY = "adapter_model.bin"
WRITTEN = {"export_peft": (PEFT_CONFIG, PEFT_WEIGHTS), "import_peft": (CONFIG_FILE, WEIGHTS_FILE)}
"""The files each conversion writes into its target folder (which the commands refuse to overwrite)."""
PEFT_KEY = "prompt_embeddings"
_PREFIX_META = {"format", "prefix", "layers", "base", "reparameterization_saved"}


class NotExpressible(ValueError):
    """The prefix uses something PEFT's prefix-tuning format cannot hold (or the reverse)."""


# ------------------------------------------------------------------ family
def to_peft_embeddings(key_values: torch.Tensor) -> torch.Tensor:
    """``[num_layers, 2, kv_heads, L_p, head_dim]`` -> PEFT's ``[L_p, num_layers * 2 * kv_heads * head_dim]``."""
    length = key_values.shape[3]
    return key_values.permute(3, 0, 1, 2, 4).reshape(length, -1).contiguous()


def from_peft_embeddings(embeddings: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`to_peft_embeddings`."""
    length = embeddings.shape[0]
    return embeddings.reshape(length, num_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


# ------------------------------------------------------------------ export
def export_peft(prefix_dir: str | os.PathLike, peft_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the prefix saved in ``prefix_dir`` as a PEFT prefix-tuning adapter in ``peft_dir``.

    ``peft.PeftModel.from_pretrained(base, peft_dir)`` then gives the same logits as
    ``PrefixModel.from_pretrained(base, prefix_dir)`` in a forward pass.

    Args:
        prefix_dir: A prefix folder (``prefix_config.json`` + ``prefix.safetensors``).
        peft_dir: Where ``adapter_config.json`` and ``adapter_model.safetensors`` go.
        base_model: The base model's Hub id or folder, written as ``base_model_name_or_path``
            (what ``AutoPeftModelForCausalLM`` loads); default: the one the prefix records.

    Raises:
        NotExpressible: The prefix uses something PEFT's format cannot hold (the message names it).
    """
    import peft  # noqa: F401 - fail early and clearly when PEFT is missing

    meta, tensors = read_prefix(prefix_dir)
    config, shape = saved_config(meta, prefix_dir), saved_shape(meta, prefix_dir)
    _check_exportable(prefix_dir, meta, tensors, config, shape)
    key_values = tensors["key_values"]  # [num_layers, 2, kv_heads, L_p, head_dim], MLP already folded
    token_dim = shape.num_kv_heads * shape.head_dim
    peft_config = _peft_config(
        num_virtual_tokens=config.prefix_length, num_layers=shape.num_layers, token_dim=token_dim,
        num_attention_heads=shape.num_kv_heads, base_model_name_or_path=base_model or shape.name_or_path or None,
    )
    target = Path(peft_dir)
    target.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(target))
    write_safetensors(target / PEFT_WEIGHTS, {PEFT_KEY: to_peft_embeddings(key_values.float())}, {"format": "pt"})
    if not peft_config.base_model_name_or_path:
        warnings.warn(f"{prefix_dir}: no base model recorded; {target / PEFT_CONFIG} has no base_model_name_or_path "
                      "(give one with --base-model for AutoPeftModelForCausalLM)")
    return target


def _check_exportable(where, meta: dict, tensors: dict, config: PrefixConfig, shape: arch.ModelShape) -> None:
    problems = list(_export_problems(where, meta, tensors, config, shape))
    if problems:
        raise NotExpressible(f"{where}: cannot export to PEFT: " + "; ".join(problems))


def _export_problems(where, meta: dict, tensors: dict, config: PrefixConfig, shape: arch.ModelShape):
    """Each thing about this prefix that PEFT's prefix-tuning adapter cannot hold, in words."""
    if config.kind != "kv":
        yield (f"it is a {config.kind} prefix (a term on each head's output, outside the softmax); PEFT's "
               "prefix-tuning format holds key/value positions only")
        return
    extra_meta = sorted(set(meta) - _PREFIX_META)
    if extra_meta:
        yield f"it records {extra_meta}, which PEFT's prefix-tuning format has no place for"
    if set(shape.groups) != {"decoder"}:
        groups = ", ".join(g for g in arch.GROUPS if g in shape.groups)
        yield (f"it is for a model with {groups} attention ({shape.model_type}); PEFT's prefix tuning is exported "
               "for decoder-only models only, where its cache family is one self-attention prefix per layer "
               "(encoder and cross-attention prefixes cannot be expressed)")
    elif shape.model_type not in arch.FAMILIES:
        yield f"prefixtune has no architecture entry for model_type {shape.model_type!r}"
    if list(meta["layers"]) != list(range(shape.num_layers)):
        yield (f"it covers layers {list(meta['layers'])} of {shape.num_layers}; PEFT puts a prefix in every layer "
               "and cannot leave some out (a zero prefix would still take attention weight)")
    if not config.shift_positions:
        yield ("it was trained with shift_positions=False; PEFT passes the prefix as a cache of "
               f"{config.prefix_length} positions, so the real tokens always start at position {config.prefix_length}")
    heads = sorted({k.split(".")[1] for k in tensors if k.startswith("head.")})
    if heads:
        yield (f"it carries a task head ({', '.join(heads)}) trained with it; PEFT's prefix-tuning adapter "
               "holds only the prefix")
    if lora.has_saved_adapter(where):
        yield (f"it was trained together with the LoRA adapter in {Path(where) / lora.ADAPTER_DIR}; a PEFT model holds "
               "prefix tuning or LoRA, not both, and the prefix alone would give other logits")
    unknown = sorted(k for k in tensors if k != "key_values" and not k.startswith(("reparam.", "head.")))
    if unknown:
        yield f"it holds tensors {unknown} that PEFT's format has no place for"
    key_values = tensors.get("key_values")
    expected = (shape.num_layers, 2, shape.num_kv_heads, config.prefix_length, shape.head_dim)
    if key_values is None or tuple(key_values.shape) != expected:
        got = None if key_values is None else tuple(key_values.shape)
        yield f"its key_values have shape {got}, expected {expected}"


def _peft_config(**fields):
    import peft

    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", prefix_projection=False, inference_mode=True,
        encoder_hidden_size=fields["token_dim"], **fields,
    )


# ------------------------------------------------------------------ import
def import_peft(peft_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the PEFT prefix-tuning adapter in ``peft_dir`` as a prefixtune prefix in ``out_dir``.

    The result is a flat prefix (``reparameterize=False``): PEFT's file holds the prefix's
    key/values, never its projection MLP.

    Args:
        peft_dir: A folder with ``adapter_config.json`` and ``adapter_model.safetensors``
            (or a legacy ``adapter_model.bin``, read with ``torch.load(weights_only=True)``).
        out_dir: Where ``prefix_config.json`` and ``prefix.safetensors`` go.
        base_model: Hub id or folder of the base model, whose config is read to check the
            prefix's shape; default: the adapter's ``base_model_name_or_path``.
    """
    source = Path(peft_dir)
    peft_config = _read_peft_config(source)
    base = base_model or peft_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{source / PEFT_CONFIG} names no base_model_name_or_path: give the base model "
                         "(--base-model), whose config fixes the prefix's family")
    shape = _shape_of(base)
    embeddings = _read_peft_weights(source)
    length = int(peft_config["num_virtual_tokens"])
    _check_importable(source, peft_config, embeddings, shape, length)
    key_values = from_peft_embeddings(embeddings.float(), shape.num_layers, shape.num_kv_heads, shape.head_dim)
    meta = {
        "prefix": PrefixConfig(prefix_length=length, reparameterize=False, shift_positions=True).to_dict(),
        "layers": list(range(shape.num_layers)),
        "base": shape.to_dict(),
        "reparameterization_saved": False,
    }
    return write_prefix(out_dir, meta, {"key_values": key_values})


def _read_peft_config(source: Path) -> dict:
    path = source / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a PEFT adapter folder holds {PEFT_CONFIG})")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a PEFT adapter config (a JSON object with 'peft_type'), but a "
                         f"{type(config).__name__}")
    kind = config.get("peft_type")
    if kind != "PREFIX_TUNING":
        hint = (" A LoRA adapter is not a prefix: load it with peft and wrap the result, "
                "PrefixModel.wrap(peft.PeftModel.from_pretrained(base, dir)) (docs/peft.md)") if kind == "LORA" else ""
        raise NotExpressible(f"{path}: peft_type is {kind!r}, not 'PREFIX_TUNING'.{hint}")
    if config.get("task_type") not in (None, "CAUSAL_LM") or int(config.get("num_transformer_submodules") or 1) != 1:
        raise NotExpressible(
            f"{path}: task_type {config.get('task_type')!r} with {config.get('num_transformer_submodules')} "
            "transformer submodules: only decoder-only (CAUSAL_LM) prefixes are imported; PEFT's encoder-decoder "
            "family does not map onto prefixtune's separate encoder, decoder and cross-attention prefixes"
        )
    return config


def _read_peft_weights(source: Path) -> torch.Tensor:
    if (source / PEFT_WEIGHTS).is_file():
        weights = read_safetensors(source / PEFT_WEIGHTS)
    elif (source / PEFT_WEIGHTS_LEGACY).is_file():
        weights = _legacy_weights(source / PEFT_WEIGHTS_LEGACY)
    else:
        raise FileNotFoundError(f"{source}: holds neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_LEGACY}")
    if PEFT_KEY not in weights:
        raise ValueError(f"{source}: the adapter weights hold {sorted(weights)}, not {PEFT_KEY!r}")
    return weights[PEFT_KEY]


def _legacy_weights(path: Path) -> dict:
    """A legacy ``adapter_model.bin``, read with ``torch.load(weights_only=True)``: tensors only, no code runs.
    Anything else in it (pickled objects) is refused in one line, as is a file torch cannot read."""
    import pickle

    from ..messages import first_line

    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol: the refusal below says what matters
            warnings.simplefilter("ignore")
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not loaded: it holds more than tensors, or is not a torch file "
                         f"({first_line(err, 120)}); save the adapter "
                         "with PEFT's save_pretrained(safe_serialization=True) and import the .safetensors") from None
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors, got {type(weights).__name__}")
    return weights


def _shape_of(base: str) -> arch.ModelShape:
    """The prefix geometry of a base model, from its config alone (built on the meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import base_models, hub

    bundled = base in (base_models.BUNDLED, base_models.BUNDLED_NAME)  # the name load_model records for it
    if not bundled:
        hub.require("model", base)
    config = AutoConfig.from_pretrained(base_models.bundled_folder() if bundled else base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = base_models.BUNDLED_NAME if bundled else str(base)
    family = arch.family_of(model)
    if family.encoder_decoder or {group.name for group in family.groups} != {"decoder"}:
        raise NotExpressible(f"{base}: a {config.model_type} model; PEFT prefixes are imported for decoder-only "
                             "models only")
    return arch.model_shape(model, family)


def _check_importable(source: Path, config: dict, embeddings: torch.Tensor, shape: arch.ModelShape, length: int):
    token_dim = shape.num_kv_heads * shape.head_dim
    width = shape.num_layers * 2 * token_dim
    declared = {
        "num_layers": (config.get("num_layers"), shape.num_layers),
        "num_attention_heads (key/value heads)": (config.get("num_attention_heads"), shape.num_kv_heads),
        "token_dim (kv_heads * head_dim)": (config.get("token_dim"), token_dim),
    }
    problems = [f"{key}: adapter says {got}, model has {want}"
                for key, (got, want) in declared.items() if got is not None and int(got) != want]
    if tuple(embeddings.shape) != (length, width):
        problems.append(f"{PEFT_KEY} has shape {tuple(embeddings.shape)}, the model needs ({length}, {width}) "
                        f"= (num_virtual_tokens, {shape.num_layers} layers * 2 * {shape.num_kv_heads} kv heads * "
                        f"{shape.head_dim})")
    if problems:
        raise ValueError(f"{source}: this adapter does not fit {shape.name_or_path or 'the base model'}: "
                         + "; ".join(problems))
