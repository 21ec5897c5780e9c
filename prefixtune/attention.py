"""The injection: prefix keys/values concatenated in front of each layer's own.

One function per base kernel (``sdpa``, ``eager``) is registered in transformers'
``AttentionInterface`` under the name ``prefixtune_<kernel>``. The wrapped model's
config points at it; it receives the prefix of the current call as the keyword argument
``prefixtune`` (a :class:`PrefixBatch`), which transformers carries from the top-level
``forward`` down to every attention call. Keyword arguments, unlike global state, are
seen again when gradient checkpointing recomputes a layer.

For each layer it computes ``K~ = [P_K; K]``, ``V~ = [P_V; V]`` and widens the mask by
the prefix columns (all visible, except padding slots of rows whose prefix is shorter or
absent), then calls the stock kernel. Without a ``prefixtune`` argument it is exactly
the stock kernel.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .arch import ATTENTION_IMPLEMENTATIONS

KWARG = "prefixtune"
LAYER_ATTR = "prefixtune_layer"  # a module's site index (row of the prefix's key/values)
CAUSAL_ATTR = "prefixtune_causal"  # whether the site is a causal (decoder self-) attention


@dataclass
class PrefixBatch:
    """The prefix of one forward call, already laid out per row.

    Args:
        key_values: Per model layer, ``(k, v)`` each ``[B, kv_heads, L, head_dim]``, or
            ``None`` where no row has a prefix in that layer.
        valid: Per model layer, ``[B, L]`` bool marking real prefix slots, or ``None``
            when every slot of every row is real (then no mask work is needed).
        offsets: ``[B]`` position shift of each row (its prefix length, or 0).
        shift: the one shift of every row when they share it, else ``None``: then the
            positions stay ``[1, T]``, as the base model makes them.
    """

    key_values: list[tuple[torch.Tensor, torch.Tensor] | None]
    valid: list[torch.Tensor | None]
    offsets: torch.Tensor
    shift: int | None = None
    used: set[int] = field(default_factory=set)
    in_cache: frozenset[int] = frozenset()
    """Layers whose keys/values arrive with the prefix already in front (``prefixtune.cache``)."""

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]

    def expand_rows(self, batch_size: int) -> "PrefixBatch":
        """Repeat each row ``batch_size // B`` times, as beam search and
        ``num_return_sequences`` do with ``repeat_interleave``."""
        if batch_size == self.batch_size:
            return self

        def rep(t):
            return None if t is None else repeat_rows(t, batch_size)

        return PrefixBatch(
            key_values=[None if kv is None else (rep(kv[0]), rep(kv[1])) for kv in self.key_values],
            valid=[rep(v) for v in self.valid],
            offsets=rep(self.offsets),
            shift=self.shift,
            used=self.used,
            in_cache=self.in_cache,
        )

    @property
    def prefixed_layers(self) -> frozenset[int]:
        """The layers that carry a prefix in this call."""
        return frozenset(i for i, kv in enumerate(self.key_values) if kv is not None)

    def cast(self, dtype: torch.dtype) -> "PrefixBatch":
        """The same prefix in ``dtype``: done once per ``generate`` call, so that a bf16/fp16 model
        does not convert the float32 prefix again in every layer at every decoding step."""
        return PrefixBatch(
            key_values=[None if kv is None else (kv[0].to(dtype), kv[1].to(dtype)) for kv in self.key_values],
            valid=self.valid, offsets=self.offsets, shift=self.shift, used=self.used, in_cache=self.in_cache,
        )


def repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with each row repeated to make ``rows`` rows, as beam search and
    ``num_return_sequences`` repeat the inputs (``repeat_interleave``)."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0]:
        raise ValueError(f"batch of {rows} rows cannot carry a prefix made for {t.shape[0]} rows")
    return t.repeat_interleave(rows // t.shape[0], dim=0)


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
        layer = getattr(module, LAYER_ATTR, None)
        if prefix is None or layer is None or prefix.key_values[layer] is None:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        prefix_k, prefix_v = prefix.key_values[layer]  # [B, kv_heads, L, head_dim]
        _check_shapes(layer, prefix_k, key)
        length = prefix_k.shape[2]
        in_cache = layer in prefix.in_cache  # generate: the cache already starts with the prefix
        own_key = key[:, :, length:] if in_cache else key
        causal = getattr(module, CAUSAL_ATTR, True)
        fused = None
        if kwargs.get("position_bias") is not None:  # T5's relative position bias: prefix columns get none
            kwargs["position_bias"] = torch.nn.functional.pad(kwargs["position_bias"], (length, 0))
        elif kwargs.get("softcap") is None:  # sdpa refuses soft-capping: the stock kernel says so
            fused = _fused_causal(base, attention_mask, prefix.valid[layer], query, own_key.shape[2] + length, causal)
        if not fused:
            attention_mask = extend_mask(attention_mask, prefix.valid[layer], length, query, own_key, causal)
        if not in_cache:  # to the layer's own device too: with a device_map the layers may sit on different devices
            key = torch.cat([prefix_k.to(key.device, key.dtype), key], dim=2)
            value = torch.cat([prefix_v.to(value.device, value.dtype), value], dim=2)
        prefix.used.add(layer)
        return _dispatch(fused, base, kernel, module, query, key, value, attention_mask, kwargs)

    prefix_attention.__name__ = f"prefixtune_{base}_attention"
    return prefix_attention


FUSED_CAUSAL = "auto"
"""How a causal prefixed call without padding and with several queries (training, prefill)
reaches SDPA. The real keys need a bottom-right-aligned causal mask, which SDPA's
``is_causal`` (top-left) cannot express, and an explicit mask keeps SDPA off flash
attention and makes transformers repeat the key/values for every query head (on an H200,
torch 2.11, both paths run cuDNN's fused kernel, and the mask path's training steps took
1.14-1.22x as long at 2048 tokens, with 0.7-1.5 GiB more memory: docs/performance-gpu.md).

