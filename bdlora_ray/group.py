"""A replica group on Ray: N TP worker actors in one placement group.

Rank 0's actor runs the engine loop; ranks > 0 follow its steps over
torch.distributed (no Ray call per step). Ray is used only to place the
actors, to stream each request's tokens back (one streaming call per
request), and to move adapter shards from the adapter store (one call per
rank per adapter load).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, AsyncIterator

import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import Engine, EngineConfig
from bdlora_ray.errors import AdapterInvalid, AdapterUnavailable, ReplicaGroupFailed, error_from_name
from bdlora_ray.memory import PoolConfig
from bdlora_ray.placement import worker_bundles
from bdlora_ray.request import GenerationRequest, RequestOutput, merge_outputs
from bdlora_ray.store.actor import AdapterStoreActor, StoreConfig
from bdlora_ray.store.manifest import check_name
from bdlora_ray.store.s3 import S3Config
from bdlora_ray.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STORE_NAMESPACE = "bdlora"


@dataclass(frozen=True)
class GroupConfig:
    model_path: str                      # local dir: HF config.json, safetensors, tokenizer files
    adapters_uri: str                    # s3://bucket/prefix where adapters live
    tp: int = 2                          # TP degree = worker actors = placement-group bundles
    model_name: str = ""                 # served name of the base model ("" -> directory name)
    engine: EngineConfig = field(default_factory=EngineConfig)
    use_gpu: bool = False                # one GPU per worker (NCCL), else fractional CPUs (gloo)
    worker_cpus: float = 0.5             # CPUs per worker bundle when use_gpu is False
    store_cache_bytes: int = 2 << 30     # host cache of the adapter store
    store_name: str = ""                 # share one named store actor between groups ("" -> per model)
    s3: S3Config = S3Config()            # retries and timeouts of the store's S3 calls

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_path).name

    def model_config(self) -> LlamaConfig:
        return LlamaConfig.from_json(self.model_path, name=self.served_name)


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
        try:
            blob = ray.get(self.store.get_shard.remote(name, tp_rank))
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None
        except ray.exceptions.RayActorError as e:  # died or restarting (it has max_restarts): retry later
            raise AdapterUnavailable(f"adapter {name!r}: the adapter store is restarting "
                                     f"({type(e).__name__})") from None
        return blob.meta, blob.tensors()


class TPWorkerActor:
    """One TP rank in an actor. Every public method counts its calls (`call_counts`)."""

    def __init__(self, rank: int, config: GroupConfig) -> None:
        self.rank, self.config = rank, config
        self.calls: Counter[str] = Counter()
        self.worker = None
        self.engine: Engine | None = None
        self.store: Any = None
        self._executor = ThreadPoolExecutor(max_workers=4)

    def _count(self, method: str) -> None:
        self.calls[method] += 1

    async def call_counts(self) -> dict[str, int]:
        self._count("call_counts")
        return dict(self.calls)

    async def rendezvous(self) -> str:
        self._count("rendezvous")
        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"

    async def info(self) -> dict:
        """Where this rank runs (operators and fault-injection tests find its process by it)."""
        self._count("info")
        return {"rank": self.rank, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address()}

    async def setup(self, init_method: str, store: Any) -> None:
        self._count("setup")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._setup, init_method, store)

    def _setup(self, init_method: str, store: Any) -> None:
        import torch.distributed as dist

        from bdlora_ray.comm import init_distributed
        from bdlora_ray.worker import StepChannel, TPWorker

        c = self.config
        self.store = store
        torch.set_num_threads(max(1, int(c.worker_cpus)) if not c.use_gpu else 4)
        comm = init_distributed(self.rank, c.tp, init_method)
        # Step messages travel on a CPU group of their own; idle ranks wait in it between steps.
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        cfg = c.model_config()
        dtype = getattr(torch, c.engine.dtype)
        device = "cuda" if c.use_gpu else "cpu"
        pool = PoolConfig.for_model(cfg, c.tp, c.engine.num_pages, c.engine.block_size, dtype, device)
        self.worker = TPWorker(cfg, c.model_path, comm, pool, StoreShardSource(store),
                               StepChannel(c.tp, cpu_group), device, dtype)

    async def serve_forever(self) -> None:
        """Ranks > 0: follow rank 0 until it stops (one long call for the group's life)."""
        self._count("serve_forever")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.worker.serve_forever)

    async def pool_usage(self) -> dict:
        self._count("pool_usage")
        return self.worker.pool.usage().to_dict()

    async def fetch_adapter(self, name: str) -> int:
        self._count("fetch_adapter")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.worker.fetch_adapter, name)

    async def forget_adapter(self, name: str) -> None:
        """Drop a fetched shard that will not be loaded (another rank's fetch failed)."""
        self._count("forget_adapter")
        self.worker.host.pop(name, None)

    # ---- rank 0 -------------------------------------------------------------------

    async def start_engine(self, peers: list) -> None:
        self._count("start_engine")

        def fetch_everywhere(name: str) -> int:
            refs = [p.fetch_adapter.remote(name) for p in peers]  # the other ranks, concurrently
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
                    ray.get([p.forget_adapter.remote(name) for p in peers])
                    if any(isinstance(e, AdapterInvalid) for e in errors):
                        # A rank that reached the store after the failure may have cached a good shard
                        # (and the manifest) of this broken adapter: keep nothing of it.
                        ray.get(self.store.invalidate.remote(name))
                except ray.exceptions.RayError:
                    log.warning("could not drop every copy of failed adapter %s", name, exc_info=True)
                raise errors[0]
            return n

        fetch = (lambda name: self._executor.submit(fetch_everywhere, name)) if peers else None
        tokenizer = load_tokenizer(self.config.model_path)
        self.engine = Engine(self.worker, tokenizer, self.config.engine, fetch)
        self.engine.start()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; typed errors are raised before the first one."""
        self._count("generate")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.engine.submit(req, lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
        finished = False
        try:
            while not finished:
                # Everything that arrived meanwhile goes as one item: under load a Ray stream item per
                # token per request would cost more than the step that made the token.
                outs = [await q.get()]
                while not outs[-1].finished and not q.empty():
                    outs.append(q.get_nowait())
                out = merge_outputs(outs)
                finished = out.finished
                yield out
        finally:
            if not finished:  # the caller went away: free the pages now
                self.engine.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        self._count("abort")
        self.engine.abort(request_id)

    async def load_adapter(self, name: str) -> None:
        self._count("load_adapter")
        await asyncio.wrap_future(self.engine.prefetch(name))

    async def unload_adapter(self, name: str) -> bool:
        self._count("unload_adapter")
        return await asyncio.wrap_future(self.engine.unload(name))

    async def stats(self) -> dict:
        self._count("stats")
        return {**self.engine.stats(), "channel_messages": self.worker.channel.sent,
                "worker_steps": self.worker.steps, "dead": repr(self.engine.dead) if self.engine.dead else None}

    async def stop(self) -> None:
        self._count("stop")
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)


class EngineGroup:
    """Creates and drives one replica group (see the module docstring).

    When a worker dies, in-flight requests end with ReplicaGroupFailed (503) and
    the group rebuilds itself in place: every worker is replaced, in the same
    placement group, and new requests are refused with 503 until it is back.
    """

    def __init__(self, config: GroupConfig, placement_group: PlacementGroup | None = None) -> None:
        self.config = config
        self.model_name = config.served_name
        self.max_model_len = config.engine.max_model_len
        self.tokenizer = load_tokenizer(config.model_path)
        config.model_config().check_tp(config.tp)
        # Detached: shared by the model's groups and kept across their rebuilds; restarted if it dies
        # (its cache is only a cache). No credentials in its runtime_env: see _worker_env.
        self.store = AdapterStoreActor.options(name=store_actor_name(config), namespace=STORE_NAMESPACE,
                                               get_if_exists=True, lifetime="detached", max_restarts=-1,
                                               runtime_env={"env_vars": _worker_env()}).remote(store_config(config))
        pg = placement_group or get_current_placement_group()
        self._offset = 1 if pg is not None and placement_group is None else 0  # bundle 0: the Serve replica's
        self._own_pg = None
        if pg is None:
            self._own_pg = pg = ray_placement_group(config)
            self._offset = 0
        self._pg = pg
        self._resident: set[str] = set()
        self._rebuild_lock = asyncio.Lock()
        self._rebuilding = False
        self.rebuilds = 0
        self._start()
        log.info("replica group up: %s, TP=%d", self.model_name, config.tp)

    def _start(self) -> None:
        """Create the TP workers, join them in one torch.distributed group, start rank 0's engine."""
        c = self.config
        res = {"num_gpus": 1, "num_cpus": 0} if c.use_gpu else {"num_cpus": c.worker_cpus}
        actor = ray.remote(TPWorkerActor)
        self.workers = [
            actor.options(**res, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=self._offset + i, placement_group_capture_child_tasks=False),
                runtime_env={"env_vars": _worker_env()}).remote(i, c)
            for i in range(c.tp)]
        init = ray.get(self.workers[0].rendezvous.remote())
        ray.get([w.setup.remote(init, self.store) for w in self.workers])
        self._followers = [w.serve_forever.remote() for w in self.workers[1:]]
        ray.get(self.workers[0].start_engine.remote(self.workers[1:]))
        self.worker_info = ray.get([w.info.remote() for w in self.workers])
        self._resident.clear()

    async def _failure(self) -> str | None:
        """Why the group cannot serve, or None. Never touches S3."""
        ended, _ = ray.wait(self._followers, timeout=0)
        if ended:
            return "a TP worker stopped following rank 0"
        try:
            s = await asyncio.wait_for(self.workers[0].stats.remote(), timeout=30)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            return f"rank 0 is unreachable: {type(e).__name__}"
        return f"engine loop died: {s['dead']}" if s["dead"] else None

    async def recover(self) -> bool:
        """Rebuild the group if it is broken; True if it had to."""
        async with self._rebuild_lock:
            why = await self._failure()
            if why is None:
                return False
            log.warning("replica group %s broken (%s): rebuilding", self.model_name, why)
            self._rebuilding = True
            try:
                for w in self.workers:
                    ray.kill(w, no_restart=True)
                await asyncio.get_running_loop().run_in_executor(None, self._start)
                self.rebuilds += 1
            finally:
                self._rebuilding = False
            return True

    def _recover_soon(self) -> None:
        if not self._rebuild_lock.locked():
            asyncio.get_running_loop().create_task(self.recover())

    async def generate(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if req.adapter is not None:
            check_name(req.adapter)
        if self._rebuilding:
            raise ReplicaGroupFailed("the replica group is restarting")
        gen = self.workers[0].generate.options(num_returns="streaming").remote(req)
        done = started = False
        try:
            async for ref in gen:
                try:
                    out = await ref
                except ray.exceptions.RayTaskError as e:
                    err = unwrap(e)
                    if isinstance(err, ReplicaGroupFailed):
                        self._recover_soon()
                    raise err from None
                done = out.finished
                if out.error_type == ReplicaGroupFailed.__name__:
                    self._recover_soon()
                if done and out.finish_reason == "error" and not started:
                    raise error_from_name(out.error_type, out.error or "request failed")
                started = True
                if done and req.adapter is not None and out.finish_reason != "error":
                    self._resident.add(req.adapter)
                yield out
        except ray.exceptions.RayActorError as e:  # rank 0 itself died
            self._recover_soon()
            done = True
            raise ReplicaGroupFailed(f"rank 0 of the replica group died: {type(e).__name__}") from None
        finally:
            if not done:
                ray.cancel(gen)
                try:
                    await self.abort(req.request_id)
                except ray.exceptions.RayError:
                    log.debug("abort of %s not delivered", req.request_id, exc_info=True)

    async def abort(self, request_id: str) -> None:
        await self.workers[0].abort.remote(request_id)

    async def _on_rank0(self, method: str, *args: Any) -> Any:
        """Rank 0's `method`, its typed error raised as such."""
        try:
            return await getattr(self.workers[0], method).remote(*args)
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None

    async def load_adapter(self, name: str) -> None:
        await self._on_rank0("load_adapter", check_name(name))
        self._resident.add(name)

    async def unload_adapter(self, name: str) -> None:
        """Evict it from the pool and the store's host cache: the next use reads S3 again (a re-pushed
        adapter is served in its new version, a deleted one is not found)."""
        await self._on_rank0("unload_adapter", check_name(name))
        self._resident.discard(name)
        try:
            await self.store.invalidate.remote(name)
        except ray.exceptions.RayActorError:
            log.info("adapter store restarting: its cache (and %s in it) starts empty", name)

    def resident_adapters(self) -> list[str]:
        return sorted(self._resident)

    async def list_adapters(self) -> list[dict]:
        try:
            infos = await self.store.list_adapters.remote()
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from None
        except ray.exceptions.RayActorError as e:
            raise AdapterUnavailable(f"the adapter store is restarting ({type(e).__name__})") from None
        return [i.to_dict() for i in infos]

    async def stats(self) -> dict:
        s = await self.workers[0].stats.remote()
        self._resident = set(s["resident_adapters"])
        s["store"] = await self.store.stats.remote()
        s["workers"] = self.worker_info
        return s

    async def worker_call_counts(self) -> list[dict[str, int]]:
        return await asyncio.gather(*[w.call_counts.remote() for w in self.workers])

    async def pool_usage(self) -> list[dict]:
        """Every rank's pool usage (they replay rank 0's operations, so they agree)."""
        return await asyncio.gather(*[w.pool_usage.remote() for w in self.workers])

    async def check_health(self) -> None:
        """Rebuilds a broken group (never touches S3); raises only if that fails."""
        await self.recover()

    def shutdown(self) -> None:
        try:
            ray.get(self.workers[0].stop.remote(), timeout=30)
        except Exception:
            log.warning("rank 0 did not stop cleanly", exc_info=True)
        for w in self.workers:
            ray.kill(w)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)


def bundles(config: GroupConfig) -> list[dict[str, float]]:
    """One bundle per TP worker: a whole GPU each, or a CPU fraction here."""
    return worker_bundles(config.tp, config.use_gpu, config.worker_cpus)


def ray_placement_group(config: GroupConfig) -> PlacementGroup:
    pg = placement_group(bundles(config), strategy="STRICT_PACK")
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


__all__ = ["EngineGroup", "GroupConfig", "TPWorkerActor", "bundles", "store_actor_name"]
