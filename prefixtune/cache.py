"""A prefix and a key/value cache are the same kind of thing; this module turns one into the other.

* :func:`tokens_key_values`: the frozen model's own cache of a text is the prefix that makes
  it act as if it had read that text (the parity test, and the paper's "real words" init).
* :class:`PrefixLayer` and :func:`prefix_cache`: the prefix as the first entries of
  ``generate``'s key/value cache.

Without the second, every decoding step would concatenate the prefix in front of each layer's
cached keys and values: a copy of the whole cache per layer and token, on top of the one
transformers' ``DynamicLayer`` already makes when it appends the new token with
``torch.cat``. Here each prefixed layer's cache is a :class:`PrefixLayer`: one buffer that
starts with the prefix and has room to grow (:data:`HEADROOM`), so a step writes just its
new key/values and hands the attention a view ``[prefix; cache]``. The attention
(``prefixtune.attention``, told by ``PrefixBatch.in_cache``) then adds no copy of its own.

The layer reports only the real tokens as its length (``get_seq_length``), so positions,
``cache_position`` and the masks transformers builds are exactly what they are without a
prefix; the attention widens the mask by the prefix columns as it always does.

Used by ``PrefixModel.generate`` where it is safe (:func:`prefix_cache`) and by the server's
batch cache (``prefixtune.serve.kvcache``); everywhere else the prefix is concatenated per call,
as in training.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .prefixes import repeat_rows

MIN_CAPACITY = 64
HEADROOM = 4
"""A full buffer grows by a quarter of its size (at least :data:`MIN_CAPACITY` slots), so it
never holds more than 25 % (or 64 slots) of unused room: a server's key/value cache is most of
its memory. Each growth copies the buffer once, i.e. about ``4 / T`` of a cache copy per step
on average at ``T`` cached tokens, against the full copy per step of ``DynamicLayer``'s
``torch.cat``."""


@torch.no_grad()
def tokens_key_values(model, input_ids: torch.Tensor, num_sites: int, decoder_only: bool = True) -> tuple:
    """Per site, the frozen decoder-only ``model``'s own ``(k, v)`` for ``input_ids`` (``[L]``), each
    ``[kv_heads, L, head_dim]``, read from its cache in eval mode."""
    if not decoder_only:
        raise NotImplementedError("key/values from tokens (init='text') need a decoder-only model: in an "
                                  "encoder the activations of a text depend on the text that follows it")
    was_training = model.training
    out = model.eval()(input_ids=input_ids.view(1, -1), use_cache=True)
    model.train(was_training)
    return tuple((layer.keys[0], layer.values[0]) for layer in out.cache.layers[:num_sites])


def text_tokens(tokenizer, text: str, length: int) -> torch.Tensor:
    """``text``'s tokens repeated or cut to exactly ``length`` (``PrefixConfig.init_text``)."""
    if tokenizer is None:
        raise ValueError("init='text' needs a tokenizer: PrefixModel.wrap(model, config, tokenizer=tokenizer)")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ValueError(f"init_text {text!r} has no tokens")
    return ids.repeat(-(-length // ids.numel()))[:length]


class PrefixLayer(DynamicLayer):
    """A ``DynamicLayer`` whose first ``prefix_length`` slots hold the prefix (``[B, kv_heads, L, head_dim]``).

    Also the layer of ``prefixtune.serve``'s batch cache, where each row brings its own prefix
    (or none) and rows join and leave between steps.
    """

    def __init__(self, key: torch.Tensor | None, value: torch.Tensor | None):
        super().__init__()
        self.prefix = None if key is None else (key, value)  # None: no prefix, just the growing buffer
        self.prefix_length = 0 if key is None else key.shape[2]
        self._used = 0  # filled slots of the buffers, prefix included

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers with the prefix in front, for as many rows as the first call brings (beam
        search and ``num_return_sequences`` repeat each row, as ``PrefixBatch.expand_rows`` does)."""
        rows = key_states.shape[0]
        if self.prefix is None:
            self.prefix = (key_states[:, :, :0], value_states[:, :, :0])
        key, value = (repeat_rows(t, rows).to(key_states.device, key_states.dtype) for t in self.prefix)
        self.device = key_states.device
        self._keys, self._values = _buffer(key, self.prefix_length), _buffer(value, self.prefix_length)
        self._used = self.prefix_length
        self.is_initialized = True
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._used + key_states.shape[2]
        if end > self._keys.shape[2]:
            self._keys, self._values = _grown(self._keys, self._used, end), _grown(self._values, self._used, end)
        self._keys[:, :, self._used:end] = key_states
        self._values[:, :, self._used:end] = value_states
        self._used = end
        self._expose()
        return self.keys, self.values

    @property
    def capacity(self) -> int:
        """Slots the buffers hold before they grow (prefix included)."""
        return self._keys.shape[2] if self.is_initialized else 0

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, :self._used], self._values[:, :, :self._used]

    def get_seq_length(self) -> int:
        """The real tokens cached (not the prefix): what positions and masks count."""
        return self._used - self.prefix_length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized:
            self._used = max(self.prefix_length, self._used + tokens_to_remove)
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def _select(self, rows) -> None:
        if self.is_initialized:
            self._keys, self._values = rows(self._keys), rows(self._values)
            self._expose()
        elif self.prefix is not None:
            self.prefix = tuple(rows(t) for t in self.prefix)

    def reset(self) -> None:
        super().reset()
        self._used = 0


def prefix_cache(model, batch, kwargs: dict) -> DynamicCache | None:
    """A cache for ``model.generate(**kwargs)`` holding ``batch``'s prefix, or ``None`` where the
    caller brings its own cache or asks for another kind (static, offloaded, quantized, none),
    or where a prefixed layer is not a plain ``DynamicLayer`` (sliding-window layers drop old
    entries, which would drop the prefix)."""
    config = kwargs.get("generation_config") or model.generation_config
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "cache_implementation")):
        return None
    if kwargs.get("use_cache", config.use_cache) is False or config.cache_implementation is not None:
        return None
    prefixed = batch.kv_layers  # a memory prefix puts nothing in the cache
    if not prefixed:
        return None
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if len(cache.layers) != len(batch.key_values) or any(type(cache.layers[i]) is not DynamicLayer for i in prefixed):
        return None
    for i in prefixed:
        cache.layers[i] = PrefixLayer(*batch.key_values[i])
    return cache


def _buffer(prefix: torch.Tensor, length: int) -> torch.Tensor:
    out = prefix.new_empty(*prefix.shape[:2], length + MIN_CAPACITY, prefix.shape[3])
    out[:, :, :length] = prefix
    return out


def _grown(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    capacity = buffer.shape[2]
    out = buffer.new_empty(*buffer.shape[:2], max(needed, capacity + max(MIN_CAPACITY, capacity // HEADROOM)),
                           buffer.shape[3])
    out[:, :, :used] = buffer[:, :, :used]
    return out
