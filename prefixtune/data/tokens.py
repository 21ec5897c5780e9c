"""Examples -> token rows with the loss on the completion only.

Prefix tuning trains a conditional model ``p(completion | prompt)`` (Li & Liang 2021, section 4:
the loss is on the target ``y`` only), so prompt positions carry the label ``-100`` that
transformers' loss ignores, and generation starts from exactly the prompt tokens trained on.
"""

from __future__ import annotations

from .example import DataError, Example, where_of
from .templates import chat_messages, check_template, context, prompt_text

IGNORE = -100
"""The label transformers' cross-entropy skips: prompt positions and padding."""

OVERFLOW = ("truncate", "fail")


def prompt_ids(example: Example, tokenizer, *, template: str | None = None, chat_template: bool = False,
               max_length: int | None = None) -> list[int]:
    """The token ids that generation starts from: the same prompt tokens :func:`tokenize` trains on.

    Args:
        example: The example; its completion, if any, is left out.
        tokenizer: A transformers tokenizer.
        template: Prompt template for prompt/completion data (see :func:`~prefixtune.data.prompt_text`).
        chat_template: Render through ``tokenizer.apply_chat_template`` with the generation
            prompt (implied for examples that have ``messages``).
        max_length: Keep only the last ``max_length`` tokens (the end of a prompt is what
            the completion follows).
    """
    if template is not None:
        check_template(template)
    if chat_template or example.messages:
        ids = _chat_ids(tokenizer, context(chat_messages(example, template)), add_generation_prompt=True)
    else:
        ids = encode(tokenizer, prompt_text(example, template), special=True)
    return ids[len(ids) - max_length:] if max_length is not None and len(ids) > max_length else ids


def encode(tokenizer, text: str, *, special: bool) -> list[int]:
    """The ids of ``text``, with the tokenizer's special tokens (BOS, CLS/SEP) when ``special``."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: use chat_template=False "
                         "or a tokenizer that has one (an instruct/chat model's)")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def tokenize(examples: list[Example], tokenizer, *, max_length: int, template: str | None = None,
             chat_template: bool = False, overflow: str = "truncate") -> tuple[list[dict], dict]:
    """Token rows with the loss on the completion only.

    Each row is ``{"input_ids": prompt + completion + eos, "labels": [-100] * len(prompt) +
    completion + eos}``: the eos is labelled so that the model learns to stop. Prompt and
    completion are tokenized separately, so the prompt tokens are exactly those
    :func:`prompt_ids` gives at generation time. No space is added between them.

    Args:
        examples: As from :func:`~prefixtune.data.load_examples`.
        tokenizer: A transformers tokenizer with an eos token.
        max_length: The most tokens in a row.
        template: Prompt template for prompt/completion data (see :func:`~prefixtune.data.prompt_text`).
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
    if template is not None:
        check_template(template)
    eos = eos_id(tokenizer)
    rows, truncated = [], []
    for example in examples:
        if chat_template or example.messages:
            prompt, completion = _chat_pair(example, tokenizer, template, eos)
        else:
            prompt = encode(tokenizer, prompt_text(example, template), special=True)
            completion = encode(tokenizer, example.completion, special=False) + [eos]
        prompt, completion, cut = _fit(prompt, completion, max_length, overflow, where_of(example))
        if cut:
            truncated.append(where_of(example))
        rows.append({"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion})
    return rows, report_of(rows, truncated)


def report_of(rows: list[dict], truncated: list[str]) -> dict:
    """What tokenizing made: ``{"examples", "truncated" (where, for each cut example), "tokens"}``."""
    return {"examples": len(rows), "truncated": truncated, "tokens": sum(len(r["input_ids"]) for r in rows)}


def eos_id(tokenizer) -> int:
    """The tokenizer's end-of-sequence id; a tokenizer without one cannot mark where a completion ends."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token: set tokenizer.eos_token, "
                         "otherwise the model never learns where a completion ends")
    return eos


def _chat_pair(example: Example, tokenizer, template: str | None, eos: int) -> tuple[list[int], list[int]]:
    """Split a chat-templated conversation into prompt ids and completion ids."""
    messages = chat_messages(example, template)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where_of(example)}: the last message must be the assistant's to train on")
    prompt = _chat_ids(tokenizer, context(messages), add_generation_prompt=True)
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    if full[:len(prompt)] != prompt:
        raise DataError(f"{where_of(example)}: the chat template's prompt (with generation prompt) does not "
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
