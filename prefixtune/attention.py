"""The attention call with a prefix: ``K~ = [P_K; K]``, ``V~ = [P_V; V]``, and how it reaches a kernel.

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

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .arch import ATTENTION_IMPLEMENTATIONS
from .prefixes import PrefixBatch

KWARG = "prefixtune"
"""The keyword argument that carries a call's :class:`PrefixBatch` down to every attention."""
SITE_ATTR = "prefixtune_site"
"""The attribute of a tagged attention module that holds its :class:`Site`."""

PAD, GROUPED, STOCK = "pad", "grouped", "stock"

PAD_FREE_ROWS: Mapping[str, int] = MappingProxyType({"cpu": 384})
"""Per device type, how many query rows beyond twice the prefix length a call needs before
``pad`` pays; on devices not listed ``pad`` is used wherever it at most doubles the queries.
torch's CPU flash kernel skips the key blocks above the diagonal under ``is_causal`` but not
under a mask, and that saving outweighs ``L_p`` extra query rows only on long rows (forward +
backward of one layer: ``benchmarks/results/attention-kernel.json``). On CUDA, ``pad`` was
measured faster than the masked kernel or on par with it at every length (``benchmarks/results/gpu.json``)."""

GROUPED_DEVICES = frozenset({"cpu"})
"""Device types whose SDPA kernels take a mask together with grouped key/value heads. On CUDA
that combination falls back to the math kernel (transformers' ``use_gqa_in_sdpa`` says so), so
masked calls there keep the stock kernel."""


@dataclass(frozen=True)
class Site:
    """What a tagged attention module is: its row in a prefix's key/values, and whether it is causal."""

    index: int
    causal: bool


@dataclass(frozen=True)
class AttentionPolicy:
    """How a prefixed attention call reaches a kernel; held by each ``PrefixModel``.

    Args:
        mode: ``"auto"`` (the default): the measured route for each call (:meth:`route`);
            ``"mask"``: always the model's own kernel with the widened mask, the reference.
        pad_free_rows: The ``pad`` thresholds per device type (:data:`PAD_FREE_ROWS`);
            ``None`` for a device pads wherever it fits.
    """

    mode: str = "auto"
    pad_free_rows: Mapping[str, int | None] = field(default_factory=lambda: dict(PAD_FREE_ROWS))

    MODES = ("auto", "mask")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"attention={self.mode!r}: choose one of {', '.join(self.MODES)}")

    @classmethod
    def of(cls, value: "str | AttentionPolicy") -> "AttentionPolicy":
        """A policy from its mode's name, or the policy itself."""
        return value if isinstance(value, AttentionPolicy) else cls(mode=value)

    def route(self, base: str, device_type: str, q_len: int, extra: int, *, causal: bool, masked: bool,
              grouped_heads: bool, plain: bool) -> str:
        """The route of one call: ``pad``, ``grouped`` or ``stock``.

        Args:
            base: The wrapped kernel (``sdpa`` or ``eager``).
            device_type: Where the call runs (``cpu``, ``cuda``...).
            q_len: Query rows of the call; ``extra``: key columns before the first query's own (the
                prefix, and tokens cached before this call).
            causal: A decoder self-attention; ``masked``: it has padding or per-row prefix slots.
            grouped_heads: Fewer key/value heads than query heads.
            plain: No position bias (T5) and no soft-capping (Gemma 2), which only the stock kernel applies.
        """
        if self.mode == "mask" or base != "sdpa" or not plain or q_len < 2:
            return STOCK
        if causal and not masked:
            if self.pads(device_type, q_len, extra):
                return PAD
            return GROUPED if device_type in GROUPED_DEVICES else STOCK
        return GROUPED if masked and grouped_heads and device_type in GROUPED_DEVICES else STOCK

    def pads(self, device_type: str, q_len: int, extra: int) -> bool:
        """Whether an unpadded causal call takes ``pad``: its ``extra`` zero query rows at most
        double the queries, and the device's :data:`PAD_FREE_ROWS` threshold is met."""
        if extra > q_len:
            return False
        free = self.pad_free_rows.get(device_type)
        return free is None or 2 * extra <= q_len - free


