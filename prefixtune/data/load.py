"""Raw records -> :class:`Example` s, every record checked before any training starts.

Records are either prompt/completion fields, a text and a label (classification), or a chat
``messages`` list; a bad one is a :class:`DataError` naming where it was read and what is wrong.
"""

from __future__ import annotations

from ..messages import unicode_problem
from .example import DataError, Example
from .filters import Where
from .readers import records

ROLES = ("system", "user", "assistant")


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
        keep: Keep only the records that pass this filter (:mod:`prefixtune.data.filters`); a record
            without its field is an error, and so is a filter that keeps nothing.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    fields = dict(prompt=text_field or prompt_field, completion=label_field or completion_field,
                  is_label=label_field is not None, require_completion=require_completion)
    examples = []
    for at, record in records(source, split):
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
    return _checked_text(value, f"{where}: field {key!r}")


def _checked_text(text: str, what: str) -> str:
    """``text``, unless it holds what no tokenizer takes (a lone surrogate: JSON's ``"\\ud800"``)."""
    problem = unicode_problem(text)
    if problem:
        raise DataError(f"{what}: {problem}")
    return text


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
        _checked_text(message["content"], f"{where}: field 'messages', message {i}")
