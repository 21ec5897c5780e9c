"""The attention mask widened by the prefix columns (the ``stock`` and masked ``grouped`` routes)."""

from __future__ import annotations

import torch


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
