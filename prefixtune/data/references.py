"""Examples -> the units a score is computed over: one entry per distinct prompt, or per field value."""

from __future__ import annotations

import json

from .example import DataError, Example, where_of
from .templates import context


def group_references(examples: list[Example]) -> list[tuple[Example, list[str]]]:
    """One entry per distinct prompt, with all its completions as references.

    Multi-reference sets such as E2E have one row per reference, and are scored per prompt
    against all of them (as the official e2e-metrics scorer does). Entries come in order of
    first appearance; each carries its first example. Empty completions are not references.

    Args:
        examples: As from :func:`~prefixtune.data.load_examples`.
    """
    groups: dict[tuple, tuple[Example, list[str]]] = {}
    for example in examples:
        conversation = context(example.messages) if example.messages else None
        key = (example.prompt, json.dumps(conversation, sort_keys=True))
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
            raise DataError(f"{where_of(example)}: {option} names field {field!r}, which this row lacks "
                            f"(fields: {', '.join(map(str, example.fields))})")
        parts.setdefault(str(example.fields[field]), []).append(example)
    return parts
