"""Progress of every long phase (training, evaluation, generation, metrics, model conversion, compare),
through one library: a live tqdm bar in a terminal, a few plain lines in a log.

A bar redrawn with carriage returns turns a log file (CI, ``nohup``, a pipe) into one long line
of garbage, so where the stream is not a terminal the same tqdm bar is written as whole lines,
at most every :data:`LOG_SECONDS` seconds or tenth of the work, each with counts, rate and ETA.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_SECONDS = 30.0
"""Most often a progress line is written to a stream that is not a terminal."""


def bar(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True, stream=None,
        leave: bool = True) -> tqdm:
    """A progress bar over ``total`` units of work; a silent one when not ``enabled``.

    Args:
        total: Units of work (``None`` when unknown: counts and rate only).
        desc: What is being done, shown first ("train", "eval: generate", ...).
        unit: What one unit is ("step", "batch", ...).
        initial: Units already done (a resumed run).
        enabled: ``False`` for processes that must stay quiet (all but the main one).
        stream: Where to write; standard error by default.
        leave: Keep the finished bar on screen (a terminal); phases nested in another bar pass ``False``.
    """
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream, leave=leave)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(stream), ascii=True, ncols=100,
                mininterval=LOG_SECONDS, miniters=max(1, (total or 0) // 10), leave=True)


def note(text: str, stream=None) -> None:
    """A line of text that does not break a bar on screen."""
    tqdm.write(text, file=stream or sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or wrapped stream
        return False


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()
