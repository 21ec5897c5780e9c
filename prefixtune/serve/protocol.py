"""OpenAI's request and response bodies: checking what comes in, shaping what goes out.

Only what the server really does is accepted: a field it cannot honour (``logprobs``,
penalties, ``logit_bias``, ``suffix``, tools) is refused with a 400 that names it,
rather than silently ignored; fields that change nothing (``user``, ``metadata``) are
ignored. Limits are checked here, before a request can take a place in the queue.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from . import errors
from .sampling import SamplingParams

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "suffix", "tools", "functions", "tool_choice",
               "function_call", "response_format", "audio", "prediction")


@dataclass
class ServeLimits:
    """What one request may ask for.

    Args:
        max_tokens: Largest ``max_tokens`` accepted (a larger one is a 400).
        max_prompt_tokens: Longest prompt accepted, in tokens (a longer one is a 413).
        context_length: The model's positions: prompt + ``max_tokens`` must fit (400).
        max_n: Largest ``n`` (choices per request).
        default_max_tokens: ``max_tokens`` of a completion request that gives none
            (OpenAI's default is 16); a chat request without one gets ``max_tokens``.
    """

    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    context_length: int = 8192
    max_n: int = 8
    default_max_tokens: int = 16


@dataclass
class Job:
    """A checked request: the prompts to generate for and how."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: list[str] | None = None  # completions with echo=true: the prompt texts

    def choice_params(self, choice: int) -> SamplingParams:
        """Choice ``choice``'s params: seeded choices get distinct seeds (``seed + choice``)."""
        if self.params.seed is None or choice == 0:
            return self.params
        return SamplingParams(**{**self.params.__dict__, "seed": self.params.seed + choice})


# ---------------------------------------------------------------- requests
def check_text(body: dict) -> None:
    """Refuse (400) any string in a parsed body that is not valid Unicode: JSON can carry a lone
    surrogate (``"\\ud800"``), which no tokenizer can encode. Walked without recursion, so any
    nesting that ``json.loads`` accepted is walked too."""
    stack = [(body, "body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.bad_request(f"{where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                                         "which is not valid Unicode text", code="invalid_text") from None
        elif isinstance(value, dict):
            stack += [(key, where) for key in value]
            stack += [(item, key if where == "body" else f"{where}.{key}") for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(item, f"{where}[{index}]") for index, item in enumerate(value)]


def check_count(body: dict, limits: ServeLimits, max_queue: int) -> None:
    """What can be refused before any prompt is tokenized: ``n`` out of range, or more generations
    (prompts x ``n``) than the queue can ever hold, which no retry would fix (400, not 429)."""
    n = _choices(body, limits)
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not all(_is_token(t) for t in prompt) else 1
    if prompts * n > max_queue:
        raise errors.bad_request(f"{prompts} prompt(s) x n={n} is {prompts * n} generations; this server queues at "
                                 f"most {max_queue}: send fewer per request", param="prompt",
                                 code="too_many_generations")


def completion_job(body: dict, tokenizer, limits: ServeLimits) -> Job:
    """Check a ``/v1/completions`` body."""
    _check_supported(body)
    prompt = body.get("prompt")
    texts, prompts = _prompts(prompt, tokenizer)
    echo = _typed(body, "echo", bool, False)
    job = _job("completion", body, prompts, limits, limits.default_max_tokens)
    job.echo = texts if echo else None
    return job


def chat_job(body: dict, tokenizer, limits: ServeLimits) -> Job:
    """Check a ``/v1/chat/completions`` body; the prompt is the tokenizer's chat template."""
    _check_supported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.bad_request("'messages' must be a non-empty list of {role, content} objects", param="messages")
    conversation = [_message(m, i) for i, m in enumerate(messages)]
    if getattr(tokenizer, "chat_template", None) is None:
        raise errors.bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template's own complaint (e.g. role order) is the client's
        raise errors.bad_request(f"the chat template refused these messages: {err}", param="messages") from err
    ids = tokenizer(text, add_special_tokens=False).input_ids
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return _job("chat", {**body, "max_tokens": max_tokens}, [ids], limits, limits.max_tokens)


def _check_supported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise errors.bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise errors.bad_request(f"'{name}' is not supported by this server (only 0)", param=name,
                                     code="unsupported")
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise errors.bad_request("'best_of' is not supported by this server", param="best_of", code="unsupported")


def _prompts(prompt, tokenizer) -> tuple[list[str], list[list[int]]]:
    """``prompt`` as OpenAI allows it: a string, a list of strings, token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise errors.bad_request("'prompt' must be a string, a list of strings, or token ids", param="prompt")
    texts, prompts = [], []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenizer(item).input_ids
            texts.append(item)
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            if max(item) >= len(tokenizer):
                raise errors.bad_request(f"token id {max(item)} is outside the vocabulary", param="prompt")
            ids = list(item)
            texts.append(tokenizer.decode(ids))
        else:
            raise errors.bad_request("each prompt must be a string or a non-empty list of token ids", param="prompt")
        if not ids:
            raise errors.bad_request("the prompt has no tokens", param="prompt")
        prompts.append(ids)
    return texts, prompts


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise errors.bad_request(f"{where} must be an object with a 'role' and a 'content'", param=where)
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise errors.bad_request(f"{where}.content: only text parts are supported", param=where)
        content = "".join(p["text"] for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise errors.bad_request(f"{where}.content must be a string or a list of text parts", param=where)
    return {"role": message["role"], "content": content}


def _job(kind: str, body: dict, prompts: list[list[int]], limits: ServeLimits, default_max: int) -> Job:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("'model' is required: the base model's name or a prefix's", param="model")
    max_tokens = _typed(body, "max_tokens", int, default_max)
    if max_tokens < 1 or max_tokens > limits.max_tokens:
        raise errors.bad_request(f"'max_tokens' must be between 1 and {limits.max_tokens}; got {max_tokens}",
                                 param="max_tokens", code="max_tokens_out_of_range")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stop(body.get("stop")),
        seed=_typed(body, "seed", int, None),
        ignore_eos=_typed(body, "ignore_eos", bool, False),
    )
    n = _choices(body, limits)
    _check_lengths(prompts, max_tokens, limits, "prompt" if kind == "completion" else "messages")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise errors.bad_request("'stream_options' must be an object", param="stream_options")
    return Job(kind, model, prompts, params, n, stream, include_usage=bool(options.get("include_usage")))


def _choices(body: dict, limits: ServeLimits) -> int:
    """``n``, the choices per prompt, within ``limits.max_n``."""
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise errors.bad_request(f"'n' must be between 1 and {limits.max_n}; got {n}", param="n")
    return n


def _check_lengths(prompts: list[list[int]], max_tokens: int, limits: ServeLimits, param: str) -> None:
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_tokens:
        raise errors.APIError(413, f"the prompt has {longest} tokens; this server accepts at most "
                              f"{limits.max_prompt_tokens}", param=param, code="prompt_too_long")
    if longest + max_tokens > limits.context_length:
        raise errors.bad_request(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"model's context length ({limits.context_length})", param="max_tokens",
                                 code="context_length_exceeded")


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.bad_request(f"'{name}' must be {'an integer' if kind is int else 'a ' + kind.__name__}",
                                 param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise errors.bad_request(f"'{name}' must be a number in {bound}; got {value!r}", param=name)
    return float(value)


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise errors.bad_request(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                                 param="stop")
    return stop


# --------------------------------------------------------------- responses
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
