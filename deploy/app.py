"""The Ray Serve application: the HTTP API and the replica-group deployment.

One group (`max_groups` 1, the default), one deployment: the group's replica serves the API itself,
as vLLM's API server fronts its one engine and Ray Serve LLM's replica owns its engine:

    HTTP -> Serve's proxy -> EngineGroup replica: the API (FastAPI, deploy.api) and its group in
                             process (TP rank 0 and the engine loop; ranks 1..TP-1 in worker actors)

Several groups: an Ingress deployment in front, which routes each request to a group with its
adapter (Serve's model multiplexing, deploy/routing.py):

    HTTP -> Serve's proxy -> Ingress (FastAPI) --multiplexed_model_id=adapter--> EngineGroup replica

A request crosses one Python process less in the first layout, which on a CPU node is CPU the engine
gets back (`python -m bench tax --separate-ingress` measures both; bench/RESULTS.md).
`ApiConfig.ingress` (BDLORA_INGRESS) `separate` asks for the second layout with one group too.

Each `EngineGroup` replica reserves a STRICT_PACK placement group of TP bundles: bundle 0 is the
replica itself, which runs TP rank 0 and the engine loop in its own process (so tokens reach the
request handlers with no process hop), bundles 1..TP-1 hold the other ranks' actors. Serve
autoscales the number of groups, and replaces a replica whose group broke (a TP worker died):
`check_health` raises.
`build_app` only binds deployments: nothing starts until `serve.run`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve
from ray.serve import Application

from bdlora_ray.errors import BdloraError
from bdlora_ray.placement import ON_HEAD_NODE
from bdlora_ray.request import RequestOutput
from deploy.api import make_api
from bdlora_ray.spec import GroupConfig
from deploy.config import ApiConfig, AppConfig
from deploy.routing import LocalRouter, ServeRouter
from deploy.serving import ErrorInfo, Group, GroupServer, PromptInput

log = logging.getLogger(__name__)

GroupFactory = Callable[[GroupConfig], Group]  # builds a replica's group (default: bdlora_ray.group.EngineGroup)


def engine_group(spec: GroupConfig) -> Group:
    from bdlora_ray.group import EngineGroup

    return EngineGroup(spec)  # the replica's own placement group holds its workers


def _affinity_loader() -> Callable[[str], Awaitable[str]]:
    # A plain function, not a method, so that the multiplex limit can come from config at run time.
    # It loads nothing: GroupServer calls it once the group has the adapter (see GroupServer).
    async def register_adapter_affinity(name: str) -> str:
        return name

    return register_adapter_affinity


async def _as_data(call: Awaitable[Any]) -> Any:
    """The call's result, or its typed error as ErrorInfo (plain data across the Ray boundary)."""
    try:
        return await call
    except BdloraError as e:
        return ErrorInfo.of(e)


