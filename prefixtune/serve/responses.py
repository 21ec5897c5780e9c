"""OpenAI's response bodies: whole answers, server-sent event chunks and usage.

Shaped as OpenAI's own, so that its clients parse them unchanged (``system_fingerprint`` and
``logprobs`` are ``null``: this server has neither).
"""

from __future__ import annotations

import time
import uuid

from .protocol import Job


def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def response(job: Job, rid: str, texts: list[str], reasons: list[str], usage: dict) -> dict:
    """The whole answer of a non-streaming request."""
    if job.kind == "completion":
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": job.model, "choices": choices,
            "usage": usage, "system_fingerprint": None}


def chunk(job: Job, rid: str, index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
    """One server-sent event of a streaming answer."""
    if job.kind == "completion":
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]
        obj = "text_completion"
    else:
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": job.model, "choices": choices,
            "system_fingerprint": None}


def usage_chunk(job: Job, rid: str, usage: dict) -> dict:
    obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": job.model, "choices": [],
            "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
