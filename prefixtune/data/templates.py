"""Examples -> the text (or the conversation) a model sees: prompt templates and chat form.

A prompt template is ``--prompt-template``, e.g. ``"Table: {prompt}\\nText:"``: literal text with
plain ``{field}`` placeholders filled from the example's raw record. Python's format strings can
do more (reach attributes and items, convert, nest fields in format specs), and a template comes
from a config file or a command line, so anything but a plain field name is refused.
"""

from __future__ import annotations

import functools
import string

from .example import DataError, Example, where_of

OPTION = "--prompt-template"


@functools.cache
def check_template(template: str) -> None:
    """Refuse ``template`` unless its placeholders are plain ``{field}`` names (``{{``/``}}`` are braces).

    ``{mr.__class__}``, ``{mr[0]}``, ``{mr!r}``, ``{mr:>{width}}``, ``{}`` and ``{0}`` are each a
    :class:`DataError` naming :data:`OPTION`: one line, raised before any example is filled.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"{OPTION}: {template!r} is not a template ({e}); write a literal brace as {{{{ or }}}}") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not field or field.isdigit() or any(c in field for c in ".[]") or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise DataError(f"{OPTION}: {shown} is not allowed: a template holds plain field names only, "
                            "such as {prompt} or {mr}")


def prompt_text(example: Example, template: str | None) -> str:
    """The prompt as the model sees it: ``template`` filled from the example's fields, or the bare prompt.

    Args:
        example: The example; its raw ``fields`` are available to the template.
        template: E.g. ``"Table: {prompt}\\nText:"``; ``{prompt}`` is the example's prompt
            whatever column it came from. ``None`` means the prompt as is.
    """
    if template is None:
        return example.prompt
    check_template(template)
    values = {**example.fields, "prompt": example.prompt}
    try:
        return template.format_map(values)
    except KeyError as e:
        raise DataError(f"{where_of(example)}: template {template!r} needs field {e.args[0]!r} "
                        f"(available: {', '.join(map(str, values))})") from None


def chat_messages(example: Example, template: str | None) -> list[dict]:
    """The conversation: the example's own messages, or user=prompt (templated), assistant=completion.

    A template applies only to prompt/completion data; chat data is already in its final form.
    """
    if example.messages:
        return example.messages
    messages = [{"role": "user", "content": prompt_text(example, template)}]
    if example.completion:
        messages.append({"role": "assistant", "content": example.completion})
    return messages


def context(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn: what a reply is generated from."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
