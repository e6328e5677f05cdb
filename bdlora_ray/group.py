"""A replica group on Ray: TP rank 0 in this process, ranks > 0 in actors of one placement group.

Rank 0 runs the engine loop here, in the process that serves the group's requests (a Serve replica),
as Ray Serve LLM's replica owns its engine; ranks > 0 follow its steps over torch.distributed (no Ray
call per step). Ray is used only to place the actors and to move adapter shards from the adapter
store (one call per rank per adapter load); a token crosses no process boundary until the ingress.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, AsyncIterator

import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bdlora_ray.comm import leave_world
from bdlora_ray.engine import Engine
from bdlora_ray.errors import AdapterInvalid, AdapterUnavailable, ReplicaGroupFailed, error_from_name
from bdlora_ray.memory import PoolConfig
from bdlora_ray.placement import ON_HEAD_NODE
from bdlora_ray.request import GenerationRequest, RequestOutput, merge_outputs
from bdlora_ray.store.actor import AdapterStoreActor, StoreConfig
from bdlora_ray.store.manifest import check_name
from bdlora_ray.spec import EngineConfig, GroupConfig
from bdlora_ray.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STORE_NAMESPACE = "bdlora"


def store_config(config: GroupConfig) -> StoreConfig:
    """The adapter store's configuration for a group's config."""
    return StoreConfig(uri=config.adapters_uri, model=config.model_config(), tp=config.tp,
                       max_rank=config.engine.max_lora_rank, cache_bytes=config.store_cache_bytes,
                       check_base_name=False, s3=config.s3)


def store_actor_name(config: GroupConfig) -> str:
    """The adapter-store actor's name (namespace STORE_NAMESPACE): one store per store configuration
    in the cluster, shared by the groups that have it. The name ends in a hash of the whole
    StoreConfig, so a group never reuses a detached store made with other settings (cache size,
    timeouts, max rank): a changed configuration gets a store of its own."""
    digest = hashlib.sha256(repr(store_config(config)).encode()).hexdigest()[:12]
    return f"{config.store_name or f'adapter-store-{config.served_name}-tp{config.tp}'}-{digest}"


def _where(rank: int) -> dict:
    """Where a TP rank runs (operators and tests find its process and node by it)."""
    return {"rank": rank, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id()}


def unwrap(e: BaseException) -> BaseException:
    """The typed error behind a Ray task error, when there is one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class StoreShardSource:
    """A worker's view of the adapter-store actor: only its own rank's shard."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get_shard(self, name: str, tp_rank: int):
        blob = from_store(self.store.get_shard.remote(name, tp_rank), name)
        return blob.meta, blob.tensors(), blob.version or None


def from_store(ref: Any, name: str) -> Any:
    """The result of an adapter-store call about `name`: its typed error re-raised as such, the store
    being gone (it has max_restarts: restarting) as AdapterUnavailable, to retry later."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise unwrap(e) from None
    except ray.exceptions.RayActorError as e:
        raise AdapterUnavailable(f"adapter {name!r}: the adapter store is restarting "
                                 f"({type(e).__name__})") from None


def build_rank(rank: int, config: GroupConfig, init_method: str, store: Any):
    """Join the group's torch.distributed world as `rank` and load this rank's model shard and pool.
    Every rank calls this at once (rank 0 in the replica process, the others in their actors)."""
    import torch.distributed as dist

    from bdlora_ray.comm import init_distributed
    from bdlora_ray.worker import StepChannel, TPWorker

    c = config
    torch.set_num_threads(max(1, int(c.worker_cpus)) if not c.use_gpu else 4)
    comm = init_distributed(rank, c.tp, init_method)
    # Step messages travel on a CPU group of their own; idle ranks wait in it between steps.
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    cfg = c.model_config()
    dtype = getattr(torch, c.engine.dtype)
    device = "cuda" if c.use_gpu else "cpu"
    pool = PoolConfig.for_model(cfg, c.tp, c.engine.num_pages, c.engine.block_size, dtype, device)
    return TPWorker(cfg, c.model_path, comm, pool, StoreShardSource(store), StepChannel(c.tp, cpu_group),
                    device, dtype)


