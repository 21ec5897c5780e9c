"""Errors told in one line: what the command line, checkpoints and benchmarks print of an exception."""

from __future__ import annotations

import json
import reprlib


def first_line(error: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (at most ``limit`` characters): an error told in one line."""
    text = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def shown(value, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, read no deeper than it shows: a value echoed in a
    message (a 100 KB option, a YAML list whose aliases expand to millions of items) stays one short line."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def not_utf8(name: str, err: UnicodeDecodeError, start_line: int = 1) -> str:
    """``name:LINE: not UTF-8 text (byte 0x.. at column C)``: where a decoding failed, in the file's own lines
    (``err.object`` holds the bytes from line ``start_line`` on)."""
    data = err.object
    line = start_line + data.count(b"\n", 0, err.start)
    column = err.start - data.rfind(b"\n", 0, err.start)
    return f"{name}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at column {column}); save the file as UTF-8"


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    short.maxstring = short.maxother = short.maxlong = 80
    return short


_SHORT = _short_repr()


def json_failure(err: ValueError | RecursionError) -> str:
    """Why ``json.loads`` gave up, in words: the line where the text breaks, arrays or objects nested deeper
    than Python's parser goes, or a number it will not convert (4,300 digits and more)."""
    if isinstance(err, json.JSONDecodeError):
        return f"line {err.lineno}: {err.msg}"
    return "nested too deeply" if isinstance(err, RecursionError) else first_line(err, limit=120)


def unicode_problem(text: str) -> str | None:
    """What makes ``text`` no text a tokenizer takes, or ``None``: a lone surrogate, which JSON's ``"\\ud800"``
    and command-line bytes that are not UTF-8 both give Python strings."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"holds U+{ord(text[err.start]):04X} at character {err.start + 1}, a lone surrogate (bytes that are not "
                "UTF-8, or a \\u escape of half a character), which is not text")
    return None
