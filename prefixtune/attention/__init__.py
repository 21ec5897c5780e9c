"""The attention call with a prefix: ``K~ = [P_K; K]``, ``V~ = [P_V; V]``, and how it reaches a kernel;
and, for a memory prefix, the term ``φ(q)ᵀ M`` added to each head's output (:mod:`prefixtune.memory`).

One function per base kernel (``sdpa``, ``eager``) is registered in transformers'
``AttentionInterface`` under the name ``prefixtune_<kernel>`` (:func:`implementation_name`).
It receives the prefix of the current call as the keyword argument ``prefixtune`` (a
:class:`~prefixtune.prefixes.PrefixBatch`), which transformers carries from the top-level
``forward`` down to every attention call; keyword arguments, unlike global state, are seen
again when gradient checkpointing recomputes a layer. Without that argument it is exactly the
stock kernel.

For a prefixed site it concatenates the prefix in front of the keys and values and widens the
mask by the prefix columns (visible to every query, except padding slots of rows whose prefix
is shorter or absent). Which kernel then runs is the :class:`AttentionPolicy`'s choice, one
of three routes:

* ``pad``: a causal call without padding. The real keys need a bottom-right-aligned causal
  mask, which SDPA's ``is_causal`` (top-left) cannot express; putting ``L_p`` zero query rows
  in front makes queries and keys equally long, where the two agree, and SDPA takes its
  mask-free path (flash or cuDNN attention, grouped key/value heads read as they are).
* ``grouped``: torch's SDPA called directly with ``enable_gqa`` and a mask (the widened one,
  or torch's ``causal_lower_right`` bias), so that the key/values are not copied for every
  query head as transformers' kernel does whenever it is given a mask.
* ``stock``: the model's own kernel with the widened mask: the reference, and the route of
  decoding steps (one query), the eager kernel, T5's position bias and Gemma 2's soft-capping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..arch import ATTENTION_IMPLEMENTATIONS
from ..prefixes import PrefixBatch
from .kernels import autocast, grouped_sdpa, padded_query_causal, stock_kernel
from .masks import extend_mask
from ..memory import add_memory_term
from .policy import DEFAULT_POLICY, GROUPED, PAD, STOCK, AttentionPolicy

__all__ = ["KWARG", "SITE_ATTR", "AttentionPolicy", "Site", "extend_mask", "implementation_name"]

KWARG = "prefixtune"
"""The keyword argument that carries a call's :class:`PrefixBatch` down to every attention."""
SITE_ATTR = "prefixtune_site"
"""The attribute of a tagged attention module that holds its :class:`Site`."""


@dataclass(frozen=True)
class Site:
    """What a tagged attention module is: its row in a prefix's key/values, and whether it is causal."""

    index: int
    causal: bool


def implementation_name(base: str) -> str:
    """Register (once) and return the prefix-aware wrapper of kernel ``base``."""
    if base not in ATTENTION_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"attention implementation {base!r} cannot carry a prefix yet; load the model with "
            f"attn_implementation in {ATTENTION_IMPLEMENTATIONS}"
        )
    name = f"prefixtune_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _make_attention(base: str):
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        prefix: PrefixBatch | None = kwargs.pop(KWARG, None)
        site: Site | None = getattr(module, SITE_ATTR, None)
        if prefix is None or site is None:
            return stock_kernel(base, module)(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        output, weights = _with_key_values(base, module, prefix, site, query, key, value, attention_mask, kwargs)
        memory = prefix.memory_at(site.index)
        if memory is None:
            return output, weights
        prefix.routes.setdefault(site.index, STOCK)
        return add_memory_term(output, query, memory, scaling, prefix.features), weights  # o + φ(q)ᵀ M

    prefix_attention.__name__ = f"prefixtune_{base}_attention"
    return prefix_attention


def _with_key_values(base: str, module, prefix: PrefixBatch, site: Site, query, key, value, attention_mask, kwargs):
    """The attention of one site with the call's key/value prefix in front of its own keys and values
    (the stock kernel where this site has none), through the route the policy picks."""
    kernel = stock_kernel(base, module)
    if prefix.key_values[site.index] is None:
        return kernel(module, query, key, value, attention_mask, **kwargs)
    prefix_k, prefix_v = prefix.key_values[site.index]  # [B, kv_heads, L, head_dim]
    _check_shapes(site.index, prefix_k, key)
    length, valid = prefix_k.shape[2], prefix.valid[site.index]
    in_cache = site.index in prefix.in_cache  # generate: the cache already starts with the prefix
    own_key = key[:, :, length:] if in_cache else key
    if kwargs.get("position_bias") is not None:  # T5's relative position bias: prefix columns get none
        kwargs["position_bias"] = torch.nn.functional.pad(kwargs["position_bias"], (length, 0))
    policy = prefix.policy or DEFAULT_POLICY
    extra = own_key.shape[2] + length - query.shape[2]
    route = policy.route(base, query.device.type, query.shape[2], extra, causal=site.causal,
                         masked=attention_mask is not None or valid is not None,
                         grouped_heads=query.shape[1] != key.shape[1],
                         plain=kwargs.get("position_bias") is None and kwargs.get("softcap") is None)
    if not in_cache:  # to the layer's own device too: with a device_map the layers may sit on different devices
        key = torch.cat([prefix_k.to(key.device, key.dtype), key], dim=2)
        value = torch.cat([prefix_v.to(value.device, value.dtype), value], dim=2)
    prefix.routes[site.index] = route
    if route == PAD:
        return padded_query_causal(query, key, value, **kwargs)
    if route == GROUPED and attention_mask is None and valid is None:
        query, key, value = autocast(query, key, value)  # a bias object skips autocast's casts in SDPA
        return grouped_sdpa(query, key, value, causal_lower_right(query.shape[2], key.shape[2]), **kwargs)
    attention_mask = extend_mask(attention_mask, valid, length, query, own_key, site.causal)
    if route == GROUPED:
        return grouped_sdpa(query, key, value, attention_mask, **kwargs)
    return kernel(module, query, key, value, attention_mask, **kwargs)


def _check_shapes(site: int, prefix_k: torch.Tensor, key: torch.Tensor) -> None:
    if prefix_k.shape[0] != key.shape[0] or prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
        raise ValueError(
            f"layer {site}: prefix keys {tuple(prefix_k.shape)} do not fit the model's keys "
            f"{tuple(key.shape)} ([batch, kv_heads, length, head_dim])"
        )
