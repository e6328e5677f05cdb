"""The OpenAI HTTP schema (the subset served), as pydantic models.

Requests accept unknown fields (clients send many) but refuse the ones we
know and do not implement when they are set to anything but their no-op
value, so a client never silently gets something other than it asked for.
`top_k` and `ignore_eos` are extensions, as in vLLM.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from bdlora_ray.errors import InvalidRequest
from bdlora_ray.request import SamplingParams

# Pydantic turns a ValueError raised in a validator into a validation error
# located at the field, which the API answers with 400 and `param` = the field.


def check_unicode(value: Any) -> Any:
    """`value` unchanged if every string in it (nested lists and dicts included) is valid Unicode.

    JSON can spell a lone UTF-16 surrogate (`"\\ud800"`), and Python's JSON reader also lets the raw
    UTF-8 bytes of one through; such a string cannot be tokenized, encoded or sent back, so it is
    refused here, before anything else sees it (ValueError: the field's 400).
    """
    for s in _strings(value):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: lone surrogate U+{ord(s[e.start]):04X} at character "
                             f"{e.start}") from None
    return value


def _strings(value: Any) -> Any:
    """Every string in `value`, dict keys included; iterative, so no JSON depth can exhaust the stack."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_TOKENS_LIMIT = 1 << 20  # far above any context; the context length is the real limit, checked later


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN/Infinity: JSON extensions Python accepts

    model: str = Field(min_length=1, max_length=256)  # an adapter name, or the base model's
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @field_validator("model", "stop", "user")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return check_unicode(v)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    @classmethod
    def _not_implemented(cls, v: Any) -> Any:
        if v not in (None, False, 0, {}):
            raise ValueError("not supported")
        return v

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=stop, ignore_eos=self.ignore_eos)
        params.validate()
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _not_implemented_here(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _valid_unicode_prompt(cls, v: Any) -> Any:
        return check_unicode(v)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, p: Any) -> str | list[int]:
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("one prompt per request: batched prompts are not supported")
            return p[0]
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return check_unicode(v)

    def text(self) -> str:
        """The message's text; content parts must all be text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") not in (None, "text"):
            raise ValueError("only text responses are supported")
        return v

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterLoadRequest(BaseModel):
    name: str = Field(min_length=1, max_length=256)

    @field_validator("name")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return check_unicode(v)


# ---- responses ---------------------------------------------------------------

class _OmitWhenNone(BaseModel):
    """Leaves out the fields in `_omit` when they are None, as OpenAI does (e.g. `usage` of chunks)."""

    _omit: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (v is None and k in self._omit)}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Choice(BaseModel):
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChoice(_Choice):
    text: str


class _Completion(_OmitWhenNone):
    """What every completion object has; `usage` is left out when None (stream chunks)."""

    _omit = ("usage",)

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionResponse(_Completion):  # also each streamed chunk of /v1/completions
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: ChatResponseMessage


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(_OmitWhenNone):
    _omit = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Completion):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "bdlora"
    root: str | None = None        # the base model every card serves
    parent: str | None = None      # adapters: the base model
    rank: int | None = None        # adapters: LoRA rank
    mode: str | None = None        # adapters: bd | slora | replicated


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


MAX_ERROR_MESSAGE_CHARS = 2048  # messages and params can quote client input: keep the answer bounded


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. What is quoted from a request (a field path can hold a dict key the
    client sent) is made encodable and bounded, so that the error itself can always be sent."""
    return {"error": {"message": _sendable(message), "type": type_, "param": _sendable(param), "code": code}}


def _sendable(text: str | None) -> str | None:
    if text is None:
        return None
    if len(text) > MAX_ERROR_MESSAGE_CHARS:
        text = text[:MAX_ERROR_MESSAGE_CHARS] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate becomes the text \udXXX


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status (OpenAI itself uses invalid_request_error even for 401 and 404)."""
    return "invalid_request_error" if status < 500 else "server_error"
