"""What every stage of the data path hands on: an :class:`Example`, and the :class:`DataError` that says
where a bad one came from."""

from __future__ import annotations

from dataclasses import dataclass


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


def where_of(example: Example) -> str:
    """Where ``example`` was read (``file:line``), for messages; ``"example"`` for one made in memory."""
    return example.where or "example"
