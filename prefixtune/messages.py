"""Errors told in one line: what the command line, checkpoints and benchmarks print of an exception."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (at most ``limit`` characters): an error told in one line."""
    text = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
