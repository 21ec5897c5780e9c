"""Putting prefixes into a model without copying or editing its code.

:func:`install` freezes the model, points its attention at the prefix-aware kernel of
:mod:`prefixtune.attention` and tags every attention module with its site (its row in a
prefix's key/values). Per call, :func:`call_kwargs` adds the laid-out prefix and the shifted
positions to the base model's keyword arguments; ``generate()`` refuses keyword arguments
that ``forward`` does not name, so :func:`generation_hooks` adds them to every decoding step
with forward pre-hooks instead. :func:`check_applied` refuses outputs computed without the
prefix, which PEFT's prefix tuning returns silently when a model ignores its cache.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import arch
from .attention import KWARG, SITE_ATTR, Site, implementation_name
from .peft.wrappers import unwrap_adapters
from .prefixes import PrefixBatch


def install(model: nn.Module, family: arch.Family) -> str:
    """Freeze ``model``, switch it to the prefix-aware kernel and tag its sites; returns the
    name of the kernel it had, which :func:`uninstall` restores."""
    base = model.config._attn_implementation.removeprefix("prefixtune_")  # a model wrapped before keeps its kernel
    model.requires_grad_(False)
    name = implementation_name(base)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise NotImplementedError(
            f"{type(model).__name__} would not switch its attention to {name!r}: it does not "
            "call attention through transformers' AttentionInterface"
        )
    for index, (group, module) in enumerate(arch.attention_modules(model, family)):
        setattr(module, SITE_ATTR, Site(index, group.causal))
    return base


def uninstall(model: nn.Module, family: arch.Family, base: str) -> None:
    """Restore kernel ``base`` and remove the tags (the weights stay frozen)."""
    model.set_attn_implementation(base)
    for _, module in arch.attention_modules(model, family):
        if hasattr(module, SITE_ATTR):
            delattr(module, SITE_ATTR)


def call_kwargs(batch: PrefixBatch, kwargs: dict, family: arch.Family, device) -> dict:
    """``kwargs`` of a base-model call, plus the prefix and the shifted positions."""
    batch = batch.expand_rows(rows(kwargs))
    if family.positions == "internal":  # the model numbers positions itself; nothing to shift
        return {**kwargs, KWARG: batch}
    tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = base_positions(tokens.shape[1], kwargs, family, device)
    shift = batch.shift if batch.shift is not None else batch.offsets[:, None].to(positions.device)
    return {**kwargs, KWARG: batch, "position_ids": positions + shift}


def base_positions(length: int, kwargs: dict, family: arch.Family, device) -> torch.Tensor:
    """The positions the base model would give these tokens itself (see ``arch.Family.positions``)."""
    mask = kwargs.get("attention_mask")
    if family.positions == "mask" and mask is not None and mask.dim() == 2:
        mask = mask.long()
        return (mask.cumsum(-1) * mask - 1)[:, -length:]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + length, device=device)[None]


def rows(kwargs: dict) -> int:
    """Batch size of a model call, from whichever input it was given."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("cannot tell the batch size: give input_ids or inputs_embeds")


@contextlib.contextmanager
def generation_hooks(model: nn.Module, family: arch.Family, batch: PrefixBatch, device):
    """Hand ``batch`` to every forward that ``model.generate`` runs, through forward pre-hooks.

    The hooks sit on the transformers model inside PEFT's wrappers (PEFT's ``generate`` calls it,
    not its own ``forward``), and on an encoder-decoder's encoder, which ``generate`` runs once,
    directly. Beam search and ``num_return_sequences`` call every step with the rows repeated: the repeated
    prefix is made at the first step and kept, not made again at each."""
    repeated = {}  # rows -> the batch with its rows repeated to that many

    def hook(module, hook_args, hook_kwargs):
        count = rows(hook_kwargs)
        if count not in repeated:
            repeated[count] = batch.expand_rows(count)
        return hook_args, call_kwargs(repeated[count], hook_kwargs, family, device)

    modules = [unwrap_adapters(model)] + ([model.get_encoder()] if family.encoder_decoder else [])
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    head = unwrap_adapters(model).get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_pre_hook(_contiguous_input))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _contiguous_input(module: nn.Module, args: tuple):
    """The LM head's input as one block. ``generate`` hands it the last position of each row, a strided
    slice; for a frozen weight torch's ``matmul`` then runs one product per row against the whole weight
    (a batched product over the weight expanded, reading it once per row) where a weight that trains
    would fold the rows into one product. Copying ``[B, 1, hidden]`` is nothing beside that."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def checkpointing(model: nn.Module, kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False) -> None:
    """Gradient (activation) checkpointing of ``model``'s layers, always non-reentrant: the prefix is a keyword
    argument, not a layer input, and only non-reentrant checkpointing gives it its gradients on recompute."""
    kwargs = {**(kwargs or {}), "use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before activation checkpointing was renamed
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable(kwargs, every_n_layers=every_n_layers, offload=offload)


def check_applied(batch: PrefixBatch | None) -> None:
    """Refuse to return outputs computed without the prefix (PEFT's silent failure)."""
    if batch is None:
        return
    missing = sorted(batch.prefixed_layers - set(batch.routes))
    if missing:
        raise RuntimeError(
            f"the prefix never reached the attention of layers {missing}: the model's attention "
            "implementation was changed after wrapping, or this model does not call attention "
            "through transformers' AttentionInterface"
        )