DEFAULT_POLICY = AttentionPolicy()


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
        kernel = _kernel(base, module)
        site: Site | None = getattr(module, SITE_ATTR, None)
        if prefix is None or site is None or prefix.key_values[site.index] is None:
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
            return _padded_query_causal(query, key, value, **kwargs)
        if route == GROUPED and attention_mask is None and valid is None:
            query, key, value = _autocast(query, key, value)  # a bias object skips autocast's casts in SDPA
            return _grouped_sdpa(query, key, value, causal_lower_right(query.shape[2], key.shape[2]), **kwargs)
        attention_mask = extend_mask(attention_mask, valid, length, query, own_key, site.causal)
        if route == GROUPED:
            return _grouped_sdpa(query, key, value, attention_mask, **kwargs)
        return kernel(module, query, key, value, attention_mask, **kwargs)

    prefix_attention.__name__ = f"prefixtune_{base}_attention"
    return prefix_attention


def _padded_query_causal(query, key, value, **kwargs):
    """Causal attention of the last ``T`` of ``S`` key positions through the mask-free
    ``is_causal`` path: ``S - T`` zero query rows in front, their outputs dropped before the
    output is laid out (transformers' kernel would lay out all ``S`` rows and the model copy
    the ``T`` kept ones again)."""
    extra = key.shape[2] - query.shape[2]
    pad = query.new_zeros(query.shape[0], query.shape[1], extra, query.shape[3])
    # zeros + cat, not F.pad: cat's backward is a view, F.pad's a copy
    return _grouped_sdpa(torch.cat([pad, query], dim=2), key, value, None, **{**kwargs, "is_causal": True}, skip=extra)


def _grouped_sdpa(query, key, value, mask, dropout: float = 0.0, scaling: float | None = None,
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


def _autocast(*tensors):
    """``tensors`` in autocast's dtype where autocast is on: what SDPA does to its inputs itself,
    except when the mask is a bias object (its ``__torch_function__`` runs before autocast)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


_EAGER: dict[type, object] = {}


def _kernel(base: str, module):
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


def _check_shapes(site: int, prefix_k: torch.Tensor, key: torch.Tensor) -> None:
    if prefix_k.shape[0] != key.shape[0] or prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
        raise ValueError(
            f"layer {site}: prefix keys {tuple(prefix_k.shape)} do not fit the model's keys "
            f"{tuple(key.shape)} ([batch, kv_heads, length, head_dim])"
        )


def extend_mask(mask, valid, prefix_len: int, query: torch.Tensor, key: torch.Tensor, causal: bool):
    """The attention mask widened by ``prefix_len`` columns in front.

    ``mask`` is what the model built for its own keys: ``None`` (no padding; the kernel
    would rely on ``is_causal``), a bool ``[B|1, 1, T, S]`` (True = attend) or an additive
    float one. Prefix columns are visible to every query except where ``valid`` says a
    row has no prefix slot there. With a prefix, ``is_causal`` would align the diagonal
    top-left, so a causal mask over the real keys is built explicitly (bottom-right:
    queries are the last ``T`` of the ``S`` real keys).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if valid is None and (q_len == 1 or not causal):
            return None
        if causal and q_len > 1:
            mask = _causal(q_len, kv_len, key.device)
        else:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=key.device)
    if valid is None:
        cols = torch.ones(1, 1, 1, prefix_len, dtype=torch.bool, device=mask.device)
    else:
        cols = valid[:, None, None, :].to(mask.device)  # [B, 1, 1, L]
    if mask.dtype != torch.bool:
        zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
        cols = torch.where(cols, zero, torch.finfo(mask.dtype).min)
    rows = max(mask.shape[0], cols.shape[0])
    cols = cols.expand(rows, mask.shape[1], mask.shape[2], prefix_len)
    return torch.cat([cols, mask.expand(rows, -1, -1, -1)], dim=-1)


def _causal(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool ``[1, 1, T, S]``: query ``i`` sees keys ``j <= i + S - T`` (bottom-right aligned)."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
