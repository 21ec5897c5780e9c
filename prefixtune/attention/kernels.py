"""The kernels a prefixed attention call can run besides the model's own: torch's SDPA over grouped
key/value heads as they are, and the padded-query causal call (:mod:`prefixtune.attention` says when).
Each returns what transformers' ``sdpa`` kernel returns: ``[B, T, heads, head_dim]`` and no weights."""

from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

def padded_query_causal(query, key, value, **kwargs):
    """Causal attention of the last ``T`` of ``S`` key positions through the mask-free
    ``is_causal`` path: ``S - T`` zero query rows in front, their outputs dropped before the
    output is laid out (transformers' kernel would lay out all ``S`` rows and the model copy
    the ``T`` kept ones again)."""
    extra = key.shape[2] - query.shape[2]
    pad = query.new_zeros(query.shape[0], query.shape[1], extra, query.shape[3])
    # zeros + cat, not F.pad: cat's backward is a view, F.pad's a copy
    return grouped_sdpa(torch.cat([pad, query], dim=2), key, value, None, **{**kwargs, "is_causal": True}, skip=extra)


def grouped_sdpa(query, key, value, mask, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool = False, skip: int = 0, **_):
    """Attention over grouped key/value heads as they are (``enable_gqa``), with ``mask`` (a tensor
    or torch's ``causal_lower_right`` bias) or ``is_causal``, returned as transformers' ``sdpa``
    kernel returns it (``[B, T, heads, head_dim]``, no weights), without the first ``skip`` query
    rows. Transformers' kernel cannot be used for this: given any mask, it repeats the key/values
    for every query head (its ``use_gqa_in_sdpa``), and it lays out every row."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1])
    # rows dropped in [B, T, heads, head_dim] order, the kernels' own output layout: the gradient
    # of the dropped rows is then allocated in that layout too, which the kernels' backward reads
    return out.transpose(1, 2)[:, skip:].contiguous(), None


def autocast(*tensors):
    """``tensors`` in autocast's dtype where autocast is on: what SDPA does to its inputs itself,
    except when the mask is a bias object (its ``__torch_function__`` runs before autocast)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


_EAGER: dict[type, object] = {}


def stock_kernel(base: str, module):
    """The stock kernel: ``sdpa`` from the registry, ``eager`` from the model's own module
    (each family has its own, e.g. Gemma 2 soft-caps its scores there)."""
    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    kind = type(module)
    if kind not in _EAGER:
        fn = getattr(sys.modules[kind.__module__], "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(f"{kind.__module__} has no eager_attention_forward to wrap")
        _EAGER[kind] = fn
    return _EAGER[kind]