* ``"pad"``: put ``S - T`` zero query rows in front, so that queries and keys have the
  same length, where top-left and bottom-right agree; SDPA then takes its mask-free
  ``is_causal`` path (flash or cuDNN attention, grouped-query attention without copies),
  called directly so that the extra rows' outputs are dropped before the output is laid out.
  Used when it at most doubles the queries.
* ``"bias"``: pass torch's ``causal_lower_right`` bias to the stock kernel (flash or
  memory-efficient attention, but the key/values are still repeated per query head).
  Measured on par with ``"pad"`` or up to 4 % slower (1B model, H200), so not the default.
* ``"bias_gqa"``: ``"bias"`` with torch's SDPA called directly with ``enable_gqa``, so that
  the key/values are not repeated per query head either (no padded rows, no copies but the
  concatenation). Not measured on a GPU yet (``benchmarks/gpu.py``'s ``prefixtune_bias_gqa``
  arm), so not the default; on the CPU torch materializes the bias as a mask.
* ``"mask"``: always build the explicit boolean mask (:func:`extend_mask`).
* ``"auto"`` (the default): ``"pad"`` where :func:`pad_pays` says the padded rows cost less
  than the alternative; else ``"bias_gqa"`` on the CPU (torch's CPU kernels take a mask with
  grouped heads: forward + backward of the kernel alone 0.80-0.95x of ``"mask"``'s at 64-512
  tokens, ``benchmarks/attention_kernel.py``, docs/performance.md) and ``"mask"`` elsewhere.
  On the CPU, calls that need a mask anyway (padding, mixed prefixes) likewise hand it to
  torch's SDPA with grouped heads (:func:`_grouped_mask_pays`; with ``"auto"`` and ``"bias_gqa"``,
  so that forcing ``"mask"`` or ``"pad"`` keeps transformers' stock path for them).