class TPWorkerActor:
    """TP rank > 0 in an actor: it follows rank 0's steps over torch.distributed, and is called over
    Ray only to set up and to fetch adapter shards. Every public method counts its calls."""

    def __init__(self, rank: int, config: GroupConfig) -> None:
        self.rank, self.config = rank, config
        self.calls: Counter[str] = Counter()
        self.worker = None
        self._executor = ThreadPoolExecutor(max_workers=4)

    def _count(self, method: str) -> None:
        self.calls[method] += 1

    async def call_counts(self) -> dict[str, int]:
        self._count("call_counts")
        return dict(self.calls)

    async def info(self) -> dict:
        """Where this rank runs (operators and fault-injection tests find its process by it)."""
        self._count("info")
        return _where(self.rank)

    async def setup(self, init_method: str, store: Any) -> None:
        self._count("setup")
        self.worker = await asyncio.get_running_loop().run_in_executor(
            self._executor, build_rank, self.rank, self.config, init_method, store)

    async def serve_forever(self) -> None:
        """Follow rank 0 until it stops (one long call for the group's life)."""
        self._count("serve_forever")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.worker.serve_forever)

    async def pool_usage(self) -> dict:
        self._count("pool_usage")
        return self.worker.usage_snapshot

    async def fetch_adapter(self, name: str) -> int:
        self._count("fetch_adapter")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.worker.fetch_adapter, name)

    async def forget_adapter(self, name: str) -> None:
        """Drop a fetched shard that will not be loaded (another rank's fetch failed)."""
        self._count("forget_adapter")
        self.worker.host.pop(name, None)


