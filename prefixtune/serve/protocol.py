"""OpenAI's request bodies as pydantic models, checked in one place.

Each body the server accepts is a model here (:class:`CompletionRequest`, :class:`ChatRequest`,
:class:`PrefixLoad`) whose fields declare their types, ranges and lengths once; :func:`parse`
checks a raw body against one, as :mod:`prefixtune.options` checks the command line, and every
refusal is a 400 naming the field. ``/openapi.json`` and the field table in docs/serving.md are
generated from the same models (:func:`openapi`, :func:`field_table`).

Before the model sees it, a body is parsed as JSON and walked once, in linear time: no OpenAI
body nests deeper than :data:`MAX_DEPTH`, and every string must be valid Unicode (JSON can carry
a lone surrogate, ``"\\ud800"``, which no tokenizer encodes). The app runs all of it on its
checker thread, never on the event loop.

Only what the server really does is accepted: a field it cannot honour (``logprobs``, penalties,
``logit_bias``, ``suffix``, tools) is refused with a 400 that names it, rather than silently
ignored; fields that change nothing (``user``, ``metadata``) are ignored, and ``null`` means the
field's default, as OpenAI's clients expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import errors
from .limits import Limits
from .sampling import SamplingParams

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_N = 8
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to --max-tokens
MAX_DEPTH = 8
"""Deepest nesting of arrays and objects in a body: a chat body nests 5 (the body, ``messages``, a
message, its content parts, a part)."""
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "suffix", "tools", "functions", "tool_choice",
               "function_call", "response_format", "audio", "prediction")
_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _field(default, expects: str, notes: str = "", **constraints):
    """A request field: ``expects`` completes "'field' must be ..." in a refusal and the docs' table;
    ``notes`` says what it does."""
    return Field(default, description=notes, json_schema_extra={"expects": expects}, **constraints)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _CONFIG
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Generation(BaseModel):
    """The fields completions and chat share."""

    model_config = _CONFIG
    model: str = _field(..., "the base model's name or a prefix's", "which prefix answers; the base model's own "
                        "name means none", min_length=1, max_length=4096)
    max_tokens: int | None = _field(None, "a whole number from 1 to --max-tokens", f"tokens to generate at most; "
                                    f"default {COMPLETION_MAX_TOKENS} for completions (as OpenAI), --max-tokens for "
                                    "chat", ge=1)
    temperature: float = _field(1.0, "a number in [0, 2]", "0 is greedy (argmax); default 1", ge=0, le=2)
    top_p: float = _field(1.0, "a number in (0, 1]", "nucleus sampling; default 1", gt=0, le=1)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = _field(
        None, f"a string or a list of at most {MAX_STOP} non-empty strings", "the text ends before the first one "
        "found, and a stream never shows part of one")
    seed: int | None = _field(None, "a whole number", "the request draws from its own generator: the same seed "
                              "gives the same text whatever shares the batch (choice i of n uses seed + i)")
    n: int = _field(1, f"a whole number from 1 to {MAX_N}", "choices per prompt", ge=1, le=MAX_N)
    stream: bool = _field(False, "true or false", "server-sent events, data: [DONE] at the end")
    stream_options: StreamOptions | None = _field(None, 'an object such as {"include_usage": true}',
                                                  "include_usage: a last chunk carries the usage")
    ignore_eos: bool = _field(False, "true or false", "keep generating past end-of-sequence (an extension, as in "
                              "vLLM)")
    presence_penalty: float = _field(0.0, "0", "only 0: penalties are not supported")
    frequency_penalty: float = _field(0.0, "0", "only 0: penalties are not supported")
    best_of: int | None = _field(None, "1 or n", "only 1 or n: nothing is generated to be thrown away")

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_refusals(cls, data: Any) -> Any:
        """``null`` is the default; a field the server cannot honour is refused by name."""
        if not isinstance(data, dict):
            return data
        for name in UNSUPPORTED:
            if data.get(name) not in (None, False, [], {}):
                raise PydanticCustomError("unsupported", f"'{name}' is not supported by this server", {"param": name})
        return {key: value for key, value in data.items() if value is not None}

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float, info: ValidationInfo) -> float:
        if value != 0:
            raise PydanticCustomError("unsupported", f"'{info.field_name}' is not supported by this server (only 0)")
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        most = _limits(info).max_tokens
        if value is not None and value > most:
            raise PydanticCustomError("max_tokens_out_of_range", f"'{info.field_name}' must be between 1 and {most}; "
                                      f"got {value}")
        return value

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of not in (None, 1, self.n):
            raise PydanticCustomError("unsupported", "'best_of' is not supported by this server", {"param": "best_of"})
        return self

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                              seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Generation):
    """The body of ``POST /v1/completions``."""

    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)] = _field(
        ..., "a string, a list of strings, token ids, or a list of those", "several prompts give several choices")
    echo: bool = _field(False, "true or false", "the prompt is put in front of the text")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class ChatRequest(_Generation):
    """The body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)] = _field(
        ..., "a non-empty list of {role, content} objects (content: a string or a list of text parts)",
        "made a prompt by the tokenizer's chat template, with the generation prompt added")
    max_completion_tokens: int | None = _field(None, "a whole number from 1 to --max-tokens",
                                               "the same as max_tokens (OpenAI's newer name); this one wins", ge=1)


