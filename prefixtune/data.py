"""Files -> examples -> tokens (prompt labels masked) -> batches.

Prefix tuning trains a conditional model ``p(completion | prompt)`` (Li & Liang 2021,
section 4: the loss is on the target ``y`` only), so every source is first read into
:class:`Example` s (a prompt and a completion, plus the raw record), then tokenized into
rows whose prompt positions carry the label ``-100`` that transformers' loss ignores.

Sources: ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, or a Hugging Face
``datasets`` name (``name`` or ``name:config``, or a local folder that
``datasets.load_dataset`` accepts). Records are either prompt/completion fields, a text and
a label (classification), or a chat ``messages`` list. Bad input raises :class:`DataError`
naming the file, the 1-based line or row, and what is wrong, before any training starts.

``pyarrow`` (parquet) and ``datasets`` (Hub datasets) are imported only when such a source
is read, so the rest of the package does not depend on them.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .where import Where

IGNORE = -100
"""The label transformers' cross-entropy skips: prompt positions and padding."""

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
FIELD_LIMIT = 2**31 - 1
"""Largest CSV/TSV field read (the ``csv`` module's own default, 128 KiB, refuses long documents);
``--max-length`` decides how much of a field is used."""
ROLES = ("system", "user", "assistant")
OVERFLOW = ("truncate", "fail")


class DataError(ValueError):
    """Bad input data; the message names the file and the line/row (1-based) and what is wrong."""


@dataclass
class Example:
    """One training or generation example, as read from a source.

    Args:
        prompt: The input text (untemplated). For chat data, the last user message (for display).
        completion: The target text ("" when the source has none, e.g. prompts to generate from).
        fields: The raw record (all columns/keys), usable in a prompt template.
        messages: Chat form ``[{"role": ..., "content": ...}, ...]`` when the source had "messages".
        label: For classification sources (``text_field``/``label_field``): the label as a string.
        where: ``"file:line"`` (or ``"file:#row"``) of the record, for messages.
    """

    prompt: str
    completion: str
    fields: dict
    messages: list | None = None
    label: str | None = None
    where: str = ""