class _Stream:
    """One request's outputs on its way from the engine thread to the coroutine reading them.

    The engine hands a whole step's outputs over in one wake-up of the reader's event loop; what
    arrives while the reader is busy is read as one merged event (as vLLM's output collector does).
    A request that is not streamed (`whole`) wakes its reader twice: at its first event, then at its
    last, with the events between held on the engine thread and merged into it. A streamed one with
    an `interval` > 1 is handed over at its first event, then whenever `interval` new tokens are held,
    and at its last (EngineConfig.stream_interval; a step with many streams raises it for all of
    them, EngineConfig.stream_events_per_step)."""

    __slots__ = ("loop", "pending", "ready", "whole", "interval", "started", "held", "held_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, whole: bool = False, interval: int = 1) -> None:
        self.loop = loop
        self.pending: list[RequestOutput] = []
        self.ready = asyncio.Event()
        self.whole = whole
        self.interval = interval
        self.started = False                 # engine thread only: its first event has gone out
        self.held: list[RequestOutput] = []  # engine thread only: events not handed over yet
        self.held_tokens = 0                 # engine thread only: their tokens

    def offer(self, out: RequestOutput, at_least: int = 1) -> list[RequestOutput] | None:  # engine thread
        """The events to hand over now, `out` last; None while `out` is held back (until `interval`
        new tokens, or `at_least` if more)."""
        if self.started and not out.finished:
            tokens = self.held_tokens + len(out.token_ids)
            interval = max(self.interval, at_least)
            if self.whole or (interval > 1 and tokens < interval):
                self.held.append(out)
                self.held_tokens = tokens
                return None
        outs = [out]
        if self.held:
            outs, self.held = [*self.held, out], []
        self.held_tokens = 0
        self.started = True
        return outs

    def put(self, outs: list[RequestOutput]) -> None:  # on self.loop
        self.pending.extend(outs)
        self.ready.set()

    async def get(self) -> RequestOutput:
        while not self.pending:
            await self.ready.wait()
            self.ready.clear()
        outs, self.pending = self.pending, []
        return merge_outputs(outs)


def _dispatch(items: list[tuple[_Stream, list[RequestOutput]]]) -> None:
    for stream, outs in items:
        stream.put(outs)


class EngineGroup:
    """Creates and drives one replica group (see the module docstring).

    Rank 0 (the engine loop, the model's first shard, the pool) runs in this process: in a Serve
    replica, that is bundle 0 of the replica's placement group, and the other ranks are actors in
    bundles 1..TP-1. Outputs cross no process boundary on their way to the replica's request
    handlers: the engine hands each step's outputs to this process's event loop in one wake-up.

    When a TP worker dies, in-flight requests end with ReplicaGroupFailed (503) and new ones are
    refused with it; `check_health` then raises (Serve replaces the whole replica), and `recover`
    rebuilds the group in place for callers without Serve.
    """

    def __init__(self, config: GroupConfig, placement_group: PlacementGroup | None = None) -> None:
        self.config = config
        self.model_name = config.served_name
        self.max_model_len = config.engine.max_model_len
        self.tokenizer = load_tokenizer(config.model_path)
        config.model_config().check_tp(config.tp)
        # Detached: shared by the model's groups and kept across their rebuilds; restarted if it dies
        # (its cache is only a cache). No credentials in its runtime_env: see _worker_env.
        # Outside this replica's placement group, which Serve makes capture what the replica creates:
        # the store must outlive the replica, and a PG is removed with its replica, actors and all.
        # One per cluster, on the head node: the autoscaler removes worker nodes, never the head, so
        # scaling down never takes the cache (or a fetch in progress) with it.
        self.store = AdapterStoreActor.options(name=store_actor_name(config), namespace=STORE_NAMESPACE,
                                               get_if_exists=True, lifetime="detached", max_restarts=-1,
                                               resources=dict(ON_HEAD_NODE),
                                               scheduling_strategy=PlacementGroupSchedulingStrategy(None),
                                               runtime_env={"env_vars": _worker_env()}).remote(store_config(config))
        pg = placement_group or get_current_placement_group()
        # Rank i > 0 goes to bundle i of the replica's own placement group (bundle 0 is this process,
        # rank 0), or to bundle i - 1 of one made here for the followers alone.
        self._offset = 0
        self._own_pg = None
        if pg is None and config.tp > 1:
            self._own_pg = pg = ray_placement_group(config, followers_only=True)
            self._offset = -1
        self._pg = pg
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="group")
        self._rebuild_lock = asyncio.Lock()
        self.rebuilds = 0
        self.deliveries = 0  # wake-ups of request handlers by the engine (at most one per step per loop)
        self._start()
        log.info("replica group up: %s, TP=%d", self.model_name, config.tp)

    def _start(self) -> None:
        """Create the TP workers, join them and this process in one torch.distributed world, start
        the engine loop here."""
        c = self.config
        res = {"num_gpus": 1, "num_cpus": 0} if c.use_gpu else {"num_cpus": c.worker_cpus}
        actor = ray.remote(TPWorkerActor)
        self.workers = [
            actor.options(**res, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=self._offset + i, placement_group_capture_child_tasks=False),
                runtime_env={"env_vars": _worker_env()}).remote(i, c)
            for i in range(1, c.tp)]
        init = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
        joined = [w.setup.remote(init, self.store) for w in self.workers]
        self.worker = build_rank(0, c, init, self.store)  # returns once every rank has joined
        ray.get(joined)
        self._followers = [w.serve_forever.remote() for w in self.workers]
        self.engine = Engine(self.worker, self.tokenizer, c.engine,
                             self._fetch_everywhere if self.workers else None, self._deliver)
        self.engine.start()
        self.worker_info = [_where(0), *ray.get([w.info.remote() for w in self.workers])]

    # ---- engine thread ---------------------------------------------------------------

    def _deliver(self, batch: list[tuple[Any, RequestOutput]]) -> None:
        """A step's outputs: one hand-over per event loop that has readers to wake in the batch (a
        request that is not streamed is held here between its first event and its last; with more
        streams than the step's event budget, each holds its tokens until ceil(streams / budget))."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        budget = self.engine.config.stream_events_per_step
        at_least = -(-sum(1 for stream, _ in batch if not stream.whole) // budget) if budget > 0 else 1
        for stream, out in batch:
            if (outs := stream.offer(out, at_least)) is not None:
                by_loop.setdefault(stream.loop, []).append((stream, outs))
        for loop, items in by_loop.items():
            self.deliveries += 1
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # that loop is closed: its readers are gone
                log.debug("outputs for a closed event loop dropped")

    def _fetch_everywhere(self, name: str) -> Future:
        return self._executor.submit(self._fetch_on_every_rank, name)

    def _fetch_on_every_rank(self, name: str) -> int:
        if self.workers:
            # One look at the manifest before the ranks ask for their shards: a missing or invalid adapter
            # fails here once, not once for each rank that reaches the store after the first has failed
            # (failures are not cached, so that an adapter pushed later is found); a valid manifest is
            # cached, and the ranks' lookups find it there.
            from_store(self.store.manifest.remote(name), name)
        refs = [p.fetch_adapter.remote(name) for p in self.workers]  # the other ranks, concurrently
        errors, n = [], 0
        try:
            n = self.worker.fetch_adapter(name)
        except Exception as e:
            errors.append(e)
        for ref in refs:  # every rank's outcome, so that none keeps a shard that will not be loaded
            try:
                n += ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                errors.append(unwrap(e))
            except ray.exceptions.RayActorError as e:
                errors.append(ReplicaGroupFailed(f"a TP worker died while fetching {name!r}: {type(e).__name__}"))
        if errors:  # every fetch has ended: nothing re-adds what is dropped here
            self.worker.host.pop(name, None)
            try:
                ray.get([p.forget_adapter.remote(name) for p in self.workers])
                if any(isinstance(e, AdapterInvalid) for e in errors):
                    # A rank that reached the store after the failure may have cached a good shard
                    # (and the manifest) of this broken adapter: keep nothing of it.
                    ray.get(self.store.invalidate.remote(name))
            except ray.exceptions.RayError:
                log.warning("could not drop every copy of failed adapter %s", name, exc_info=True)
            raise errors[0]
        return n

    # ---- health -------------------------------------------------------------------------

    def failure(self) -> str | None:
        """Why the group cannot serve, or None. Never touches S3, never blocks."""
        if self.engine.dead is not None:
            return f"engine loop died: {self.engine.dead!r}"
        ended, _ = ray.wait(self._followers, num_returns=len(self._followers), timeout=0) \
            if self._followers else ([], [])
        if ended:
            return "a TP worker stopped following rank 0"
        return None

    async def check_health(self) -> None:
        """Raises ReplicaGroupFailed if the group cannot serve (Serve then replaces the replica)."""
        why = self.failure()
        if why is not None:
            raise ReplicaGroupFailed(f"replica group {self.model_name} is broken: {why}")

    async def recover(self) -> bool:
        """Rebuild the group in place if it is broken; True if it had to. For callers without Serve
        (Serve replaces a broken replica instead)."""
        async with self._rebuild_lock:
            why = self.failure()
            if why is None:
                return False
            log.warning("replica group %s broken (%s): rebuilding", self.model_name, why)
            await asyncio.get_running_loop().run_in_executor(None, self._rebuild)
            self.rebuilds += 1
            return True

    def _rebuild(self) -> None:
        self._teardown()
        self._start()

    def _teardown(self) -> None:
        try:
            self.engine.stop()
        except Exception:
            log.warning("the engine loop did not stop cleanly", exc_info=True)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        leave_world()

    # ---- requests -----------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """The request's events, merged while the reader is busy; typed errors before the first."""
        if req.adapter is not None:
            check_name(req.adapter)
        stream = _Stream(asyncio.get_running_loop(), whole=not req.stream,
                         interval=self.engine.config.stream_interval)
        self.engine.submit(req, stream)
        done = started = False
        try:
            while not done:
                out = await stream.get()
                done = out.finished
                if done and out.finish_reason == "error" and not started:
                    raise error_from_name(out.error_type, out.error or "request failed")
                started = True
                yield out
        finally:
            if not done:  # the reader went away: free the sequence's pages now
                self.engine.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def load_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self.engine.prefetch(check_name(name)))

    async def unload_adapter(self, name: str) -> None:
        """Evict it from the pool and the store's host cache: the next use reads S3 again (a re-pushed
        adapter is served in its new version, a deleted one is not found)."""
        await asyncio.wrap_future(self.engine.unload(check_name(name)))
        try:
            await self.store.invalidate.remote(name)
        except ray.exceptions.RayActorError:
            log.info("adapter store restarting: its cache (and %s in it) starts empty", name)

    def resident_adapters(self) -> list[str]:
        return list(self.engine.stats().get("resident_adapters", ()))

    async def list_adapters(self) -> list[dict]:
        try:
            infos = await self.store.list_adapters.remote()
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None
        except ray.exceptions.RayActorError as e:
            raise AdapterUnavailable(f"the adapter store is restarting ({type(e).__name__})") from None
        return [i.to_dict() for i in infos]

    async def stats(self) -> dict:
        s = dict(self.engine.stats())
        s["store"] = await self.store.stats.remote()
        s["workers"] = self.worker_info
        s["deliveries"] = self.deliveries
        return s

    async def timeline(self, since: float = 0.0) -> dict[str, list]:
        """The engine's step timeline after `since` (see Engine.timeline), for profiling the serving path."""
        return self.engine.timeline(since)

    async def worker_call_counts(self) -> list[dict[str, int]]:
        """Ray calls that reached each TP rank > 0 (rank 0 runs here: nothing calls it over Ray)."""
        return await asyncio.gather(*[w.call_counts.remote() for w in self.workers])

    async def pool_usage(self) -> list[dict]:
        """Every rank's pool usage (they replay rank 0's operations, so they agree)."""
        others = await asyncio.gather(*[w.pool_usage.remote() for w in self.workers])
        return [self.engine.stats()["pool"], *others]

    def shutdown(self) -> None:
        self._teardown()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)


def ray_placement_group(config: GroupConfig, followers_only: bool = False) -> PlacementGroup:
    pg = placement_group(config.bundles()[1 if followers_only else 0:], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=300)
    return pg


def _worker_env() -> dict[str, str]:
    """Settings the workers and the store must share with the driver.

    Never credentials: Ray keeps a runtime_env in its control store and shows it in its dashboard.
    Each process reads them from its node's own environment or instance role (on a local cluster
    every process inherits the driver's environment).
    """
    keep = ("BDLORA_KERNEL_BACKEND", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
    return {k: os.environ[k] for k in keep if k in os.environ}


__all__ = ["EngineConfig", "EngineGroup", "GroupConfig", "TPWorkerActor", "store_actor_name"]
