"""Merging a request's stream events when the consumer is behind (bdlora_ray.request.coalesced)."""

from __future__ import annotations

import asyncio
import json

import pytest

from bdlora_ray.errors import AdapterNotFound, ReplicaGroupFailed
from bdlora_ray.request import RequestOutput, SamplingParams, coalesced, merge_outputs


def events(n: int, rid: str = "r") -> list[RequestOutput]:
    return [RequestOutput(rid, (i,), f"<{i}>", i == n - 1, "length" if i == n - 1 else None, 5, i + 1)
            for i in range(n)]


def test_merge_joins_tokens_and_text_and_keeps_the_last_state():
    m = merge_outputs(events(4))
    assert m.token_ids == (0, 1, 2, 3) and m.text == "<0><1><2><3>"
    assert m.finished and m.finish_reason == "length" and m.completion_tokens == 4 and m.prompt_tokens == 5
    assert merge_outputs(events(4)[1:2]) == events(4)[1]


@pytest.mark.parametrize("outs", [[], events(2) + events(1), [events(3, "a")[0], events(3, "b")[1]]],
                         ids=["nothing", "finished-in-the-middle", "two-requests"])
def test_merge_refuses_what_is_not_one_request_in_order(outs):
    with pytest.raises(ValueError):
        merge_outputs(outs)


async def producer(evs: list[RequestOutput], log: list[str], error: BaseException | None = None,
                   pause_s: float = 0.0):
    try:
        for ev in evs:
            if pause_s:
                await asyncio.sleep(pause_s)
            log.append(f"yield {ev.token_ids[0]}")
            yield ev
        if error is not None:
            raise error
    finally:
        log.append("closed")


def test_a_slow_consumer_gets_merged_events_with_every_token_in_order():
    async def main():
        log: list[str] = []
        got = []
        async for ev in coalesced(producer(events(50), log)):
            got.append(ev)
            await asyncio.sleep(0.01)  # busy sending the previous chunk
        return got, log

    got, log = asyncio.run(main())
    assert len(got) < 10  # merged: far fewer items than tokens
    assert tuple(t for ev in got for t in ev.token_ids) == tuple(range(50))
    assert "".join(ev.text for ev in got) == "".join(f"<{i}>" for i in range(50))
    assert [ev.finished for ev in got] == [False] * (len(got) - 1) + [True] and got[-1].completion_tokens == 50
    assert log[-1] == "closed"


def test_a_waiting_consumer_gets_every_event_as_it_was():
    async def main():
        return [ev async for ev in coalesced(producer(events(5), [], pause_s=0.01))]

    assert asyncio.run(main()) == events(5)


def test_an_error_is_raised_after_the_events_before_it():
    async def main():
        got = []
        with pytest.raises(ReplicaGroupFailed, match="died"):
            async for ev in coalesced(producer(events(3)[:2], [], ReplicaGroupFailed("rank 1 died"))):
                got.append(ev)
                await asyncio.sleep(0.01)
        return got

    got = asyncio.run(main())
    assert tuple(t for ev in got for t in ev.token_ids) == (0, 1)


def test_an_error_before_any_event_is_raised_on_the_first():
    async def main():
        stream = coalesced(producer([], [], AdapterNotFound("adapter 'x' not found")))
        with pytest.raises(AdapterNotFound):
            await anext(stream)

    asyncio.run(main())


def test_closing_early_closes_the_source_and_stops_reading_it():
    async def main():
        log: list[str] = []
        stream = coalesced(producer(events(1000), log, pause_s=0.001))
        first = await anext(stream)
        await stream.aclose()
        n = len(log)
        await asyncio.sleep(0.05)
        return first, log, n

    first, log, n = asyncio.run(main())
    assert first.token_ids[0] == 0
    assert log[-1] == "closed" and len(log) == n and len(log) < 100  # nothing read after the close