class PrefixLoad(BaseModel):
    """The body of ``POST /v1/prefixes/NAME``."""

    model_config = _CONFIG
    path: str = _field(..., "the folder of a saved prefix inside a --prefix-dir", "read on a loader thread",
                       min_length=1, max_length=4096, pattern=r"^[^\x00]*$")


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


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


# ---------------------------------------------------------------- checking
def parse(raw: bytes, kind: type[BaseModel], limits: Limits | None = None) -> BaseModel:
    """``raw`` as a ``kind`` body: valid JSON, an object, shallow, valid Unicode, then the model's
    fields; any refusal is a 400 naming the field."""
    body = read_json(raw)
    try:
        return kind.model_validate(body, context={"limits": limits or Limits()})
    except pydantic.ValidationError as err:
        raise _refusal(err.errors(include_url=False)[0], kind) from None


def read_json(raw: bytes) -> dict:
    """The body as a JSON object, no deeper than :data:`MAX_DEPTH`, every string valid Unicode."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, an integer of 4,300+ digits
        raise errors.bad_request(f"the body is not valid JSON: {str(err)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise errors.bad_request("the body must be a JSON object", code="invalid_json")
    _check_depth(body)
    _check_text(body)
    return body


def _check_depth(body: dict) -> None:
    """Walk the body level by level (each value once) and refuse it past :data:`MAX_DEPTH`."""
    level = [body]
    for _ in range(MAX_DEPTH):
        level = [child for value in level for child in (value.values() if isinstance(value, dict) else value)
                 if isinstance(child, (dict, list))]
        if not level:
            return
    raise errors.bad_request(f"the body nests arrays and objects deeper than {MAX_DEPTH} levels, which no OpenAI "
                             "request needs", code="too_deep")


def _check_text(body: dict) -> None:
    """Refuse a lone surrogate anywhere (keys too): one encode of the whole body, then, only if it
    fails, one per top-level field to name it."""
    if _encodes(body):
        return
    bad = next((key for key, value in body.items() if not _encodes(key) or not _encodes(value)), None)
    param = bad if bad is not None and _encodes(bad) else None
    raise errors.bad_request(f"{'body' if param is None else repr(param)} holds a lone surrogate (an unpaired "
                             "\\ud800-\\udfff escape), which is not valid Unicode text", param=param,
                             code="invalid_text")


def _encodes(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refusal(error: dict, kind: type[BaseModel]) -> errors.APIError:
    """pydantic's first error as a 400 in OpenAI's format: the field as ``param``, what it must be, and
    (for this server's own rules) the rule's name as ``code``."""
    loc = error.get("loc", ())
    param = (error.get("ctx") or {}).get("param") or _param(loc)
    if error["type"] in ("unsupported", "max_tokens_out_of_range"):
        return errors.bad_request(error["msg"], param=param, code=error["type"])
    field = kind.model_fields.get(loc[0]) if loc else None
    expects = (field.json_schema_extra or {}).get("expects", "") if field is not None else ""
    if error["type"] == "missing":
        return errors.bad_request(f"'{param}' is required: {expects}", param=param)
    return errors.bad_request(f"'{param}' must be {expects or error['msg'].lower()}; got {_shown(error['input'])}",
                              param=param)


def _param(loc: tuple) -> str | None:
    """``("messages", 0, "content", ...)`` -> ``"messages[0]"``: the field, and which item of a list."""
    if not loc:
        return None
    return str(loc[0]) + (f"[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else "")


def _shown(value, most: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


def check_count(prompts: int, n: int, max_queue: int) -> None:
    """More generations (prompts x ``n``) than the queue can ever hold is a 400, not a 429: no retry would
    help. Checked before any prompt is tokenized."""
    if prompts * n > max_queue:
        raise errors.bad_request(f"{prompts} prompt(s) x n={n} is {prompts * n} generations; this server queues at "
                                 f"most {max_queue}: send fewer per request", param="prompt",
                                 code="too_many_generations")


# ---------------------------------------------------------------- jobs
def completion_job(raw: bytes, tokenizer, limits: Limits, context_length: int) -> Job:
    """Check a ``/v1/completions`` body and tokenize its prompts."""
    request = parse(raw, CompletionRequest, limits)
    items = request.prompts()
    check_count(len(items), request.n, limits.max_queue)
    texts, prompts = zip(*(_tokenized(item, tokenizer) for item in items))
    max_tokens = request.max_tokens or min(COMPLETION_MAX_TOKENS, limits.max_tokens)
    _check_lengths(prompts, max_tokens, limits, context_length, "prompt")
    return Job("completion", request.model, list(prompts), request.sampling(max_tokens), request.n,
               request.stream, _usage_wanted(request), echo=list(texts) if request.echo else None)


def chat_job(raw: bytes, tokenizer, limits: Limits, context_length: int) -> Job:
    """Check a ``/v1/chat/completions`` body; the prompt is the tokenizer's chat template."""
    request = parse(raw, ChatRequest, limits)
    check_count(1, request.n, limits.max_queue)
    if getattr(tokenizer, "chat_template", None) is None:
        raise errors.bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template's own complaint (e.g. role order) is the client's
        raise errors.bad_request(f"the chat template refused these messages: {str(err)[:200]}",
                                 param="messages") from None
    ids = tokenizer(text, add_special_tokens=False).input_ids
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.max_tokens
    _check_lengths([ids], max_tokens, limits, context_length, "messages")
    return Job("chat", request.model, [ids], request.sampling(max_tokens), request.n, request.stream,
               _usage_wanted(request))


def prefix_load(raw: bytes) -> str:
    """The folder of an admin load."""
    return parse(raw, PrefixLoad).path


def _usage_wanted(request: _Generation) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


def _tokenized(item: str | list[int], tokenizer) -> tuple[str, list[int]]:
    """One prompt's text and token ids (ids must lie in the vocabulary)."""
    if isinstance(item, str):
        ids = tokenizer(item).input_ids
        if not ids:
            raise errors.bad_request("the prompt has no tokens", param="prompt")
        return item, ids
    if max(item) >= len(tokenizer):
        raise errors.bad_request(f"token id {max(item)} is outside the vocabulary", param="prompt")
    return tokenizer.decode(item), list(item)


def _check_lengths(prompts, max_tokens: int, limits: Limits, context_length: int, param: str) -> None:
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_tokens:
        raise errors.APIError(413, f"the prompt has {longest} tokens; this server accepts at most "
                              f"{limits.max_prompt_tokens}", param=param, code="prompt_too_long")
    if longest + max_tokens > context_length:
        raise errors.bad_request(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"model's context length ({context_length})", param="max_tokens",
                                 code="context_length_exceeded")


# ---------------------------------------------------------------- generated documentation
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
          "/v1/prefixes/{name}": PrefixLoad}