Only the ``sdpa`` base kernel is affected. ``benchmarks/gpu.py`` measures the GPU paths,
``benchmarks/attention_kernel.py`` the kernel alone on any device.
"""

CPU_PAD_FREE_ROWS = 384
"""On the CPU, ``pad`` pays only where ``2 * L_p <= T - CPU_PAD_FREE_ROWS``. torch's CPU flash
kernel skips the key blocks above the diagonal under ``is_causal`` but not under a mask, and
that saving outweighs ``L_p`` extra query rows only on long rows. Forward + backward of one
layer's attention, pad / bias_gqa (the alternative, a mask with grouped heads; batch 8, 9/3
heads, float32, 2 threads, ``benchmarks/attention_kernel.py``, docs/performance.md): ``T`` = 64-256:
1.03-3.3x (``L_p`` 10-200); 384: 1.09x at ``L_p = 10``, 1.20-1.68x at 50-500; 512: 0.97x at 10,
0.96x at 50, 1.14x at 200; 1024: 0.72-0.78x at 10-200, 0.97x at 500. The rule is off by 3 % at
(1024, 500). (Against the plain mask, the alternative until 2026-11-28, the same rule held with 256.)"""


def pad_pays(device_type: str, q_len: int, prefix_len: int) -> bool:
    """Whether ``"auto"`` pads the queries: wherever ``pad`` fits on CUDA (measured faster than
    the mask at ``L_p = 10``, 128-2048 tokens, H200; longer prefixes not measured there), on the
    CPU only on rows long enough for the causal block skipping to pay (above)."""
    if not _pad_fits(q_len, prefix_len):
        return False
    return device_type != "cpu" or 2 * prefix_len <= q_len - CPU_PAD_FREE_ROWS


def _pad_fits(q_len: int, prefix_len: int) -> bool:
    """``pad`` is used only where it at most doubles the queries."""
    return prefix_len <= q_len


def _fused_causal(base: str, mask, valid, query: torch.Tensor, kv_len: int, causal: bool) -> str | None:
    """``FUSED_CAUSAL`` where it applies to this call, else ``None`` (build the mask)."""
    q_len = query.shape[2]
    if base != "sdpa" or FUSED_CAUSAL == "mask" or mask is not None or valid is not None or not causal or q_len < 2:
        return None
    if FUSED_CAUSAL in ("bias", "bias_gqa"):
        return FUSED_CAUSAL
    prefix_len = kv_len - q_len
    if FUSED_CAUSAL != "auto":
        return "pad" if _pad_fits(q_len, prefix_len) else None
    if pad_pays(query.device.type, q_len, prefix_len):
        return "pad"
    return "bias_gqa" if query.device.type == "cpu" else None


def _padded_query_causal(query, key, value, **kwargs):
    """Causal attention of the last ``T`` of ``S`` key positions through the mask-free
    ``is_causal`` path: ``S - T`` zero query rows in front, their outputs dropped before the
    output is laid out (transformers' kernel would copy all ``S`` rows, and the model copy the
    ``T`` kept ones again: two copies forward and two backward per layer, now one and one)."""
    extra = key.shape[2] - query.shape[2]
    pad = query.new_zeros(query.shape[0], query.shape[1], extra, query.shape[3])
    # zeros + cat, not F.pad: cat's backward is a view, F.pad's a copy
    return _grouped_sdpa(torch.cat([pad, query], dim=2), key, value, None, **{**kwargs, "is_causal": True}, skip=extra)


def _dispatch(fused, base, kernel, module, query, key, value, mask, kwargs):
    """The call of the kernel that ``fused`` (or, for a masked call, :func:`_grouped_mask_pays`) chose."""
    if fused == "pad":
        return _padded_query_causal(query, key, value, **kwargs)
    if fused in ("bias", "bias_gqa"):
        mask = causal_lower_right(query.shape[2], key.shape[2])
        query, key, value = _autocast(query, key, value)  # a bias object skips autocast's casts in SDPA
    if fused == "bias_gqa" or (not fused and _grouped_mask_pays(base, query, key, mask, kwargs)):
        return _grouped_sdpa(query, key, value, mask, **kwargs)
    return kernel(module, query, key, value, mask, **kwargs)


def _grouped_mask_pays(base: str, query, key, mask, kwargs) -> bool:
    """Whether a masked call (padding, mixed prefixes, or short causal rows) skips transformers'
    per-head copies of the key/values: on the CPU, whose SDPA kernels take a mask together with
    grouped heads (measured faster than the copies: docs/performance.md); not on CUDA, where
    that combination falls back to the math kernel (transformers' ``use_gqa_in_sdpa``)."""
    return (base == "sdpa" and FUSED_CAUSAL in ("auto", "bias_gqa") and query.device.type == "cpu"
            and mask is not None and query.shape[2] > 1 and query.shape[1] != key.shape[1]
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)


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


def _check_shapes(layer: int, prefix_k: torch.Tensor, key: torch.Tensor) -> None:
    if prefix_k.shape[0] != key.shape[0] or prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
        raise ValueError(
            f"layer {layer}: prefix keys {tuple(prefix_k.shape)} do not fit the model's keys "
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
