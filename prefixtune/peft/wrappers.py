"""PEFT's model wrappers, seen through without importing ``peft``.

``peft.get_peft_model`` wraps a transformers model twice (``PeftModel -> LoraModel -> model``)
and leaves its LoRA layers inside the model's own modules; a prefix reaches the same attention
modules through the wrappers, and the architecture facts (:mod:`prefixtune.arch`) are read off
the transformers model inside.
"""

from __future__ import annotations

from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel``, ``LoraModel``...), told without importing peft."""
    return type(model).__module__.split(".", 1)[0] == "peft"


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT's wrappers (``PeftModel -> LoraModel -> model``);
    ``model`` itself otherwise. LoRA layers stay in place: only the wrappers are looked through."""
    while is_peft_model(model):
        inner = model.get_base_model() if hasattr(type(model), "get_base_model") else getattr(model, "model", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model
