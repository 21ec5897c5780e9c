"""Loss spikes: a training step whose loss jumps far above the losses just before it.

A spike is the sign of a learning rate at or past a method's edge of stability (the MLP
prefix at 3e-3 without clipping, docs/studies/e2e.md): the run may recover, but its result then
says more about the blow-up than about the method. The check is:

- a step is checked once warmup is over (its number, counted from 1, is above
  ``warmup_steps``: during warmup the rate is still rising and early losses fall fast) and
  when at least :data:`MIN_HISTORY` losses came before it;
- its *ratio* is its loss over the median of the :data:`WINDOW` losses just before it (all of
  them when fewer have run); the median, not the mean, so that one earlier spike does not
  raise the bar for the next;
- a step whose ratio exceeds :data:`THRESHOLD` (2) is a spike.

``prefixtune compare`` records each run's largest ratio; ``prefixtune train`` warns at each spike.
"""

from __future__ import annotations

import statistics
from collections import deque

WINDOW = 20
"""How many of the losses just before a step make its running median."""
MIN_HISTORY = 5
"""Losses needed before a step is checked: the median of fewer says little."""
THRESHOLD = 2.0
"""A step whose loss exceeds this multiple of the running median is a spike."""


class SpikeWatch:
    """The check, one step at a time: feed each step's loss to :meth:`add`."""

    def __init__(self, warmup_steps: int, window: int = WINDOW):
        self.warmup_steps = warmup_steps
        self.recent: deque[float] = deque(maxlen=window)

    def add(self, step: int, loss: float) -> float | None:
        """The ratio of step ``step`` (counted from 1), or ``None`` where the step is not checked."""
        ratio = None
        if step > self.warmup_steps and len(self.recent) >= MIN_HISTORY:
            median = statistics.median(self.recent)
            ratio = loss / median if median > 0 else None
        self.recent.append(loss)
        return ratio


def ratios(losses: list[float], warmup_steps: int) -> list[float | None]:
    """Each step's ratio (``None`` where it is not checked) of a run's losses, step 1 first."""
    watch = SpikeWatch(warmup_steps)
    return [watch.add(step, loss) for step, loss in enumerate(losses, start=1)]


def largest_ratio(losses: list[float], warmup_steps: int) -> float | None:
    """The largest ratio over the checked steps; ``None`` when no step is checked (a short run)."""
    checked = [r for r in ratios(losses, warmup_steps) if r is not None]
    return max(checked, default=None)


def has_spike(losses: list[float], warmup_steps: int) -> bool:
    """Whether some checked step's loss exceeds :data:`THRESHOLD` times its running median."""
    ratio = largest_ratio(losses, warmup_steps)
    return ratio is not None and ratio > THRESHOLD
