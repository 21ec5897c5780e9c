"""Examples -> the text (or the conversation) a model sees: prompt templates and chat form."""

from __future__ import annotations

from .example import DataError, Example, where_of


def prompt_text(example: Example, template: str | None) -> str:
    """The prompt as the model sees it: ``template`` filled from the example's fields, or the bare prompt.

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
        raise DataError(f"{where_of(example)}: template {template!r} needs field {e.args[0]!r} "
                        f"(available: {', '.join(map(str, values))})") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise DataError(f"{where_of(example)}: template {template!r} cannot be filled: {e}") from None


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
