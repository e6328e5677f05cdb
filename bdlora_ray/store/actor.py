"""`AdapterStore`: lists, validates and caches adapters; hands each TP rank its shard.

A plain class (testable without Ray) plus `AdapterStoreActor`, its Ray actor.
The actor is threaded (`max_concurrency`), so a cold download does not stall
requests for cached adapters; the class guards its state with one lock.

- Host cache: validated shards in an LRU bounded in bytes.
- Single flight: concurrent cold loads of one (adapter, rank) share ONE
  download; if it fails, every waiter gets that same error and nothing is
  cached, so a later call tries again.
- Only a shard that passed `validate.validate_shard` enters the cache.
- `get_shard` returns a `ShardBlob`: one uint8 numpy buffer plus an index.
  Through Ray the buffer travels out-of-band via the object store, so a TP
  worker maps it without a copy and `ShardBlob.tensors()` views it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import ray
import torch
from torch import Tensor

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import AdapterInvalid, AdapterNotFound
from bdlora_ray.lora.shard import AdapterMeta
from bdlora_ray.store.manifest import Manifest, check_name, sha256_hex
from bdlora_ray.store.s3 import AdapterBucket, AdapterInfo, S3Config
from bdlora_ray.store.validate import DEFAULT_MAX_HEADER_BYTES, validate_shard

log = logging.getLogger(__name__)
T = TypeVar("T")

_ALIGN = 64  # byte alignment of each tensor in a ShardBlob: enough for any dtype view and vector loads


@dataclass(frozen=True)
class StoreConfig:
    uri: str                          # s3://bucket/prefix holding the adapters
    model: LlamaConfig                # the served base model; manifests must match it
    tp: int                           # the served TP degree; shards must be cut for it
    max_rank: int = 64                # largest global LoRA rank served
    cache_bytes: int = 2 << 30        # host-memory budget of the shard cache
    max_shard_bytes: int = 1 << 30    # refuse larger shard files before downloading them
    max_manifest_bytes: int = 1 << 20
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_manifests: int = 100_000      # manifests kept (a few KB each)
    check_base_name: bool = True      # also require the manifest's base model name to equal model.name
    s3: S3Config = S3Config()         # retries and timeouts


@dataclass
class ShardBlob:
    name: str            # adapter name
    tp_rank: int         # the TP rank this shard belongs to
    meta: AdapterMeta    # scale, rank, mode, targets of the adapter
    buffer: np.ndarray   # (nbytes,) uint8, every tensor back to back at _ALIGN-aligned offsets
    index: tuple[tuple[str, str, tuple[int, ...], int], ...]  # (tensor name, torch dtype name, shape, byte offset)
    sha256: str = ""     # of the shard file it came from: which version of the adapter this is
    version: str = ""    # sha256 of the adapter's manifest (all ranks' files): keys its KV in the prefix cache

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @classmethod
    def pack(cls, name: str, tp_rank: int, meta: AdapterMeta, tensors: dict[str, Tensor],
             sha256: str = "", version: str = "") -> "ShardBlob":
        index, offset = [], 0
        for k, t in tensors.items():
            index.append((k, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        buffer = np.zeros(offset, dtype=np.uint8)
        flat = torch.from_numpy(buffer)
        for (k, dtype, shape, off), t in zip(index, tensors.values()):
            n = t.numel() * t.element_size()
            flat[off:off + n].view(t.dtype).copy_(t.reshape(-1))
        return cls(name, tp_rank, meta, buffer, tuple(index), sha256, version)

    def tensors(self) -> dict[str, Tensor]:
        """The shard's tensors as views of `buffer` (no copy). Read-only: copy before writing."""
        with warnings.catch_warnings():
            # A buffer mapped from Ray's object store is read-only; we only ever read it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            flat = torch.from_numpy(self.buffer)
        out = {}
        for k, dtype, shape, off in self.index:
            dt = getattr(torch, dtype)
            n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
            out[k] = flat[off:off + n].view(dt).view(shape)
        return out


