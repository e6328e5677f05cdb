"""Which replica group serves a request.

Both routers prefer a group that already holds the request's adapter, else
the least loaded one:

- `ServeRouter` (the deployment): Ray Serve model multiplexing. The ingress
  tags each request with its adapter (`multiplexed_model_id`); each group
  reports the adapters it has served, and Serve's router sends the request to
  one of those groups, choosing by queue length, falling back to the groups
  holding the fewest adapters when none has it. Control calls that concern
  every group (unload, stats, health) are broadcast.
- `LocalRouter`: the same policy over in-process groups (no Serve), used by
  tests of the HTTP layer and by anything embedding groups directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import ray

from bdlora_ray.errors import BdloraError, ReplicaGroupFailed
from bdlora_ray.request import RequestOutput
from deploy.serving import ErrorInfo, GroupServer, PromptInput

log = logging.getLogger(__name__)
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # distinct classes before Python 3.11
_REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class GroupUnavailable(BdloraError):
    """No replica group could answer (starting, restarting or dead)."""

    http_status = 503
    code = "group_unavailable"
    retry_after_s = 5


class Router(Protocol):
    def generate(self, inp: PromptInput) -> AsyncGenerator[RequestOutput, None]:
        """Events of one request; typed errors before the first. Closing it early aborts the request."""

    async def load_adapter(self, name: str) -> None: ...
    async def unload_adapter(self, name: str) -> int: ...   # groups it was unloaded from
    async def list_adapters(self) -> list[dict]: ...
    async def stats(self) -> list[dict]: ...                 # one dict per group that answered
    async def check_health(self) -> None: ...


def _unloaded(outcomes: Sequence[BdloraError | None]) -> int:
    """How many groups unloaded the adapter; the first error if any group failed (unloading is idempotent)."""
    for e in outcomes:
        if e is not None:
            raise e
    return len(outcomes)


class LocalRouter:
    def __init__(self, servers: Sequence[GroupServer]) -> None:
        if not servers:
            raise ValueError("LocalRouter needs at least one group")
        self.servers = list(servers)
        self.inflight = [0] * len(servers)  # requests in progress per group: the load measure

    def pick(self, adapter: str | None) -> int:
        if len(self.servers) == 1:  # a one-group app's own group: nothing to choose (no adapter list copied)
            return 0
        holders = [i for i, s in enumerate(self.servers)
                   if adapter is not None and adapter in s.group.resident_adapters()]
        return min(holders or range(len(self.servers)), key=lambda i: self.inflight[i])

    async def generate(self, inp: PromptInput) -> AsyncGenerator[RequestOutput, None]:
        i = self.pick(inp.adapter)
        self.inflight[i] += 1
        stream = self.servers[i].generate(inp)
        try:
            async for out in stream:
                yield out
        finally:
            self.inflight[i] -= 1
            await stream.aclose()

    async def load_adapter(self, name: str) -> None:
        await self.servers[self.pick(name)].load_adapter(name)

    async def unload_adapter(self, name: str) -> int:
        outcomes: list[BdloraError | None] = []
        for s in self.servers:
            try:
                await s.unload_adapter(name)
                outcomes.append(None)
            except BdloraError as e:
                outcomes.append(e)
        return _unloaded(outcomes)

    async def list_adapters(self) -> list[dict]:
        return await self.servers[0].list_adapters()

    async def stats(self) -> list[dict]:
        return [await s.stats() for s in self.servers]

    async def check_health(self) -> None:
        for i, s in enumerate(self.servers):
            try:
                await s.check_health()
            except Exception as e:
                raise GroupUnavailable(f"replica group {i} is unhealthy: {e!r}") from e


def _check(result: Any) -> Any:
    """A group method's result, or its ErrorInfo raised as a typed error."""
    if isinstance(result, ErrorInfo):
        raise result.error()
    return result


def _group_died(e: BaseException) -> ReplicaGroupFailed:
    """The error of a request whose group's replica died under it (Serve replaces the replica)."""
    return ReplicaGroupFailed(f"the replica group died: {type(e).__name__}")


class ServeRouter:
    """Routes through a DeploymentHandle to `EngineGroupDeployment` replicas."""

    def __init__(self, groups: Any, timeout_s: float = 30.0) -> None:
        self.groups = groups       # DeploymentHandle of EngineGroupDeployment
        self.timeout_s = timeout_s  # control-plane calls (admin, stats, health)

    async def generate(self, inp: PromptInput) -> AsyncGenerator[RequestOutput, None]:
        if not inp.stream:
            yield await self._complete(inp)
            return
        handle = self.groups.options(stream=True, multiplexed_model_id=inp.adapter or "")
        events = handle.generate.remote(inp)
        finished = False
        try:
            async for ev in events:
                out = _check(ev)
                finished = out.finished
                yield out
        except _REPLICA_GONE as e:  # the group's replica (rank 0 runs in it) died; Serve replaces it
            finished = True
            raise _group_died(e) from None
        finally:
            if not finished:
                # Cancelling the call cancels the replica's generator, which aborts the request.
                events.cancel()

    async def _complete(self, inp: PromptInput) -> RequestOutput:
        """A request that is not streamed: one plain call whose answer is its whole output (a stream of
        one item would cost the ingress and the replica a Serve streaming call each)."""
        response = self.groups.options(multiplexed_model_id=inp.adapter or "").complete.remote(inp)
        try:
            return _check(await response)
        except _REPLICA_GONE as e:
            raise _group_died(e) from None
        except asyncio.CancelledError:
            response.cancel()  # the replica's call is cancelled, which aborts the request
            raise

    async def _call(self, method: str, *args: Any, adapter: str = "") -> Any:
        handle = self.groups.options(multiplexed_model_id=adapter) if adapter else self.groups
        try:
            return _check(await asyncio.wait_for(getattr(handle, method).remote(*args), self.timeout_s))
        except _TIMEOUTS:
            raise GroupUnavailable(f"{method} got no answer from a replica group in {self.timeout_s:.0f}s") from None

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Every live group's result (exceptions included, as values)."""
        try:
            results = await self.groups.broadcast(method, *args).results_async(
                timeout_s=self.timeout_s, return_exceptions=True)
        except _TIMEOUTS:
            raise GroupUnavailable(f"{method} got no answer from every replica group in "
                                   f"{self.timeout_s:.0f}s") from None
        if not results:
            raise GroupUnavailable("no replica group is running")
        return results

    async def load_adapter(self, name: str) -> None:
        # Routed like a request for the adapter, so it lands where later requests will go.
        await self._call("load_adapter", name, adapter=name)

    async def unload_adapter(self, name: str) -> int:
        outcomes: list[BdloraError | None] = []
        for r in await self._broadcast("unload_adapter", name):
            if isinstance(r, ErrorInfo):
                outcomes.append(r.error())
            elif isinstance(r, BaseException):
                log.warning("unload of %s failed in a group: %r", name, r)
                outcomes.append(GroupUnavailable(f"a replica group failed: {type(r).__name__}"))
            else:
                outcomes.append(None)
        return _unloaded(outcomes)

    async def list_adapters(self) -> list[dict]:
        return await self._call("list_adapters")

    async def stats(self) -> list[dict]:
        results = await self._broadcast("stats")
        for r in results:
            if not isinstance(r, dict):
                log.warning("a replica group did not report stats: %r", r)
        return [r for r in results if isinstance(r, dict)]

    async def check_health(self) -> None:
        results = await self._broadcast("check_health")
        bad = [r for r in results if r is not None]
        if bad:
            raise GroupUnavailable(f"{len(bad)} of {len(results)} replica groups are unhealthy: {bad[0]!r}")
