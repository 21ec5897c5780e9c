"""The key/value cache of a continuous batch: rows that join and leave between steps, each
with its own prefix (or none).

Every layer is one :class:`prefixtune.cache.PrefixLayer` holding, per row, first that
layer's prefix slots (as many as the longest prefix among the rows; a shorter or absent
prefix leaves slots that ``valid`` marks unused), then the row's tokens, left-padded to a
common length ``T``, with one ``[B, T]`` mask saying which token slots are real. A row's
prefix is thus copied into the cache once, when the row joins, and a decoding step only
writes its new key/values: :meth:`BatchCache.prefix_batch` tells the attention that the
prefixes are already in front of the keys (``PrefixBatch.in_cache``) and which slots are
real, so no step copies a prefix again.

A joining row is padded (its prefix slots on the right, its tokens on the left), or the
others are, and stacked under the rest; a leaving row is dropped, and the token columns that
are padding in every row and the prefix slots that no row uses any more are trimmed away, so
the cache never grows past what its live rows need.

A memory prefix (``PrefixConfig(kind="memory")``) puts nothing in the cache: its term needs only
the current query. The cache keeps, per site, every row's memory (zeros for rows without one),
joined and dropped with the rows, and hands it to each step with the key/value slots.

Positions are not derived from ``T``: each row counts its own real tokens and the batcher
passes them as ``position_ids`` (the model shifts them by the row's prefix where the prefix
asks for that), so a row sees exactly the positions it would have alone, whatever padding
its neighbours force on it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from ..cache import PrefixLayer
from ..prefixes import PrefixBatch


class BatchCache:
    """Per-layer prefix slots and keys/values of the rows being decoded, and their padding."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T], 1 = real token
        self.valid: list[torch.Tensor] = []  # per layer [B, slots], True = a real prefix slot
        self.shifts: list[int] = []  # per row, its position shift (PrefixBatch.offsets)
        self.memory: list[torch.Tensor | None] = []  # per site [B, kv_heads, d, d], or [] when no row has a memory
        self._step_prefix: PrefixBatch | None = None  # a step's prefix= but its key/values: where the prefixes are

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @staticmethod
    def open(batch: PrefixBatch | None, layers: int) -> tuple[DynamicCache, PrefixBatch | None]:
        """An empty cache for prefilling new rows, each layer starting with their prefix
        (``batch``), and the prefix argument that tells the prefill's attention so."""
        cache = DynamicCache()
        pairs = [None] * layers if batch is None else batch.key_values
        cache.layers = [PrefixLayer(*(pair or (None, None))) for pair in pairs]
        return cache, None if batch is None else dataclasses.replace(batch, in_cache=batch.kv_layers)

    def join(self, cache: DynamicCache, mask: torch.Tensor, batch: PrefixBatch | None) -> None:
        """Stack the rows just prefilled into ``cache`` (made by :meth:`open` from ``batch``;
        token padding ``mask``, ``[b, t]``) under ours."""
        valid = [_valid(batch, i, layer.prefix_length, mask) for i, layer in enumerate(cache.layers)]
        shifts = [0] * mask.shape[0] if batch is None else batch.offsets.tolist()
        memory = _stacked_memory(self.memory, self.rows, [] if batch is None else batch.memory, mask.shape[0])
        if self.cache is not None:
            width = max(self.length, mask.shape[1])
            for i, (mine, theirs) in enumerate(zip(self.cache.layers, cache.layers)):
                slots = max(mine.prefix_length, theirs.prefix_length)
                parts = [torch.cat([_pad_right(a, slots), _pad_right(b, slots)])
                         for a, b in zip(_prefix(mine), _prefix(theirs))]
                parts += [torch.cat([_pad_left(a, width), _pad_left(b, width)])
                          for a, b in zip(_tokens(mine), _tokens(theirs))]
                cache.layers[i] = _layer(*parts)
                valid[i] = torch.cat([_pad_right(self.valid[i], slots), _pad_right(valid[i], slots)])
            mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            shifts = self.shifts + shifts
        self.cache, self.mask, self.valid, self.shifts, self.memory = cache, mask, valid, shifts, memory
        self._rebuild_step_prefix()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); trim the token columns that are padding in every
        row and the prefix slots that no row uses."""
        if not rows:
            self.cache = self.mask = self._step_prefix = None
            self.valid, self.shifts, self.memory = [], [], []
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        valid = [v.index_select(0, index) for v in self.valid]
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        # a row's real slots come first (see _valid), so the slots still used are its longest count
        slots = torch.stack([v.sum(1).max() for v in valid]).tolist()
        for i, layer in enumerate(self.cache.layers):
            prefix = [t.index_select(0, index)[:, :, :slots[i]] for t in _prefix(layer)]
            tokens = [t.index_select(0, index)[:, :, start:] for t in _tokens(layer)]
            self.cache.layers[i] = _layer(*prefix, *tokens)
            valid[i] = valid[i][:, :slots[i]]
        self.mask, self.valid = mask[:, start:], valid
        self.shifts = [self.shifts[r] for r in rows]
        self.memory = _kept_memory(self.memory, index)
        self._rebuild_step_prefix()

    def step_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """The attention mask for a step adding ``new_tokens`` real tokens to every row."""
        ones = self.mask.new_ones(self.rows, new_tokens)
        return torch.cat([self.mask, ones], dim=1)

    def prefix_batch(self) -> PrefixBatch | None:
        """The ``prefix=`` of a decoding step: the prefixes are in the cache already; this says
        where (``None`` when no row has a prefix)."""
        if self._step_prefix is None:
            return None
        pairs = [_prefix(layer) if layer.prefix_length else None for layer in self.cache.layers]
        return dataclasses.replace(self._step_prefix, key_values=pairs, routes={})

    def _rebuild_step_prefix(self) -> None:
        """Rebuild the ``prefix=`` steps pass, after rows joined or left (one sync, not one per step)."""
        prefixed = [i for i, layer in enumerate(self.cache.layers) if layer.prefix_length]
        if not prefixed and not self.memory:
            self._step_prefix = None
            return
        full = torch.stack([self.valid[i].all() for i in prefixed]).tolist() if prefixed else []
        masked = {i for i, every in zip(prefixed, full) if not every}  # the others: every slot real, no mask work
        self._step_prefix = PrefixBatch(
            key_values=[], valid=[v if i in masked else None for i, v in enumerate(self.valid)],
            offsets=torch.tensor(self.shifts, device=self.mask.device),
            shift=self.shifts[0] if len(set(self.shifts)) == 1 else None,
            in_cache=frozenset(prefixed), memory=self.memory,
        )


def _stacked_memory(mine: list, mine_rows: int, theirs: list, their_rows: int) -> list:
    """Per site, the memories of our rows over those of the rows joining (``[1, ...]``: one memory for
    all of them), zeros for rows without one; ``[]`` when no row of either has a memory."""
    if not mine and not theirs:
        return []
    out = []
    for a, b in zip(mine or [None] * len(theirs), theirs or [None] * len(mine)):
        like = a if a is not None else b
        if like is None:
            out.append(None)
            continue
        a = like.new_zeros(mine_rows, *like.shape[1:]) if a is None else a
        b = like.new_zeros(their_rows, *like.shape[1:]) if b is None else b.expand(their_rows, *b.shape[1:])
        out.append(torch.cat([a, b]))
    return out


def _kept_memory(memory: list, index: torch.Tensor) -> list:
    """The memories of the rows ``index`` keeps; ``[]`` once none of them has one."""
    kept = [None if m is None else m.index_select(0, index) for m in memory]
    return kept if any(m is not None and bool(m.any()) for m in kept) else []


def _valid(batch: PrefixBatch | None, layer: int, slots: int, mask: torch.Tensor) -> torch.Tensor:
    """``[b, slots]``: which of a layer's prefix slots are real, per new row (real ones first)."""
    if batch is not None and slots and batch.valid[layer] is not None:
        return batch.valid[layer].to(mask.device)
    return torch.full((mask.shape[0], slots), bool(slots), dtype=torch.bool, device=mask.device)


def _prefix(layer: PrefixLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys[:, :, :layer.prefix_length], layer.values[:, :, :layer.prefix_length]


def _tokens(layer: PrefixLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys[:, :, layer.prefix_length:], layer.values[:, :, layer.prefix_length:]


def _layer(prefix_k, prefix_v, keys, values) -> PrefixLayer:
    layer = PrefixLayer(prefix_k, prefix_v)
    layer.update(keys, values)
    return layer


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad ``t``'s slots on the left up to ``width``: tokens (keys/values or a mask)."""
    return _pad(t, width, left=True)


def _pad_right(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero- (False-) pad ``t``'s slots on the right up to ``width``: prefix slots (keys/values or ``valid``)."""
    return _pad(t, width, left=False)


def _pad(t: torch.Tensor, width: int, left: bool) -> torch.Tensor:
    """Pad the slot dimension: -2 of keys/values ``[B, heads, slots, head_dim]``, -1 of a ``[B, slots]`` mask."""
    extra = width - t.shape[-1 if t.dim() == 2 else -2]
    side = (extra, 0) if left else (0, extra)
    return F.pad(t, side if t.dim() == 2 else (0, 0, *side))
