"""PEFT adapters (LoRA, QLoRA...) that train beside a prefix.

The user builds the LoRA model the PEFT way and wraps it like any other model::

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=10))

PEFT itself declares what trains: after ``get_peft_model`` exactly the adapter's weights
have ``requires_grad``. :class:`~prefixtune.model.PrefixModel` freezes the model, then
gives those parameters their gradients back, so one declaration (PEFT's, plus the
prefixes) decides what trains and what is saved.

On disk the adapter is PEFT's own format in a subfolder of the prefix folder::

    OUT/prefix_config.json, OUT/prefix.safetensors          the prefix, as always
    OUT/adapter/adapter_config.json, adapter_model.safetensors    PEFT's save_pretrained

so ``peft.PeftModel.from_pretrained(base, "OUT/adapter")`` reads the LoRA part on its
own, and ``PrefixModel.from_pretrained(base, "OUT")`` restores both.

This module sits below :mod:`prefixtune.model` and imports ``peft`` only inside the
functions that need it (PEFT is the optional ``peft`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .wrappers import is_peft_model

ADAPTER_DIR = "adapter"
"""Subfolder of a prefix folder that holds the PEFT adapter trained with the prefix."""


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PEFT marked trainable on ``model`` (LoRA A/B, ``modules_to_save``...), after
    refusing PEFT models a prefix cannot train beside; ``[]`` for other models.

    Read before :class:`PrefixModel` freezes the model: ``requires_grad`` is how PEFT declares them.
    A model loaded with ``PeftModel.from_pretrained(..., is_trainable=False)`` has none.
    """
    if not is_peft_model(model):
        return []
    _check_wrappable(model)
    return [p for p in model.parameters() if p.requires_grad]


def _check_wrappable(model: nn.Module) -> None:
    """Refuse PEFT models a prefix cannot train beside: PEFT's own prompt learning (a prefix of
    its own), or several adapters (one, named "default", is saved and loaded with the prefix)."""
    config = getattr(model, "active_peft_config", None) if is_peft_model(model) else None
    if config is None:
        return
    if getattr(config, "is_prompt_learning", False):
        raise NotImplementedError(
            f"this PEFT model carries {config.peft_type.value}, a prompt-learning method of PEFT's own; "
            "PrefixModel combines with weight adapters such as LoRA. To bring a PEFT prefix over, use "
            "`prefixtune import-peft` (prefixtune.peft.interop.import_peft)"
        )
    names = list(getattr(model, "peft_config", {}) or {})
    if names != ["default"]:
        raise NotImplementedError(
            f"this PEFT model holds adapters {names}; a prefix trains and is saved with one adapter named "
            "'default' (what peft.get_peft_model makes), which PeftModel.from_pretrained loads back"
        )


def has_saved_adapter(directory: str | os.PathLike) -> bool:
    """Whether a prefix folder also holds a PEFT adapter (``DIR/adapter/adapter_config.json``)."""
    return (Path(directory) / ADAPTER_DIR / "adapter_config.json").is_file()


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s PEFT adapter (the one named "default") to ``directory/adapter`` in PEFT's format."""
    target = Path(directory) / ADAPTER_DIR
    model.save_pretrained(str(target), safe_serialization=True)
    return target


def with_saved_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``model`` wrapped in the PEFT adapter saved in ``directory/adapter`` (``PeftModel.from_pretrained``)
    where the prefix folder holds one and ``model`` carries none yet; else ``model`` itself.

    Args:
        model: The base model the adapter was trained on (for QLoRA: loaded in 4 bits again).
        directory: A prefix folder written by ``PrefixModel.save_prefix``.

    The adapter comes back frozen, for inference, as ``PeftModel.from_pretrained`` loads it.
    """
    if not has_saved_adapter(directory) or is_peft_model(model):
        return model
    return _peft().PeftModel.from_pretrained(model, str(Path(directory) / ADAPTER_DIR))


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load the adapter saved in ``directory/adapter`` into ``model``, a PEFT model of the same adapter config.

    Used when a prefix is loaded onto an already wrapped model (resuming, restoring the best
    checkpoint): the LoRA weights that were trained with that prefix come back with it.
    """
    peft = _peft()
    source = Path(directory) / ADAPTER_DIR
    if not is_peft_model(model):
        raise ValueError(
            f"{directory}: this prefix was trained together with a PEFT adapter ({source}); load it with "
            "PrefixModel.from_pretrained(base_model, directory), which attaches the adapter first"
        )
    weights = peft.utils.load_peft_weights(str(source), device=str(_device(model)))
    name = _active_adapter(model)
    result = peft.set_peft_model_state_dict(model, weights, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{name}." in k]  # adapter weights only
    if unexpected or missing:
        raise ValueError(f"{source}: the saved adapter does not fit this model's adapter (other target modules?): "
                         f"unexpected {unexpected[:5]}, missing {missing[:5]}")


def _active_adapter(model: nn.Module) -> str:
    name = getattr(model, "active_adapter", "default")
    return name if isinstance(name, str) else name[0]


def _device(model: nn.Module):
    return next(model.parameters()).device


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("this needs PEFT: pip install 'prefixtune[peft]'") from err
    return peft
