"""The OpenAI HTTP schema (the subset served), as pydantic models.

Requests accept unknown fields (clients send many) but refuse the ones we
know and do not implement when they are set to anything but their no-op
value, so a client never silently gets something other than it asked for.
`top_k`, `ignore_eos`, `repetition_penalty`, `min_tokens`, `guided_json` and
`guided_regex` are extensions, as in vLLM.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from bdlora_ray.errors import InvalidRequest
from bdlora_ray.request import MAX_LOGPROBS, SamplingParams, StructuredOutput, TokenLogprob

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
MAX_CHOICES = 16            # n, and prompts x n in one completions request: at most this many sequences
MAX_PROMPTS = 64


def structured_output(response_format: dict[str, Any] | None, guided_json: Any = None,
                      guided_regex: str | None = None) -> StructuredOutput | None:
    """The grammar asked for by OpenAI's `response_format` or vLLM's `guided_json` / `guided_regex`
    (at most one of them); ValueError (a 400) for a malformed one."""
    asked = [x for x in (response_format and response_format.get("type") not in (None, "text"),
                         guided_json is not None, guided_regex is not None) if x]
    if len(asked) > 1:
        raise ValueError("give one of response_format, guided_json and guided_regex")
    if guided_regex is not None:
        return StructuredOutput("regex", guided_regex)
    if guided_json is not None:
        return StructuredOutput("json_schema", guided_json if isinstance(guided_json, str) else json.dumps(guided_json))
    kind = (response_format or {}).get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutput("json")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return StructuredOutput("json_schema", json.dumps(schema))
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


class _GenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN/Infinity: JSON extensions Python accepts

    model: str = Field(min_length=1, max_length=256)  # an adapter name, or the base model's
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, max_length=4096)

    @field_validator("model", "stop", "user", "response_format", "guided_json", "guided_regex")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return check_unicode(v)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            if not k.isdigit() or len(k) > 9:
                raise ValueError(f"keys must be token ids, got {k[:20]!r}")
        return v

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        structured_output(v)
        return v

    def guide(self) -> StructuredOutput | None:
        try:
            return structured_output(self.response_format, self.guided_json, self.guided_regex)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token the response shows; None: no logprobs."""
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=stop, ignore_eos=self.ignore_eos,
            logit_bias=tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items())),
            repetition_penalty=self.repetition_penalty or 1.0, frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0, min_tokens=self.min_tokens or 0, guide=self.guide(),
            logprobs=self.top_logprobs_wanted)
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
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("suffix")
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
    def _prompt_count(cls, p: Any) -> Any:
        if isinstance(p, list) and p and isinstance(p[0], (str, list)) and len(p) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        if isinstance(p, list) and not p:
            raise ValueError("the prompt is empty")
        return p

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one completion (times n) each, in order."""
        p = self.prompt
        return list(p) if isinstance(p, list) and isinstance(p[0], (str, list)) else [p]

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @property
    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

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


class LoraAdapterRequest(BaseModel):
    """vLLM's body for /v1/load_lora_adapter and /v1/unload_lora_adapter. Adapters come from the adapter
    store by name: a `lora_path` other than the name is refused, never read as a path."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str | None = None

    @field_validator("lora_name", "lora_path")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return check_unicode(v)

    @field_validator("lora_path")
    @classmethod
    def _no_paths(cls, v: str | None, info: Any) -> str | None:
        if v not in (None, "", info.data.get("lora_name")):
            raise ValueError("adapters are loaded by name from the adapter store (give lora_name only)")
        return v


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
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


def _lp(v: float) -> float:
    return max(v, -9999.0)  # -inf is not JSON (vLLM clamps the same way)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(lps: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """OpenAI chat's `choices[i].logprobs` for the given tokens."""
    return {"content": [{**_entry(lp.token, lp.logprob), "top_logprobs": [_entry(t.token, t.logprob) for t in lp.top]}
                        for lp in lps], "refusal": None}


def completion_logprobs(lps: tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    """OpenAI completions' `choices[i].logprobs`; `offset`: characters of the choice's text before these."""
    text_offset = []
    for lp in lps:
        text_offset.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [{t.token: _lp(t.logprob) for t in lp.top} for lp in lps], "text_offset": text_offset}


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