class EngineGroupReplica:
    """One replica group. Behind an Ingress, Serve routes adapter requests by `multiplexed_model_id`:
    a group reports the adapters it has loaded through `@serve.multiplexed`, and requests for them
    come here first."""

    routed_by_adapter = True  # an Ingress routes to this group: register adapter affinity with Serve

    def __init__(self, spec: GroupConfig, factory: GroupFactory | None = None) -> None:
        self.group = (factory or engine_group)(spec)
        remember = (serve.multiplexed(max_num_models_per_replica=spec.max_adapters_per_group)(_affinity_loader())
                    if self.routed_by_adapter else None)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.server = GroupServer(self.group, remember, replica=self.replica)
        log.info("replica group up: model %s, TP %d", self.group.model_name, spec.tp)

    async def generate(self, inp: PromptInput) -> AsyncIterator[RequestOutput | ErrorInfo]:
        try:
            async for out in self.server.generate(inp):  # merged at the source while the ingress is behind
                yield out
        except BdloraError as e:
            yield ErrorInfo.of(e)

    async def complete(self, inp: PromptInput) -> RequestOutput | ErrorInfo:
        """A request that is not streamed (`inp.stream` False): its whole output in one answer."""
        try:
            outs = [out async for out in self.server.generate(inp)]  # one event: the whole output
        except BdloraError as e:
            return ErrorInfo.of(e)
        return outs[-1]

    async def load_adapter(self, name: str) -> ErrorInfo | None:
        return await _as_data(self.server.load_adapter(name))

    async def unload_adapter(self, name: str) -> ErrorInfo | None:
        return await _as_data(self.server.unload_adapter(name))

    async def list_adapters(self) -> list[dict] | ErrorInfo:
        return await _as_data(self.server.list_adapters())

    async def stats(self) -> dict | ErrorInfo:
        return await _as_data(self.server.stats())

    async def pool_usage(self) -> list[dict] | ErrorInfo:
        """Every TP rank's page-pool usage (rank order)."""
        return await _as_data(self.server.pool_usage())

    async def timeline(self, since: float = 0.0) -> dict[str, list]:
        """The engine's step timeline (bdlora_ray.engine.Engine.timeline), for profiling."""
        return await self.group.timeline(since)

    async def check_health(self) -> None:
        """Serve's periodic health check (and /health): raises if the group broke (a TP worker died);
        Serve then replaces this replica, workers included. It never rebuilds anything itself, so it
        always answers within the health check's timeout."""
        await self.server.check_health()

    def __del__(self) -> None:
        # Serve calls this on shutdown, and the garbage collector may call it again: shut down once.
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            group.shutdown()


EngineGroupDeployment = serve.deployment(EngineGroupReplica, name="EngineGroup")


@serve.ingress()
class ServingGroupReplica(EngineGroupReplica):
    """The one group of a one-group app, serving the HTTP API itself: the API's router is this
    replica's own group, called in process (no Serve call between the API and the engine)."""

    routed_by_adapter = False  # no Ingress: no request of it waits on a Serve affinity call

    def __init__(self, spec: GroupConfig, config: ApiConfig, factory: GroupFactory | None = None) -> None:
        super().__init__(spec, factory)
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(LocalRouter([self.server]), self.config)


ServingGroupDeployment = serve.deployment(ServingGroupReplica, name="EngineGroup")


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, groups: Any, config: ApiConfig) -> None:
        self.router = ServeRouter(groups, config.backend_timeout_s)
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        return make_api(self.router, self.config)


def build_app(config: AppConfig, factory: GroupFactory | None = None) -> Application:
    """Bind the deployments for `config` (starts nothing): one (the group serves the API) or two (an
    Ingress in front of the groups), see the module docstring and `AppConfig.api_in_group`."""
    spec, api = config.group, config.api
    assert api is not None
    first = spec.bundles()[0]  # this replica runs TP rank 0
    deployment, args = ((ServingGroupDeployment, (spec, api, factory)) if config.api_in_group
                        else (EngineGroupDeployment, (spec, factory)))
    groups = deployment.options(
        placement_group_bundles=spec.bundles(),
        placement_group_strategy="STRICT_PACK",  # all TP workers of a group on one node
        ray_actor_options={"num_cpus": first["CPU"], "num_gpus": first.get("GPU", 0),  # bundle 0
                           **({"runtime_env": {"env_vars": dict(spec.env_vars)}} if spec.env_vars else {})},
        autoscaling_config=config.scaling.autoscaling_config(),
        # Serving the API, the replica holds every HTTP request for its whole life, as the Ingress did.
        max_ongoing_requests=(max(spec.max_ongoing_requests, api.max_ongoing_requests) if config.api_in_group
                              else spec.max_ongoing_requests),
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=config.scaling.graceful_shutdown_timeout_s,  # scale-down drains
    ).bind(*args)
    if config.api_in_group:
        return groups
    return Ingress.options(
        name="Ingress", num_replicas=api.ingress_replicas, max_ongoing_requests=api.max_ongoing_requests,
        # I/O only; it must not take a CPU a TP worker needs. On the head node, beside Serve's HTTP proxy:
        # a worker node goes when its group does, and the requests in flight through it would go too.
        ray_actor_options={"num_cpus": 0, "resources": dict(ON_HEAD_NODE)},
    ).bind(groups, api)
