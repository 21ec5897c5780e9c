"""Token rows -> padded tensors, in an order that a resumed run sees again exactly."""

from __future__ import annotations

import math
import random

import torch

from .tokens import IGNORE


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors; padding gets attention 0 and label -100.

    Rows of :func:`~prefixtune.data.tokenize_classes` carry one class id each; their ``labels`` is ``[B]``.

    Args:
        rows: From :func:`~prefixtune.data.tokenize` or :func:`~prefixtune.data.tokenize_classes`.
        pad_id: The id to pad ``input_ids`` with (never seen by the loss or attention).
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        if not isinstance(row["labels"], int):
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    if isinstance(rows[0]["labels"], int):
        labels = torch.tensor([row["labels"] for row in rows], dtype=torch.long)  # [B]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(rows: list[dict], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[dict]]:
    """Split rows into batches, shuffled the same way for the same ``(seed, epoch)``.

    A private ``random.Random`` (not the global one) makes a resumed run see exactly the
    batches it would have seen, whatever else consumed randomness meanwhile.

    Args:
        rows: From :func:`~prefixtune.data.tokenize`.
        batch_size: Rows per batch; the last batch may be smaller (it is kept).
        seed: The run's seed.
        epoch: The epoch number; each epoch gets its own order.
        shuffle: ``False`` keeps the rows' order (for evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [[rows[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


class BatchOrder:
    """The rows of each optimizer step: epoch after epoch of :func:`batches`, one epoch's order
    built when the step first reaches it, so that step ``n`` gets the same rows however the run
    got there (from the start, or resumed)."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = math.ceil(len(rows) / batch_size)
        self._epoch: tuple[int, list] = (-1, [])

    def __getitem__(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, batches(self.rows, self.batch_size, seed=self.seed, epoch=epoch))
        return self._epoch[1][index]