# ---------------------------------------------------------------------------- loading
def load_examples(
    source: str,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    text_field: str | None = None,
    label_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    require_completion: bool = True,
    keep: Where | None = None,
) -> list[Example]:
    """Read ``source`` into examples, checking every record.

    Args:
        source: A ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, a local folder, or a
            ``datasets`` name, optionally ``name:config``. Something that looks like a path
            but does not exist is a "file not found" error, never a Hub lookup.
        prompt_field: The key or column holding the prompt.
        completion_field: The key or column holding the completion.
        text_field: For classification data: the text column (used instead of ``prompt_field``).
        label_field: For classification data: the label column; its value, as a string, is
            both ``label`` and the completion.
        split: The split to load from a ``datasets`` source (files have no splits).
        limit: Keep only the first ``limit`` examples (and read no further); with ``keep``,
            the first ``limit`` that pass it.
        require_completion: ``False`` lets records without a completion through (``""``),
            for prompts to generate from.
        keep: Keep only the records that pass this filter (:mod:`prefixtune.where`); a record
            without its field is an error, and so is a filter that keeps nothing.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    fields = dict(prompt=text_field or prompt_field, completion=label_field or completion_field,
                  is_label=label_field is not None, require_completion=require_completion)
    examples = []
    for at, record in _records(source, split):
        if keep is not None and not keep.keeps(record, at):
            continue
        examples.append(_example(record, at, **fields))
        if len(examples) == limit:
            break
    if not examples:
        raise DataError(f"{source}: {keep.option} {keep.text!r} keeps no row" if keep else f"{source}: no examples")
    return examples


def select(examples: list[Example], keep: Where | None, source: str) -> list[Example]:
    """The examples that pass ``keep`` (all of them for ``None``): the filter of :func:`load_examples`
    for examples made in memory (the built-in demo task); ``source`` names them in errors."""
    if keep is None:
        return examples
    kept = [ex for ex in examples if keep.keeps(ex.fields, ex.where or source)]
    if not kept:
        raise DataError(f"{source}: {keep.option} {keep.text!r} keeps no row")
    return kept


def _records(source: str, split: str) -> Iterator[tuple[str, dict]]:
    """The ``(where, record)`` pairs of ``source``, from whichever reader fits it."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records,
                   ".tsv": _tsv_records, ".parquet": _parquet_records}
        if suffix not in readers:
            raise DataError(f"{source}: unsupported file type {suffix!r} (use one of {', '.join(FILE_TYPES)})")
        return readers[suffix](path, source)
    if not path.is_dir() and _looks_like_path(source):
        raise DataError(f"{source}: file not found")
    return _hub_records(source, split)


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
                raise DataError(f"{name}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
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
        yield where, _object(record, where)


def _json_records(path: Path, name: str) -> Iterator[tuple[str, dict]]:
    text = "".join(_text_lines(path, name))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: malformed JSON: {e}") from None
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
    parquet = _require("pyarrow.parquet", "pyarrow", "to read .parquet files")
    number = 0
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield f"{name}:#{number}", record


def _hub_records(source: str, split: str) -> Iterator[tuple[str, dict]]:
    """A ``datasets`` name (``name`` or ``name:config``) or a local folder it can read."""
    datasets = _require("datasets", "datasets", f"to load {source!r} (not a file) as a Hugging Face dataset")
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


def _require(module: str, package: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{package} is needed {purpose}: pip install {package}") from e


def _example(record: dict, where: str, *, prompt: str, completion: str, is_label: bool,
             require_completion: bool) -> Example:
    """Turn one raw record into an :class:`Example`, or say precisely what is wrong with it."""
    if "messages" in record and prompt not in record and not is_label:
        return _chat_example(record, where, require_completion)
    text = _string_field(record, prompt, where, required=True)
    if is_label:
        label = _label_field(record, completion, where, require_completion)
        return Example(prompt=text, completion=label or "", fields=record, label=label, where=where)
    target = _string_field(record, completion, where, required=require_completion)
    return Example(prompt=text, completion=target, fields=record, where=where)


def _string_field(record: dict, key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None or value == "":
        if required:
            what = "missing field" if key not in record else "empty field"
            raise DataError(f"{where}: {what} {key!r} (available: {', '.join(map(str, record))})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _label_field(record: dict, key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        if required:
            raise DataError(f"{where}: missing label field {key!r} (available: {', '.join(map(str, record))})")
        return None
    if not isinstance(value, (str, int, float, bool)):
        raise DataError(f"{where}: label field {key!r} must be a string or a number, got {type(value).__name__}")
    return str(value)


def _chat_example(record: dict, where: str, require_completion: bool) -> Example:
    """A ``messages`` record: the last assistant message is the completion."""
    messages = record["messages"]
    _check_messages(messages, where)
    last = messages[-1]
    has_reply = last["role"] == "assistant" and last["content"] != ""
    if require_completion and not has_reply:
        raise DataError(f"{where}: field 'messages': the last message must be a non-empty assistant reply to train on")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(prompt=users[-1] if users else "", completion=last["content"] if has_reply else "",
                   fields=record, messages=messages, where=where)


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: field 'messages', message {i}: needs a 'role' among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field 'messages', message {i}: 'content' must be a string")


# ---------------------------------------------------------------------------- references
def group_references(examples: list[Example]) -> list[tuple[Example, list[str]]]:
    """One entry per distinct prompt, with all its completions as references.

    Multi-reference sets such as E2E have one row per reference, and are scored per prompt
    against all of them (as the official e2e-metrics scorer does). Entries come in order of
    first appearance; each carries its first example. Empty completions are not references.

    Args:
        examples: As from :func:`load_examples`.
    """
    groups: dict[tuple, tuple[Example, list[str]]] = {}
    for example in examples:
        context = _context(example.messages) if example.messages else None
        key = (example.prompt, json.dumps(context, sort_keys=True))
        _, references = groups.setdefault(key, (example, []))
        if example.completion:
            references.append(example.completion)
    return list(groups.values())


def partition(examples: list[Example], field: str, option: str = "--group-by") -> dict[str, list[Example]]:
    """The examples by the value of ``field`` in their raw record (as text), values in order of
    first appearance: per-category scores of WebNLG. A row without the field is a :class:`DataError`
    naming ``option``."""
    parts: dict[str, list[Example]] = {}
    for example in examples:
        if field not in example.fields:
            raise DataError(f"{_where(example)}: {option} names field {field!r}, which this row lacks "
                            f"(fields: {', '.join(map(str, example.fields))})")
        parts.setdefault(str(example.fields[field]), []).append(example)
    return parts


# ---------------------------------------------------------------------------- prompts
def prompt_text(example: Example, template: str | None) -> str:
    """The prompt as the model sees it: ``template.format(**fields, prompt=...)``, or the bare prompt.

    Args:
        example: The example; its raw ``fields`` are available to the template.
        template: E.g. ``"Table: {prompt}\\nText:"``; ``{prompt}`` is the example's prompt
            whatever column it came from. ``None`` means the prompt as is.
    """
    if template is None:
        return example.prompt
    values = {**example.fields, "prompt": example.prompt}
    try:
        return template.format_map(values)
    except KeyError as e:
        raise DataError(f"{_where(example)}: template {template!r} needs field {e.args[0]!r} "
                        f"(available: {', '.join(map(str, values))})") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise DataError(f"{_where(example)}: template {template!r} cannot be filled: {e}") from None


def _where(example: Example) -> str:
    return example.where or "example"


def _chat_messages(example: Example, template: str | None) -> list[dict]:
    """The conversation: the example's own messages, or user=prompt (templated), assistant=completion.

    A template applies only to prompt/completion data; chat data is already in its final form.
    """
    if example.messages:
        return example.messages
    messages = [{"role": "user", "content": prompt_text(example, template)}]
    if example.completion:
        messages.append({"role": "assistant", "content": example.completion})
    return messages


def _context(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn: what a reply is generated from."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: use chat_template=False "
                         "or a tokenizer that has one (an instruct/chat model's)")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def prompt_ids(example: Example, tokenizer, *, template: str | None = None, chat_template: bool = False,
               max_length: int | None = None) -> list[int]:
    """The token ids that generation starts from: the same prompt tokens :func:`tokenize` trains on.

    Args:
        example: The example; its completion, if any, is left out.
        tokenizer: A transformers tokenizer.
        template: Prompt template for prompt/completion data (see :func:`prompt_text`).
        chat_template: Render through ``tokenizer.apply_chat_template`` with the generation
            prompt (implied for examples that have ``messages``).
        max_length: Keep only the last ``max_length`` tokens (the end of a prompt is what
            the completion follows).
    """
    if chat_template or example.messages:
        context = _context(_chat_messages(example, template))
        ids = _chat_ids(tokenizer, context, add_generation_prompt=True)
    else:
        ids = _encode(tokenizer, prompt_text(example, template), special=True)
    return ids[len(ids) - max_length:] if max_length is not None and len(ids) > max_length else ids


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# ---------------------------------------------------------------------------- tokens
def tokenize(examples: list[Example], tokenizer, *, max_length: int, template: str | None = None,
             chat_template: bool = False, overflow: str = "truncate") -> tuple[list[dict], dict]:
    """Token rows with the loss on the completion only.

    Each row is ``{"input_ids": prompt + completion + eos, "labels": [-100] * len(prompt) +
    completion + eos}``: the eos is labelled so that the model learns to stop. Prompt and
    completion are tokenized separately, so the prompt tokens are exactly those
    :func:`prompt_ids` gives at generation time. No space is added between them.

    Args:
        examples: As from :func:`load_examples`.
        tokenizer: A transformers tokenizer with an eos token.
        max_length: The most tokens in a row.
        template: Prompt template for prompt/completion data (see :func:`prompt_text`).
        chat_template: Tokenize through ``tokenizer.apply_chat_template`` (implied for
            examples with ``messages``): the prompt is the conversation before the last
            assistant turn plus the generation prompt, the completion the rest of the full
            conversation (the template's own end-of-turn marks it as done; eos is appended
            only if it contains none).
        overflow: When a row exceeds ``max_length``: ``"truncate"`` cuts the prompt from the
            left (and, if the completion alone is too long, the completion's end) and lists
            the example in ``report["truncated"]``; ``"fail"`` raises :class:`DataError`.

    Returns:
        ``(rows, report)`` with ``report = {"examples": n, "truncated": [where, ...], "tokens": total}``.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    eos = eos_id(tokenizer)
    rows, truncated = [], []
    for example in examples:
        if chat_template or example.messages:
            prompt, completion = _chat_pair(example, tokenizer, template, eos)
        else:
            prompt = _encode(tokenizer, prompt_text(example, template), special=True)
            completion = _encode(tokenizer, example.completion, special=False) + [eos]
        prompt, completion, cut = _fit(prompt, completion, max_length, overflow, _where(example))
        if cut:
            truncated.append(_where(example))
        rows.append({"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion})
    report = {"examples": len(rows), "truncated": truncated, "tokens": sum(len(r["input_ids"]) for r in rows)}
    return rows, report


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token: set tokenizer.eos_token, "
                         "otherwise the model never learns where a completion ends")
    return eos


def _chat_pair(example: Example, tokenizer, template: str | None, eos: int) -> tuple[list[int], list[int]]:
    """Split a chat-templated conversation into prompt ids and completion ids."""
    messages = _chat_messages(example, template)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{_where(example)}: the last message must be the assistant's to train on")
    prompt = _chat_ids(tokenizer, _context(messages), add_generation_prompt=True)
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
        raise DataError(f"{_where(example)}: the chat template's prompt (with generation prompt) does not "
                        "tokenize to a prefix of the full conversation, so the prompt cannot be masked")
    completion = full[len(prompt):]
    return prompt, completion if eos in completion else completion + [eos]


def _fit(prompt: list[int], completion: list[int], max_length: int, overflow: str,
         where: str) -> tuple[list[int], list[int], bool]:
    """Apply the overflow policy; the completion is what the loss is on, so the prompt gives way first."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion, False
    if overflow == "fail":
        raise DataError(f"{where}: {len(prompt) + len(completion)} tokens (prompt {len(prompt)} + completion "
                        f"{len(completion)}) exceed max_length {max_length}")
    completion = completion[:max_length]
    keep = max_length - len(completion)
    return prompt[len(prompt) - keep:], completion, True


def label_names(examples: list[Example]) -> list[str]:
    """The classes of classification examples, in id order: numerically if every label is
    an integer (GLUE's "0"/"1"), else alphabetically."""
    names = sorted({ex.label for ex in examples if ex.label is not None})
    if not names:
        raise DataError("no example has a label: give --text-field and --label-field for classification data")
    if all(name.lstrip("-").isdigit() for name in names):
        names.sort(key=int)
    return names


def tokenize_classes(examples: list[Example], tokenizer, labels: list[str], *,
                     max_length: int) -> tuple[list[dict], dict]:
    """Token rows of a sequence-classification task: ``{"input_ids": [CLS] text [SEP], "labels": class id}``.

    Texts longer than ``max_length`` tokens are cut at the end (the tokenizer keeps its
    closing special token) and listed in ``report["truncated"]``. A label outside
    ``labels`` (the training set's classes) is an error naming the example.
    """
    ids = {name: i for i, name in enumerate(labels)}
    rows, truncated = [], []
    for example in examples:
        if example.label not in ids:
            raise DataError(f"{_where(example)}: label {example.label!r} is not one of the training labels "
                            f"({', '.join(labels)})")
        tokens = _encode(tokenizer, example.prompt, special=True)
        if len(tokens) > max_length:  # let the tokenizer cut, so that it keeps its closing special token
            tokens = tokenizer(example.prompt, truncation=True, max_length=max_length)["input_ids"]
            truncated.append(_where(example))
        rows.append({"input_ids": list(tokens), "labels": ids[example.label]})
    report = {"examples": len(rows), "truncated": truncated, "tokens": sum(len(r["input_ids"]) for r in rows)}
    return rows, report


# ---------------------------------------------------------------------------- batches
def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors; padding gets attention 0 and label -100.

    Rows of :func:`tokenize_classes` carry one class id each; their ``labels`` is ``[B]``.

    Args:
        rows: From :func:`tokenize` or :func:`tokenize_classes`.
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
        rows: From :func:`tokenize`.
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
