"""The key/value cache of a continuous batch: rows that join and leave between steps.

Rows are left-padded to a common length ``T``: every layer keeps keys and values
``[B, kv_heads, T, head_dim]`` and one ``[B, T]`` mask says which slots hold real
tokens. A joining row is padded on the left (or the others are) and stacked under the
rest; a leaving row is dropped and the columns that are now padding in every row are
trimmed away, so the cache never grows past the longest live row. Prefix key/values are
not in here: the attention kernel puts each row's prefix in front at every step.

Positions are not derived from ``T``: each row counts its own real tokens and the
batcher passes them as ``position_ids``, so a row sees exactly the positions it would
have alone, whatever padding its neighbours force on it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import DynamicCache


class BatchCache:
    """Per-layer keys/values and the padding mask of the rows being decoded."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T], 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _layers(self):
        return self.cache.layers if self.cache is not None else []

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack the rows of ``cache`` (with padding mask ``mask``, ``[b, t]``) under ours."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.length, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns that are padding everywhere."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def step_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """The attention mask for a step adding ``new_tokens`` real tokens to every row."""
        ones = self.mask.new_ones(self.rows, new_tokens)
        return torch.cat([self.mask, ones], dim=1)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dimension -2 (keys/values) or -1 (a mask) of ``t`` on the left up to ``width``."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))
    return F.pad(t, (0, 0, width - t.shape[2], 0))
