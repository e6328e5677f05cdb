"""What a replica group does with one API request, next to its `EngineGroup`.

The ingress parses and validates HTTP; the group side (here) owns the
tokenizer, so it tokenizes (chat template included), checks the context
length, runs the request on the engine and, if the consumer goes away before
the last event (client disconnect: the stream is cancelled or closed), aborts
it so its sequence stops using the batch and the page pool.

`ErrorInfo` carries a typed error across a process boundary as plain data,
so the ingress does not depend on how Ray re-raises remote exceptions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from bdlora_ray.errors import BdloraError, InvalidRequest
from bdlora_ray.request import GenerationRequest, RequestOutput, SamplingParams, merge_outputs
from bdlora_ray.store.manifest import check_name

log = logging.getLogger(__name__)


class Group(Protocol):
    """The part of `bdlora_ray.group.EngineGroup` the serving layer uses."""

    tokenizer: Any
    model_name: str
    max_model_len: int

    def generate(self, req: GenerationRequest) -> AsyncGenerator[RequestOutput, None]: ...
    async def abort(self, request_id: str) -> None: ...
    async def load_adapter(self, name: str) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...
    def resident_adapters(self) -> list[str]: ...
    async def list_adapters(self) -> list[dict]: ...
    async def stats(self) -> dict: ...
    async def pool_usage(self) -> list[dict]: ...
    async def timeline(self, since: float = 0.0) -> dict[str, list]: ...
    async def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class PromptInput:
    """One generation request as the ingress hands it to a group (exactly one prompt field set)."""

    request_id: str
    adapter: str | None                          # None: the base model
    params: SamplingParams                       # validated by the ingress
    text: str | None = None                      # completion prompt
    token_ids: tuple[int, ...] | None = None     # completion prompt, pre-tokenized
    messages: tuple[tuple[str, str], ...] | None = None  # chat: (role, content)
    max_tokens_from_context: bool = False        # chat without max_tokens: the rest of the context
    stream: bool = True                          # False: only the final event (all text) is sent back


@dataclass(frozen=True)
class ErrorInfo:
    """A typed error as data: what the API answers with."""

    status: int                  # HTTP status
    code: str                    # OpenAI-style error code
    message: str
    retry_after_s: float | None = None

    @classmethod
    def of(cls, e: BdloraError) -> ErrorInfo:
        return cls(e.http_status, e.code, str(e), getattr(e, "retry_after_s", None))

    def error(self) -> ApiError:
        return ApiError(self)


class ApiError(BdloraError):
    """A typed error re-raised from `ErrorInfo` on the ingress side."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.http_status, self.code, self.retry_after_s = info.status, info.code, info.retry_after_s


class GroupServer:
    """Serves API requests on one group. `remember(name)`, if given, runs once an adapter has proved
    servable here (its request's first token, or an admin load): the Serve replica registers
    adapter affinity with it.

    Loading itself is the engine's job, not Serve's multiplexing loader: Serve runs loaders one at a
    time per replica and runs a failed one again for each waiting request, so one unreachable or
    broken adapter would stall every other cold adapter and cost one S3 round per waiter. The
    engine fetches each adapter once for all its waiters and fails them all with the same error;
    and a name that does not exist is never registered as affinity.
    """

    def __init__(self, group: Group, remember: Callable[[str], Awaitable[Any]] | None = None,
                 replica: str | None = None) -> None:
        self.group = group
        self.remember = remember
        self.replica = replica  # the Serve replica's id, if any: named in stats()
        # A token's text for logprobs (the token decoded alone, as vLLM shows it; EOS and other special
        # tokens are "", as in the text), cached by id.
        self._token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda t: group.tokenizer.decode([t], skip_special_tokens=True))

    def prepare(self, inp: PromptInput) -> GenerationRequest:
        """Tokenize and check against the context length; InvalidRequest otherwise."""
        tok, limit = self.group.tokenizer, self.group.max_model_len
        if inp.messages is not None:
            chat = [{"role": r, "content": c} for r, c in inp.messages]
            # The ids exactly as the checkpoint's template tokenizes them (no extra BOS: the template has
            # any it wants), as HF `generate` users build their prompts.
            ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        elif inp.text is not None:
            ids = tok.encode(inp.text)
        else:
            ids = list(inp.token_ids or ())
            if any(not 0 <= t < len(tok) for t in ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {len(tok)})")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        room = limit - len(ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; this model's maximum context length "
                                 f"is {limit} tokens")
        params = inp.params
        if inp.max_tokens_from_context:
            params = replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise InvalidRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                 f"exceeds this model's maximum context length of {limit} tokens")
        return GenerationRequest(inp.request_id, tuple(ids), inp.adapter, params, stream=inp.stream)

    async def generate(self, inp: PromptInput) -> AsyncGenerator[RequestOutput, None]:
        """Events of one request; typed errors are raised before the first one. A request that is not
        streamed gets one event, its whole output: no message per step crosses to the ingress."""
        if inp.stream:
            async for out in self._events(inp):
                yield out
            return
        outs: list[RequestOutput] = []
        events = self._events(inp)
        try:
            async for out in events:
                outs.append(out)
        finally:
            await events.aclose()
        yield merge_outputs(outs)

    async def _events(self, inp: PromptInput) -> AsyncGenerator[RequestOutput, None]:
        req = self.prepare(inp)
        stream = self.group.generate(req)
        finished = started = False
        try:
            async for out in stream:
                if not started and inp.adapter is not None and out.finish_reason != "error":
                    await self._remember(inp.adapter)
                started, finished = True, out.finished
                yield self._named(out) if out.logprobs else out
                if finished:
                    return
            raise RuntimeError(f"engine stream of {req.request_id} ended without a final event")
        except BdloraError:
            finished = True  # refused by the engine before it queued anything
            raise
        finally:
            if finished:
                await stream.aclose()
            else:
                # The consumer left early (client disconnect): free the sequence's batch slot and pages.
                # Shielded: a cancelled caller may be cancelled again at any await; the abort must go out.
                await asyncio.shield(self._abort(req.request_id, stream))

    def _named(self, out: RequestOutput) -> RequestOutput:
        """`out` with the text of each token in its logprobs (the engine sends ids only)."""
        text = self._token_text
        return replace(out, logprobs=tuple(
            replace(lp, token=text(lp.token_id), top=tuple(replace(t, token=text(t.token_id)) for t in lp.top))
            for lp in out.logprobs or ()))

    async def _abort(self, request_id: str, stream: AsyncGenerator[RequestOutput, None]) -> None:
        log.info("aborting %s", request_id)
        try:
            await self.group.abort(request_id)
        finally:
            await stream.aclose()

    async def _remember(self, name: str) -> None:
        if self.remember is None:
            return
        try:
            await self.remember(name)
        except Exception:  # affinity is a routing hint: losing it never fails a request
            log.warning("could not register adapter %s for routing", name, exc_info=True)

    async def load_adapter(self, name: str) -> None:
        check_name(name)
        await self.group.load_adapter(name)  # also after an unload: affinity alone does not load
        await self._remember(name)

    async def unload_adapter(self, name: str) -> None:
        await self.group.unload_adapter(check_name(name))

    async def list_adapters(self) -> list[dict]:
        return await self.group.list_adapters()

    async def stats(self) -> dict:
        stats = await self.group.stats()
        return stats if self.replica is None else {**stats, "replica": self.replica}

    async def pool_usage(self) -> list[dict]:
        return await self.group.pool_usage()

    async def check_health(self) -> None:
        await self.group.check_health()
