"""What goes into the engine and what comes out of it (no HTTP, no Ray)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from bdlora_ray.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16            # new tokens at most
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0              # nucleus mass kept, (0, 1]
    top_k: int = 0                  # 0 = no top-k cut
    seed: int | None = None         # per-request RNG seed (reproducible sampling)
    stop: tuple[str, ...] = ()      # stop strings, excluded from the output
    ignore_eos: bool = False        # keep going past EOS (benchmarks)
    # Logits processing (OpenAI / vLLM semantics), applied in this order before temperature:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to its logit
    repetition_penalty: float = 1.0   # HF/vLLM: tokens in prompt+output: logit / p if > 0 else logit * p
    frequency_penalty: float = 0.0    # OpenAI: logit -= f * (times the token is in the output)
    presence_penalty: float = 0.0     # OpenAI: logit -= p * (token is in the output)
    min_tokens: int = 0               # no EOS (nor stop string) before this many new tokens
    guide: StructuredOutput | None = None  # constrain the output to a grammar (structured output)
    logprobs: int | None = None       # None: none; k >= 0: the chosen token's logprob and the top k

    def validate(self) -> None:
        if not 1 <= self.max_tokens <= 1 << 20:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidRequest("stop: at most 16 non-empty strings of at most 256 characters")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 63):
            raise InvalidRequest("seed must fit in 64 bits")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise InvalidRequest(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, biases in [-100, 100]")
        if any(t < 0 for t, _ in self.logit_bias):
            raise InvalidRequest("logit_bias: token ids must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs / top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_LOGPROBS = 20     # OpenAI's top_logprobs limit


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (compiled by `bdlora_ray.guided`)."""

    kind: str                       # "json": any JSON object | "json_schema" | "regex"
    spec: str = ""                  # the JSON schema (as JSON text) or the regex


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str = ""                 # its text, filled by the serving layer (off the step loop)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (raw logits, before any processing) and the
    `top` most likely tokens at that position."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()
    token: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]     # tokenized prompt (the serving layer tokenizes)
    adapter: str | None             # adapter name, None = base model
    params: SamplingParams = field(default_factory=SamplingParams)
    # False: the reader wants the whole output, not its steps; a group then wakes it for the first
    # event (errors, adapter affinity) and the last (every event since merged into it) only.
    stream: bool = True


@dataclass(frozen=True)
class RequestOutput:
    """One streamed event of a request: new tokens and text since the last one."""

    request_id: str
    token_ids: tuple[int, ...]      # tokens added by this event
    text: str                       # text added by this event
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0      # total so far
    error: str | None = None        # message when finish_reason == "error"
    error_status: int | None = None  # HTTP status for that error
    error_type: str | None = None   # class name of the typed error (bdlora_ray.errors)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of `token_ids`, if requested


def merge_outputs(outs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive events of one request as one: their tokens and text joined, the rest the last's."""
    if not outs:
        raise ValueError("nothing to merge")
    if len(outs) == 1:
        return outs[0]
    if len({o.request_id for o in outs}) != 1 or any(o.finished for o in outs[:-1]):
        raise ValueError("only consecutive events of one unfinished request can be merged")
    last = outs[-1]
    logprobs = None if all(o.logprobs is None for o in outs) else tuple(
        lp for o in outs for lp in (o.logprobs or ()))
    return dataclasses.replace(last, token_ids=tuple(t for o in outs for t in o.token_ids),
                               text="".join(o.text for o in outs), logprobs=logprobs)


async def coalesced(events: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """`events` read ahead by a task of its own; what arrived while the consumer was busy comes out
    merged into one event (as vLLM's output collector does). Under load every hop of a stream then
    carries one item per consumer turn instead of one per token; an idle consumer sees every event.

    An error of `events` is raised after the events before it. Closing this generator cancels the
    read-ahead, which closes `events` (so that an unfinished request is aborted upstream).
    """
    pending: list[RequestOutput] = []
    arrived = asyncio.Event()
    ended: list[BaseException | None] = []     # [error or None] once `events` is exhausted

    async def pump() -> None:
        try:
            async for ev in events:
                pending.append(ev)
                arrived.set()
            ended.append(None)
        except BaseException as e:  # handed to the consumer, raised there (a cancellation too)
            ended.append(e)
            if not isinstance(e, Exception):
                raise
        finally:
            arrived.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if not pending and not ended:
                await arrived.wait()
                arrived.clear()
            if pending:
                batch = pending[:]
                pending.clear()
                yield merge_outputs(batch)
            elif ended:
                if ended[0] is not None:
                    raise ended[0]
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