def openapi() -> dict:
    """An OpenAPI 3.1 description of the request bodies the server accepts (``GET /openapi.json``)."""
    from pydantic.json_schema import models_json_schema

    _, schemas = models_json_schema([(m, "validation") for m in BODIES.values()],
                                    ref_template="#/components/schemas/{model}")
    paths = {path: {"post": {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}} for path, model in BODIES.items()}
    return {"openapi": "3.1.0", "info": {"title": "prefixtune serve", "version": "1"}, "paths": paths,
            "components": {"schemas": schemas.get("$defs", {})}}


def field_table() -> str:
    """The request fields as a Markdown table (docs/serving.md holds this text; a test keeps it so)."""
    rows = ["| field | route | must be | what it does |", "|---|---|---|---|"]
    shared = set(_Generation.model_fields)
    for kind, route in ((_Generation, "both"), (CompletionRequest, "completions"), (ChatRequest, "chat")):
        for name, field in kind.model_fields.items():
            if kind is _Generation or name not in shared:
                rows.append(f"| `{name}` | {route} | {field.json_schema_extra['expects']} | {field.description} |")
    refused = ", ".join(f"`{name}`" for name in UNSUPPORTED)
    return "\n".join(rows) + f"\n\nRefused by name (400, `code: \"unsupported\"`) unless null or empty: {refused}.\n"