def test_cancelling_the_consumer_closes_the_source():
    async def main():
        log: list[str] = []

        async def consume():
            async for _ in coalesced(producer(events(10_000), log, pause_s=0.001)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    log = asyncio.run(main())
    assert log[-1] == "closed" and len(log) < 1000


@pytest.mark.parametrize("interval", [1, 3])
def test_stream_offer_holds_events_until_the_interval_and_never_the_first_or_last(interval):
    """The engine-thread side of a group's stream (bdlora_ray.group._Stream.offer)."""
    from bdlora_ray.group import _Stream

    loop = asyncio.new_event_loop()  # only named by the streams: nothing runs on it
    stream = _Stream(loop, interval=interval)
    evs = events(8)
    handed = [outs for ev in evs if (outs := stream.offer(ev)) is not None]
    assert [sum(len(o.token_ids) for o in outs) for outs in handed] == (
        [1] * 8 if interval == 1 else [1, 3, 3, 1])
    assert [o for outs in handed for o in outs] == evs  # every event once, in order
    assert handed[-1][-1].finished
    # A request that is not streamed: its first event, then all the rest with its last.
    whole = _Stream(loop, whole=True, interval=interval)
    assert [len(outs) for ev in evs if (outs := whole.offer(ev)) is not None] == [1, 7]
    loop.close()


def test_stream_interval_must_be_positive():
    from bdlora_ray.engine import EngineConfig
    from bdlora_ray.group import GroupConfig

    with pytest.raises(ValueError, match="stream_interval"):
        GroupConfig(model_path="m", engine=EngineConfig(stream_interval=0))
    with pytest.raises(ValueError, match="stream_events_per_step"):
        EngineConfig(stream_events_per_step=-1)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_sse_stream_sends_one_piece_per_engine_event(chat):
    """deploy.api._stream: the openings go with the first engine event, the finish, usage and [DONE]
    events with the last, so each engine event crosses the serving path as one message."""
    from deploy.api import _Accounting, _ChatFormat, _Format, _Run, _stream
    from deploy.metrics import ApiMetrics
    from deploy.serving import PromptInput

    evs = events(4)

    async def rest():
        for ev in evs[1:]:
            yield ev

    async def go() -> list[str]:
        run = _Run(0, PromptInput("r", None, SamplingParams(max_tokens=4), text="x"), 0, events=rest(),
                   first=evs[0], acct=_Accounting(ApiMetrics(), None, 0.0))
        return [piece async for piece in _stream([run], "r", "m", True, _ChatFormat() if chat else _Format())]

    pieces = asyncio.run(go())
    assert len(pieces) == len(evs)
    blocks = [[json.loads(b[6:]) if b != "data: [DONE]" else b for b in p.split("\n\n") if b] for p in pieces]
    assert blocks[-1][-1] == "data: [DONE]" and blocks[-1][-2]["usage"]["completion_tokens"] == 4
    text = "".join(c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
                   for p in blocks for c in p if c != "data: [DONE]" and c["choices"])
    assert text == "<0><1><2><3>"
    if chat:  # the role's opening chunk and the first token's in one piece
        assert blocks[0][0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and len(blocks[0]) == 2


@pytest.mark.parametrize("streams, budget, every", [(32, 8, 4), (8, 8, 1), (32, 0, 1), (20, 16, 2)])
def test_a_step_with_more_streams_than_its_event_budget_hands_over_every_few_tokens(streams, budget, every):
    """EngineGroup._deliver with EngineConfig.stream_events_per_step: each of the step's streams is handed
    over once per ceil(streams / budget) tokens (its first and last events at once); requests that are
    not streamed do not count; 0 is no budget."""
    from types import SimpleNamespace

    from bdlora_ray.engine import EngineConfig
    from bdlora_ray.group import EngineGroup, _Stream

    loop = asyncio.new_event_loop()
    group = SimpleNamespace(engine=SimpleNamespace(config=EngineConfig(stream_events_per_step=budget)), deliveries=0)
    live = [_Stream(loop) for _ in range(streams)]
    whole = [_Stream(loop, whole=True) for _ in range(40)]  # beside them, not counted
    n = 13
    handed: list[list[int]] = []  # per step: the tokens each stream was handed
    for step in range(n):
        batch = [(s, ev) for i, s in enumerate(live + whole) for ev in [events(n, f"r{i}")[step]]]
        EngineGroup._deliver(group, batch)
        loop.run_until_complete(asyncio.sleep(0))  # the hand-over runs on the readers' loop
        handed.append([sum(len(o.token_ids) for o in s.pending) for s in live])
        for s in live + whole:
            s.pending.clear()
    loop.close()
    for i in range(streams):
        got = [h[i] for h in handed]
        assert sum(got) == n and got[0] == 1, got
        assert got[1:-1] == [every if k % every == 0 else 0 for k in range(1, n - 1)], got
    assert group.deliveries == sum(1 for h in handed if any(h))  # one wake-up per step with anything to hand