@dataclass
class StoreStats:
    downloads: int = 0         # shard files fetched from S3
    bytes_by_rank: dict[int, int] = field(default_factory=dict)  # TP rank -> shard bytes fetched from S3
    manifest_fetches: int = 0  # manifest.json objects fetched
    hits: int = 0              # get_shard answered from the host cache
    coalesced: int = 0         # callers that waited for another caller's in-flight load
    failures: int = 0          # loads that raised (nothing was cached)
    evictions: int = 0         # cached shards dropped to stay within cache_bytes
    cached_bytes: int = 0      # bytes of shards in the host cache now
    cached_shards: int = 0     # shards in the host cache now

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "bytes_by_rank": dict(self.bytes_by_rank)}


class _ByteLRU:
    """(name, rank) -> ShardBlob, least recently used dropped first once over `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[str, int], ShardBlob] = OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, int]) -> ShardBlob | None:
        blob = self.entries.get(key)
        if blob is not None:
            self.entries.move_to_end(key)
        return blob

    def put(self, key: tuple[str, int], blob: ShardBlob) -> int:
        """Insert; returns how many entries were evicted. A blob above capacity is not kept."""
        if blob.nbytes > self.capacity:
            log.warning("shard %s/%d (%d bytes) exceeds the whole cache (%d bytes); served uncached",
                        blob.name, blob.tp_rank, blob.nbytes, self.capacity)
            return 0
        self.pop(key)
        evicted = 0
        while self.nbytes + blob.nbytes > self.capacity:
            self.pop(next(iter(self.entries)))
            evicted += 1
        self.entries[key] = blob
        self.nbytes += blob.nbytes
        return evicted

    def pop(self, key: tuple[str, int]) -> None:
        blob = self.entries.pop(key, None)
        if blob is not None:
            self.nbytes -= blob.nbytes


class AdapterStore:
    """See the module docstring. All public methods are safe to call from many threads."""

    def __init__(self, config: StoreConfig, client: Any = None) -> None:
        config.model.check_tp(config.tp)
        self.config = config
        self.bucket = AdapterBucket(config.uri, config.s3, client)
        self._lock = threading.Lock()
        self._cache = _ByteLRU(config.cache_bytes)
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # validated for this server, LRU
        self._inflight: dict[tuple, Future] = {}  # load key -> the leader's result, for joiners
        self._stats = StoreStats()

    # ---- single flight -----------------------------------------------------

    def _single_flight(self, key: tuple, cached: Callable[[], T | None], load: Callable[[], T]) -> T:
        """`cached()` if it has the value, else `load()` run once for all concurrent callers of `key`.

        Every caller gets the one load's result or its exception. `cached` runs
        under the lock together with the in-flight lookup, so a caller cannot
        miss the cache just before a load finishes and then start another one.
        `load` must fill the cache (under the lock) before it returns.
        """
        with self._lock:
            value = cached()
            if value is not None:
                return value
            fut = self._inflight.get(key)
            leader = fut is None
            if leader:
                fut = self._inflight[key] = Future()
            else:
                self._stats.coalesced += 1
        if not leader:
            return fut.result()  # re-raises the leader's exception
        try:
            value = load()
        except BaseException as e:
            with self._lock:
                self._stats.failures += 1
                del self._inflight[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._inflight[key]
        fut.set_result(value)
        return value

    # ---- manifests ---------------------------------------------------------

    def manifest(self, name: str) -> Manifest:
        """The adapter's manifest, checked against the served model; cached once valid."""
        check_name(name)

        def cached() -> Manifest | None:
            m = self._manifests.get(name)
            if m is not None:
                self._manifests.move_to_end(name)
            return m

        return self._single_flight(("manifest", name), cached, lambda: self._fetch_manifest(name))

    def _fetch_manifest(self, name: str) -> Manifest:
        c = self.config
        with self._lock:
            self._stats.manifest_fetches += 1
        m = self.bucket.manifest(name, c.max_manifest_bytes)
        try:
            m.check_serves(c.model, c.tp, c.max_rank, c.check_base_name)
        except AdapterInvalid as e:
            raise AdapterInvalid(f"adapter {name!r}: {e}") from None
        with self._lock:
            self._manifests[name] = m
            while len(self._manifests) > c.max_manifests:
                self._manifests.popitem(last=False)
        return m

    def list_adapters(self) -> list[AdapterInfo]:
        """All adapters under the store URI; those this server cannot serve carry an error."""
        return self.bucket.catalog(self.manifest)

    # ---- shards ------------------------------------------------------------

    def get_shard(self, name: str, tp_rank: int) -> ShardBlob:
        """TP rank `tp_rank`'s validated shard of `name` (only that rank's file is read)."""
        check_name(name)
        if not 0 <= tp_rank < self.config.tp:
            raise ValueError(f"tp_rank {tp_rank} outside TP degree {self.config.tp}")

        def cached() -> ShardBlob | None:
            blob = self._current((name, tp_rank))
            self._stats.hits += blob is not None
            return blob

        return self._single_flight(("shard", name, tp_rank), cached, lambda: self._load_shard(name, tp_rank))

    def _current(self, key: tuple[str, int]) -> ShardBlob | None:
        """The cached shard if it is the version the cached manifest names (call under the lock).

        A load that was in flight while the adapter was invalidated (a corrupt sibling shard, an
        unload) may cache its shard afterwards; without a matching manifest it is never served, so
        ranks never mix two versions of an adapter.
        """
        blob = self._cache.get(key)
        m = self._manifests.get(key[0])
        if blob is None or m is None or m.files[key[1]].sha256 != blob.sha256:
            return None
        return blob

    def _load_shard(self, name: str, tp_rank: int, recheck: bool = True) -> ShardBlob:
        c = self.config
        with self._lock:
            was_cached = name in self._manifests
        m = self.manifest(name)
        f = m.files[tp_rank]
        with self._lock:  # the manifest was read again (evicted, invalidated): the shard may still be good
            blob = self._current((name, tp_rank))
            if blob is not None:
                self._stats.hits += 1
                return blob
        what = f"adapter {name!r} {f.name}"
        try:
            if f.size > c.max_shard_bytes:
                raise AdapterInvalid(f"{what}: {f.size} bytes exceeds the limit {c.max_shard_bytes}")
            try:
                data = self.bucket.get(name, f.name, c.max_shard_bytes, expected_size=f.size)
            except AdapterNotFound:
                raise AdapterInvalid(f"{what}: listed in the manifest but missing (incomplete upload?)") from None
            with self._lock:
                self._stats.downloads += 1
                self._stats.bytes_by_rank[tp_rank] = self._stats.bytes_by_rank.get(tp_rank, 0) + len(data)
            tensors = validate_shard(data, m, tp_rank, c.model, c.max_header_bytes, what)
        except AdapterInvalid:
            # The manifest may be stale (adapter re-pushed, fixed) or lie: read it afresh next time.
            self.invalidate(name)
            if recheck and was_cached:
                if self.manifest(name).files[tp_rank] != f:
                    # It was stale: the adapter changed in S3 since its manifest was cached, so this
                    # request gets what S3 holds now, not the failure of an older version.
                    log.info("adapter %s changed in the store since its manifest was cached: loading it again",
                             name)
                    return self._load_shard(name, tp_rank, recheck=False)
                self.invalidate(name)  # the same, and broken: keep nothing of it
            raise
        blob = ShardBlob.pack(name, tp_rank, m.meta, tensors, f.sha256, sha256_hex(m.to_json()))
        with self._lock:
            if self._manifests.get(name) is m:  # else invalidated meanwhile: hand it out, keep nothing
                self._stats.evictions += self._cache.put((name, tp_rank), blob)
        log.info("loaded adapter %s rank %d (%d bytes)", name, tp_rank, f.size)
        return blob

    def invalidate(self, name: str) -> None:
        """Forget the adapter's manifest and cached shards (e.g. after it was pushed again)."""
        with self._lock:
            self._manifests.pop(name, None)
            for rank in range(self.config.tp):
                self._cache.pop((name, rank))

    def cached(self) -> list[tuple[str, int]]:
        """(name, rank) of cached shards, least recently used first."""
        with self._lock:
            return list(self._cache.entries)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._stats.cached_bytes = self._cache.nbytes
            self._stats.cached_shards = len(self._cache.entries)
            return self._stats.to_dict()

# Threaded actor: cold downloads run beside cache hits. num_cpus=0: it mostly waits on I/O.
AdapterStoreActor = ray.remote(num_cpus=0, max_concurrency=16)(AdapterStore)
