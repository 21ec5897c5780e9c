"""Sources -> raw records: ``(where, record)`` pairs, where ``where`` is ``file:line`` (or ``file:#row``).

Files: ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``; anything else that is not a file
is a Hugging Face ``datasets`` name (``name`` or ``name:config``) or a local folder that
``datasets.load_dataset`` reads. Bad input raises :class:`DataError` naming the file and the
1-based line or row. ``pyarrow`` (parquet) and ``datasets`` are imported only when such a source
is read, so the rest of the package does not depend on them.
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

from .. import hub
from ..messages import first_line, json_failure, not_utf8
from .example import DataError

FIELD_LIMIT = 2**31 - 1
"""Largest CSV/TSV field read (the ``csv`` module's own default, 128 KiB, refuses long documents);
``--max-length`` decides how much of a field is used."""


def records(source: str, split: str) -> Iterator[tuple[str, dict]]:
    """The ``(where, record)`` pairs of ``source``, from whichever reader fits it.

    Something that looks like a path but does not exist is "file not found", never a Hub lookup.
    """
    path = check_source(source)
    if path.is_file():
        return READERS[path.suffix.lower()](path, source)
    return _hub_records(source, split)


def check_source(source: str) -> Path:
    """``source`` as a path, once what :func:`records` would refuse on opening it is ruled out (a file that is
    missing, of a type no reader takes, or not a regular file): cheap, so that a run can check its data before
    it looks at anything else. A ``datasets`` name passes; the Hub answers for it when it is read."""
    path = Path(source).expanduser()
    _refuse_special(path, source)
    if path.is_file() and path.suffix.lower() not in FILE_TYPES:
        raise DataError(f"{source}: unsupported file type {path.suffix.lower()!r} (use one of {', '.join(FILE_TYPES)})")
    if not path.exists() and _looks_like_path(source):
        raise DataError(f"{source}: file not found")
    return path


def _refuse_special(path: Path, source: str) -> None:
    """Refuse a pipe, socket or device as the source or anywhere in a source folder.

    Opening a FIFO waits for a writer that may never come, and ``datasets.load_dataset`` opens
    every file of a folder, so one FIFO beside the data hangs the run; a device reads forever.
    A broken link is refused here too, as a file that cannot be read.
    """
    if not path.exists() and not path.is_symlink():
        return
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if not entry.is_dir() and not entry.is_file():
            shown = source if entry == path else str(entry)
            raise DataError(f"{shown}: not a regular file (a pipe, socket, device or broken link); data must be "
                            "regular files")


def _looks_like_path(source: str) -> bool:
    """Whether a source that does not exist was meant as a file, not a ``datasets`` name.

    Hub ids have the form ``name`` or ``owner/name`` (plus ``:config`` here), so a single
    ``/`` alone does not make a path; a known extension, a leading ``/ . ~``, a backslash, a
    second ``/``, or a first component that exists locally (``data/missing``) do.
    """
    name = source.rsplit(":", 1)[0] if ":" in source else source
    if name.lower().endswith(FILE_TYPES) or name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def _text_lines(path: Path, name: str) -> Iterator[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped), line endings kept; a line
    that is not UTF-8 is a :class:`DataError` naming the file and the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(not_utf8(name, e, number)) from None
            yield line.removeprefix("\ufeff") if number == 1 else line


def _jsonl_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(_text_lines(path, name), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e}") from None
        except (ValueError, RecursionError) as e:  # nested thousands deep, a number of 4,300+ digits
            raise DataError(f"{where}: malformed JSON: {json_failure(e)}") from None
        yield where, _object(record, where)


def _json_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    text = "".join(_text_lines(path, name))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: malformed JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}: malformed JSON: {json_failure(e)}") from None
    if not isinstance(records, list):
        raise DataError(f"{name}: expected a JSON list of objects, got {type(records).__name__}")
    for number, record in enumerate(records, start=1):
        where = f"{name}:#{number}"
        yield where, _object(record, where)


def _object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _csv_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    """Standard CSV (quoted fields may span lines); rows are numbered by the line they start on."""
    return _delimited_records(path, name, dict(delimiter=",", quoting=csv.QUOTE_MINIMAL))


def _tsv_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    """Tab-separated without quoting: GLUE's SST-2 has sentences with bare ``"`` in them."""
    return _delimited_records(path, name, dict(delimiter="\t", quoting=csv.QUOTE_NONE))


def _delimited_records(path: Path, name: str, dialect: dict) -> Iterator[tuple[str, dict]]:
    """What ``csv.DictReader`` does, plus a check of the number of fields in every row.

    DictReader would silently pad a short row with ``None`` or stash extra fields under
    ``None``; in a TSV without quoting that means a stray tab moved the label, so it is an error.
    """
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
    reader = csv.reader(_text_lines(path, name), **dialect)
    try:
        header = next(reader, None)
        if header is None:  # an empty file: load_examples reports "no examples"
            return
        if not header or len(set(header)) != len(header):
            raise DataError(f"{name}:1: a header row of distinct column names is required, got {header}")
        last_line = reader.line_num
        for row in reader:
            where, last_line = f"{name}:{last_line + 1}", reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), found {len(row)}")
            yield where, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: not readable as {path.suffix[1:].upper()}: {e}") from None


def _parquet_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    parquet = require("pyarrow.parquet", "pyarrow", "to read .parquet files")
    number = 0
    try:  # what the consumer raises between two rows happens in its own frame, not here
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield f"{name}:#{number}", record
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: not Parquet, or damaged
        raise DataError(f"{name}:#{number + 1}: not readable as Parquet ({first_line(e)})") from None


READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records, ".tsv": _tsv_records,
           ".parquet": _parquet_records}
"""The reader of each file type, by suffix."""
FILE_TYPES = tuple(READERS)
"""The file types a source may have (:func:`check_source` refuses any other)."""


def _hub_records(source: str, split: str) -> Iterator[tuple[str, dict]]:
    """A ``datasets`` name (``name`` or ``name:config``) or a local folder it can read."""
    datasets = require("datasets", "datasets", f"to load {source!r} (not a file) as a Hugging Face dataset")
    name, config = source, None
    if not Path(source).expanduser().is_dir():
        if ":" in source:
            name, config = source.rsplit(":", 1)
        hub.require("dataset", name)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; all mean "this source cannot be read"
        raise DataError(f"{source}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: {e}") from e
    for number, record in enumerate(dataset, start=1):
        yield f"{source}[{split}]:#{number}", dict(record)


def require(module: str, package: str, purpose: str):
    """``module``, imported; a missing one is an ``ImportError`` naming the ``pip install`` that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{package} is needed {purpose}: pip install {package}") from e
