"""The OpenAI-compatible HTTP API (FastAPI) over a `Router` of replica groups.

    POST   /v1/completions, /v1/chat/completions   `model` = adapter name, the base model's name,
                                                   or `base:adapter` (Ray Serve LLM's form)
    GET    /v1/models, /v1/models/{id}             base model + adapters in the store
    POST   /v1/adapters {"name"}                   load (admin)
    DELETE /v1/adapters/{name}                     unload from every group (admin)
    POST   /v1/load_lora_adapter, /v1/unload_lora_adapter {"lora_name"}   vLLM's spelling of both (admin)
    GET    /health, /metrics

`n` choices and a list of prompts fan out into one engine request per choice
(index = prompt * n + j; choice j > 0 of a seeded request uses seed + j, as
vLLM does); they are batched together by the engine like any requests.

Every error is OpenAI's body `{"error": {message, type, param, code}}` with
the typed error's status (503s with Retry-After); FastAPI's validation errors
become 400. Streams are server-sent events ending with `data: [DONE]`. A
request's first engine event is awaited before the response starts, so an
unknown adapter is a 404 even with `stream: true`; a client that disconnects
mid-stream has its request aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bdlora_ray.errors import AdapterNotFound, BdloraError, InvalidRequest, error_from_name, log_incident
from bdlora_ray.request import RequestOutput, SamplingParams, TokenLogprob, coalesced
from bdlora_ray.store.manifest import check_name
from deploy.config import ApiConfig
from deploy.metrics import ApiMetrics
from deploy.protocol import (
    AdapterLoadRequest,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    LoraAdapterRequest,
    ModelCard,
    ModelList,
    Usage,
    chat_logprobs,
    completion_logprobs,
    error_body,
    error_type,
)
from deploy.routing import Router
from deploy.serving import ErrorInfo, PromptInput

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_SEQUENCES = 64                  # engine requests (prompts x n) one API request may start


class Unauthorized(BdloraError):
    http_status = 401
    code = "invalid_api_key"


def error_response(status: int, message: str, code: str | None, param: str | None = None,
                   retry_after_s: float | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return JSONResponse(error_body(message, error_type(status), code, param), status_code=status, headers=headers)


def _bdlora_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, BdloraError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else None
    if e.http_status >= 500:
        log.warning("%s: %s", type(e).__name__, e)
    return error_response(e.http_status, str(e), e.code, retry_after_s=getattr(e, "retry_after_s", None),
                          headers=headers)


def _validation_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc is ("body", byte offset), not a field
        loc = first.get("loc", ())
        where = f" at byte {loc[-1]}" if len(loc) > 1 else ""
        why = first.get("ctx", {}).get("error", "JSON decode error")
        return error_response(400, f"the request body is not valid JSON ({why}{where})", "invalid_request_error")
    loc = [str(x) for x in first.get("loc", ())]
    param = ".".join(loc[1:] if loc[:1] == ["body"] else loc[-1:]) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return error_response(400, f"{param}: {msg}{more}" if param else msg + more, "invalid_request_error", param)


def _http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    return error_response(e.status_code, str(e.detail), None, headers=getattr(e, "headers", None))


def _internal_error(_: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal server error (error id {log_incident(log, 'internal error', e)})",
                          "internal_error")


class BodyLimit:
    """413 for request bodies above `max_bytes` (declared or actual), before the app reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        too_large = error_response(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break  # disconnected before the body arrived: the app will see it
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later messages (http.disconnect) as they come

        await self.app(scope, replay, send)


class RequestMetrics:
    """Counts every HTTP request by route template and status, and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500

        async def send_(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            # The router stores the matched route in the scope; its template keeps labels bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - start)


class SSEResponse(StreamingResponse):
    """Server-sent events; the event generator is closed however the response ends (disconnect included)."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            log.info("client disconnected mid-stream")  # nobody left to answer; closing aborts the request
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json or literal>` and a blank line."""
    if not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        # JSON leaves these raw, and line readers that split like str.splitlines (httpx's iter_lines)
        # would cut the event in two: escape them (valid JSON either way).
        data = data.translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


class _Format:
    """How one endpoint renders events: OpenAI's completion or chat objects."""

    prefix = "cmpl"

    def opening(self, rid: str, model: str, index: int) -> list[dict]:
        return []

    def logprobs(self, lps: tuple[TokenLogprob, ...] | None, offset: int) -> dict | None:
        return None if lps is None else completion_logprobs(lps, offset)

    def chunk(self, rid: str, model: str, index: int, text: str, finish: str | None,
              logprobs: dict | None = None) -> list[dict]:
        if not text and finish is None:
            return []  # e.g. a token that ends mid-way through a UTF-8 character
        return [CompletionResponse(id=rid, model=model, choices=[
            {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]).model_dump()]

    def usage_chunk(self, rid: str, model: str, usage: Usage) -> dict:
        return CompletionResponse(id=rid, model=model, choices=[], usage=usage).model_dump()

    def response(self, rid: str, model: str, choices: list[tuple[int, str, str | None, dict | None]],
                 usage: Usage) -> dict:
        return CompletionResponse(id=rid, model=model, usage=usage, choices=[
            {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}
            for i, text, finish, lp in choices]).model_dump()


class _ChatFormat(_Format):
    prefix = "chatcmpl"

    def opening(self, rid: str, model: str, index: int) -> list[dict]:
        return [ChatCompletionChunk(id=rid, model=model, choices=[
            {"index": index, "delta": {"role": "assistant", "content": ""}}]).model_dump()]

    def logprobs(self, lps: tuple[TokenLogprob, ...] | None, offset: int) -> dict | None:
        return None if lps is None else chat_logprobs(lps)

    def chunk(self, rid: str, model: str, index: int, text: str, finish: str | None,
              logprobs: dict | None = None) -> list[dict]:
        out = []
        if text or logprobs:
            out.append(ChatCompletionChunk(id=rid, model=model, choices=[
                {"index": index, "delta": {"content": text}, "logprobs": logprobs}]).model_dump())
        if finish is not None:  # OpenAI ends with an empty delta carrying the finish reason
            out.append(ChatCompletionChunk(id=rid, model=model,
                                           choices=[{"index": index, "delta": {}, "finish_reason": finish}]).model_dump())
        return out

    def usage_chunk(self, rid: str, model: str, usage: Usage) -> dict:
        return ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage).model_dump()

    def response(self, rid: str, model: str, choices: list[tuple[int, str, str | None, dict | None]],
                 usage: Usage) -> dict:
        return ChatCompletionResponse(id=rid, model=model, usage=usage, choices=[
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": lp}
            for i, text, finish, lp in choices]).model_dump()


def _engine_error(ev: RequestOutput) -> ErrorInfo:
    """A request's error event as the typed error it stands for (its code and Retry-After included)."""
    message = ev.error or "generation failed"
    e = error_from_name(ev.error_type, message)
    known = type(e) is not BdloraError
    if not known and ev.error_type:  # an unexpected exception's text is not for clients: the log has it
        message = f"generation failed (error id {log_incident(log, f'{ev.error_type}: {message}')})"
    return ErrorInfo(ev.error_status or e.http_status, e.code if known else "generation_error", message,
                     getattr(e, "retry_after_s", None))


class _Accounting:
    """Token counts of one request, reported to the metrics once when it ends."""

    def __init__(self, metrics: ApiMetrics, adapter: str | None, start: float) -> None:
        self.metrics, self.adapter, self.start = metrics, adapter, start
        self.prompt = self.completion = 0
        self.first_token = False
        self.done = False

    def see(self, ev: RequestOutput) -> None:
        self.prompt = max(self.prompt, ev.prompt_tokens)
        self.completion = max(self.completion, ev.completion_tokens)
        if ev.token_ids and not self.first_token:
            self.first_token = True
            self.metrics.ttft.observe(time.monotonic() - self.start)

    def usage(self) -> Usage:
        return Usage.of(self.prompt, self.completion)

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.generation_done(self.adapter, self.prompt, self.completion)


@dataclasses.dataclass
class _Run:
    """One choice of a response: its engine request and what has come of it."""

    index: int                                   # choices[index]
    inp: PromptInput
    prompt: int                                  # which prompt (usage counts each prompt once)
    echo: str = ""                               # the prompt text, when echoed
    events: AsyncGenerator[RequestOutput, None] | None = None
    first: RequestOutput | None = None
    acct: _Accounting | None = None
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    chars: int = 0                               # characters of text so far (completions' text_offset)


def _choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n: its own seed (seed + j), so that every choice differs and all reproduce."""
    return params if j == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + j)


def _usage(runs: list[_Run]) -> Usage:
    prompts: dict[int, int] = {}
    for r in runs:
        prompts[r.prompt] = max(prompts.get(r.prompt, 0), r.acct.prompt)
    return Usage.of(sum(prompts.values()), sum(r.acct.completion for r in runs))


def _first_error(e: BaseException) -> BaseException:
    """The error a response reports for a failed group of choices (a typed one if there is one)."""
    while isinstance(e, BaseExceptionGroup):
        typed = [x for x in e.exceptions if isinstance(x, BdloraError)]
        e = (typed or list(e.exceptions))[0]
    return e


async def _each(runs: list[_Run], step: Any) -> None:
    """`await step(run)` for every run, concurrently (directly for one); the first failure cancels the
    others and is raised."""
    if len(runs) == 1:
        await step(runs[0])
        return
    try:
        async with asyncio.TaskGroup() as tg:
            for r in runs:
                tg.create_task(step(r))
    except BaseExceptionGroup as eg:
        raise _first_error(eg) from None


async def _merged(runs: list[_Run]) -> AsyncIterator[tuple[_Run, RequestOutput | BdloraError]]:
    """Every run's events (from its first) as they come, across runs; a run's error ends its events."""
    async def events_of(r: _Run) -> AsyncIterator[RequestOutput | BdloraError]:
        ev = r.first
        while True:
            yield ev
            if ev.finished:
                return
            try:
                ev = await anext(r.events)
            except BdloraError as e:
                yield e
                return

    if len(runs) == 1:  # the common case: no task, no queue
        async for ev in events_of(runs[0]):
            yield runs[0], ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(r: _Run) -> None:
        try:
            async for ev in events_of(r):
                await queue.put((r, ev))
        finally:
            await queue.put((r, None))

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    try:
        live = len(runs)
        while live:
            r, ev = await queue.get()
            if ev is None:
                live -= 1
            else:
                yield r, ev
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIRoutes:
    """The API's route handlers, one method per route; `make_api` registers them (see `ROUTES`)."""

    def __init__(self, router: Router, config: ApiConfig, metrics: ApiMetrics) -> None:
        self.router, self.config, self.metrics = router, config, metrics

    # ---- routes ---------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest) -> Response:
        params = body.sampling_params(body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)
        adapter, prompts = self.adapter_of(body.model), body.prompts()
        if len(prompts) * body.n > MAX_SEQUENCES:
            raise InvalidRequest(f"prompts x n is {len(prompts) * body.n}; at most {MAX_SEQUENCES} in one request")
        if body.echo and (body.logprobs is not None or not all(isinstance(p, str) for p in prompts)):
            raise InvalidRequest("echo is supported for text prompts without logprobs")
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = [_Run(i * body.n + j, PromptInput(
            rid if len(prompts) * body.n == 1 else f"{rid}-{i * body.n + j}", adapter, _choice_params(params, j),
            text=p if isinstance(p, str) else None, token_ids=None if isinstance(p, str) else tuple(p),
            stream=body.stream), i, echo=p if body.echo else "")
            for i, p in enumerate(prompts) for j in range(body.n)]
        return await self.generate(rid, body.model, runs, body.stream, body.include_usage, _Format())

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        adapter = self.adapter_of(body.model)
        wanted = body.requested_max_tokens
        params = body.sampling_params(wanted or 1)  # without max_tokens: the rest of the context, set by the group
        messages = tuple((m["role"], m["content"]) for m in body.chat())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        runs = [_Run(j, PromptInput(rid if body.n == 1 else f"{rid}-{j}", adapter, _choice_params(params, j),
                                    messages=messages, max_tokens_from_context=wanted is None, stream=body.stream), 0)
                for j in range(body.n)]
        return await self.generate(rid, body.model, runs, body.stream, body.include_usage, _ChatFormat())

    async def models(self) -> dict:
        return ModelList(data=await self._cards()).model_dump()

    async def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: the card of the base model or of an adapter (also as `base:adapter`)."""
        adapter = self.adapter_of(model_id)
        for card in await self._cards():
            if card.id == (adapter or self.config.model_name):
                return card.model_copy(update={"id": model_id}).model_dump()
        raise AdapterNotFound(f"model {model_id!r} not found")

    async def _cards(self) -> list[ModelCard]:
        base = self.config.model_name
        cards = [ModelCard(id=base, root=base)]
        adapters = await self.router.list_adapters()
        self.metrics.unservable_adapters.set(sum(1 for a in adapters if a.get("error")))
        for a in adapters:
            if a.get("error"):
                continue  # in the store but not servable here (the store logged why; `bdlora ls` shows it)
            cards.append(ModelCard(id=a["name"], root=base, parent=base, rank=a.get("rank"), mode=a.get("mode")))
        return cards

    async def load_adapter(self, body: AdapterLoadRequest) -> dict:
        name = check_name(body.name)
        await self.router.load_adapter(name)
        return {"object": "adapter", "name": name, "status": "loaded"}

    async def unload_adapter(self, name: str) -> dict:
        name = check_name(name)
        groups = await self.router.unload_adapter(name)
        return {"object": "adapter", "name": name, "status": "unloaded", "groups": groups}

    async def load_lora_adapter(self, body: LoraAdapterRequest) -> Response:
        """vLLM's POST /v1/load_lora_adapter: the adapter named `lora_name` from the adapter store."""
        name = self.adapter_of(body.lora_name) or ""
        await self.load_adapter(AdapterLoadRequest(name=name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: LoraAdapterRequest) -> Response:
        name = self.adapter_of(body.lora_name) or ""
        await self.unload_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(self) -> dict:
        await self.router.check_health()
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        try:
            self.metrics.groups.update(await self.router.stats())
        except BdloraError as e:
            log.warning("no engine stats for /metrics: %s", e)
            self.metrics.groups.update([])
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- shared by the routes -------------------------------------------------------------------

    def require_admin(self, request: Request) -> None:
        """A dependency of the admin routes: 401 unless the request carries the admin token (if one is set)."""
        admin_token = self.config.admin_token
        if not admin_token:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <admin token>'")

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names (`adapter` or `base:adapter`); None for the base model."""
        base = self.config.model_name
        if model == base:
            return None
        return check_name(model.removeprefix(base + ":"))

    async def generate(self, rid: str, model: str, runs: list[_Run], stream: bool, include_usage: bool,
                       fmt: _Format) -> Response:
        """Runs the choices of one response: a JSON response, or an SSE stream once every choice's first
        event has arrived (so that typed errors are HTTP errors)."""
        start = time.monotonic()
        for r in runs:
            # What came while a chunk was being sent goes as one.
            r.events, r.acct = coalesced(self.router.generate(r.inp)), _Accounting(self.metrics, r.inp.adapter, start)

        async def first(r: _Run) -> None:
            r.first = await anext(r.events)

        try:
            await _each(runs, first)
        except BaseException:
            await _close(runs, accepted=False)
            raise
        if stream:
            return SSEResponse(_stream(runs, rid, model, include_usage, fmt),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await _each(runs, _collect)
        finally:
            await _close(runs)  # early exit (cancelled: client gone) aborts the requests
        return JSONResponse(fmt.response(rid, model, [
            (r.index, r.echo + "".join(r.text), r.first.finish_reason,
             fmt.logprobs(tuple(r.logprobs), len(r.echo)) if r.inp.params.logprobs is not None else None)
            for r in runs], _usage(runs)))


async def _close(runs: list[_Run], accepted: bool = True) -> None:
    for r in runs:
        if accepted:
            r.acct.end()
        await r.events.aclose()  # an unfinished request is aborted


async def _collect(r: _Run) -> None:
    """A choice's events to its end (r.first becomes the last); its engine error is raised."""
    ev = r.first
    while True:
        r.acct.see(ev)
        r.text.append(ev.text)
        r.logprobs.extend(ev.logprobs or ())
        if ev.finished:
            break
        ev = await anext(r.events)
    r.first = ev
    if ev.finish_reason == "error":
        raise _engine_error(ev).error()


async def _stream(runs: list[_Run], rid: str, model: str, include_usage: bool, fmt: _Format) -> AsyncIterator[str]:
    """The server-sent events of a response's choices, from their first engine events; ends with [DONE].
    The events that one engine event makes (with the first, the openings; with the last, the finish,
    usage and [DONE] events) go out as one piece: one message per engine event through the serving path."""
    try:
        out = [sse(c) for r in runs for c in fmt.opening(rid, model, r.index)]
        failed = False
        async for r, ev in _merged(runs):
            if isinstance(ev, BdloraError):  # headers are sent: report it in the stream
                out.append(sse(error_body(str(ev), error_type(ev.http_status), ev.code)))
                failed = True
                break
            r.acct.see(ev)
            if ev.finish_reason == "error":
                e = _engine_error(ev)
                out.append(sse(error_body(e.message, error_type(e.status), e.code)))
                failed = True
                break
            text, r.echo = r.echo + ev.text, ""
            logprobs = fmt.logprobs(ev.logprobs, r.chars) if ev.logprobs is not None else None
            r.chars += len(text)
            out += [sse(c) for c in fmt.chunk(rid, model, r.index, text, ev.finish_reason if ev.finished else None,
                                              logprobs)]
            if out and not (ev.finished and len(runs) == 1):  # the last event's go with the rest, below
                yield "".join(out)
                out = []
        if include_usage and not failed:
            out.append(sse(fmt.usage_chunk(rid, model, _usage(runs))))
        out.append(sse("[DONE]"))
        yield "".join(out)
    finally:
        await _close(runs)  # not finished (client gone): aborts the requests


# (method, path, OpenAIRoutes handler, needs the admin token)
ROUTES: tuple[tuple[str, str, str, bool], ...] = (
    ("POST", "/v1/completions", "completions", False),
    ("POST", "/v1/chat/completions", "chat_completions", False),
    ("GET", "/v1/models", "models", False),
    ("GET", "/v1/models/{model_id:path}", "model", False),
    ("POST", "/v1/adapters", "load_adapter", True),
    ("DELETE", "/v1/adapters/{name}", "unload_adapter", True),
    ("POST", "/v1/load_lora_adapter", "load_lora_adapter", True),
    ("POST", "/v1/unload_lora_adapter", "unload_lora_adapter", True),
    ("GET", "/health", "health", False),
    ("GET", "/metrics", "prometheus", False),
)


def make_api(router: Router, config: ApiConfig, metrics: ApiMetrics | None = None) -> FastAPI:
    """The FastAPI app: `OpenAIRoutes` at `ROUTES`, with the error handlers and middleware."""
    metrics = metrics or ApiMetrics(config.max_adapter_labels)
    api = FastAPI(title="bdlora-ray", summary="OpenAI-compatible API: one Llama, thousands of LoRA adapters")
    api.add_exception_handler(BdloraError, _bdlora_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _internal_error)
    api.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    api.add_middleware(RequestMetrics, metrics=metrics)  # added last = outermost: sees 413s too
    if not config.admin_token:
        log.warning("BDLORA_ADMIN_TOKEN is not set: POST/DELETE /v1/adapters are open to any client")
    routes = OpenAIRoutes(router, config, metrics)
    for method, path, handler, admin in ROUTES:
        api.add_api_route(path, getattr(routes, handler), methods=[method],
                          dependencies=[Depends(routes.require_admin)] if admin else None)
    return api
