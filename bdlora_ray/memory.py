"""The unified paged pool of one TP rank: KV cache and adapter weights in one tensor.

As in S-LoRA, one device tensor `data` of shape (num_layers, num_pages, P)
holds both. A page id means the same slot in every layer, so one page table
per sequence (KV blocks) and one per adapter (its `AdapterLayout` virtual
buffer, see `bdlora_ray.lora.layout` and `kernels.lora_ref`) serve all
layers. Sequences of any length and adapters of any rank share the pages
without fragmentation: only whole pages are ever handed out.

Adapters that a running request uses are pinned (refcount); idle ones stay
resident as a cache and are evicted least-recently-used when KV blocks or
another adapter need room. Allocation either succeeds completely or raises
`PoolExhausted` and changes nothing.

Prefix caching (as vLLM's block pool): a full KV block may be registered
under a hash of its content (`cache_blocks`; the caller's hash chains the
adapter version, the parent block and the block's tokens). Several
sequences may then share it (`share_kv`); a block's refcount counts them.
When the last one lets go, a registered block is not freed but kept as a
cached block, evicted least-recently-used together with idle adapters (one
clock for both) when pages are needed. Every operation is deterministic, so
ranks replaying the same calls end with the same pages and caches.

Not thread-safe, on purpose: the engine loop of a replica group owns its
pools and is the only caller, so locking would only cost time. Callers from
other threads must serialise through that loop.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import PoolExhausted
from bdlora_ray.lora.layout import AdapterLayout
from bdlora_ray.lora.shard import AdapterMeta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    num_layers: int                # layers of the model; each page id exists once per layer
    num_pages: int                 # pages per layer, shared by KV blocks and adapters
    block_size: int = 16           # tokens held by one KV page
    kv_heads: int = 1              # KV heads on this rank (num_kv_heads // tp)
    head_dim: int = 64             # elements per head
    page_elems: int | None = None  # elements per page per layer; None = one KV block, 2*block_size*kv_heads*head_dim
    dtype: torch.dtype = torch.float32  # element type of the pool (the model's dtype)
    device: str = "cpu"            # where `data` lives

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "block_size", "kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PoolConfig.{name} must be positive, got {getattr(self, name)}")
        if self.page_elems is not None and self.page_elems < self.kv_block_elems:
            # A KV block must fit in one page, or a sequence's blocks could not be paged.
            raise ValueError(f"page_elems={self.page_elems} is smaller than one KV block ({self.kv_block_elems})")

    @property
    def kv_block_elems(self) -> int:
        """Elements of one layer's KV block: K and V for block_size tokens."""
        return 2 * self.block_size * self.kv_heads * self.head_dim

    @property
    def elems_per_page(self) -> int:
        return self.page_elems if self.page_elems is not None else self.kv_block_elems

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.num_pages * self.elems_per_page * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def for_model(cls, cfg: LlamaConfig, tp: int, num_pages: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, device: str = "cpu") -> "PoolConfig":
        """The pool of one rank of `cfg` served at TP degree `tp`."""
        cfg.check_tp(tp)
        return cls(num_layers=cfg.num_layers, num_pages=num_pages, block_size=block_size,
                   kv_heads=cfg.num_kv_heads // tp, head_dim=cfg.head_dim, dtype=dtype, device=device)


@dataclass
class PooledAdapter:
    name: str              # adapter name, the key of the pool's adapter table
    meta: AdapterMeta      # scale, rank, mode, targets: what the kernels need besides pages
    layout: AdapterLayout  # where each A/B matrix sits in the per-layer virtual buffer
    pages: Tensor          # (n_pages,) int32 page ids on the pool's device, the adapter's page table
    slot: int              # its row in the kernels' slot tables while resident (reused after eviction)
    refcount: int = 0      # running requests using it; > 0 means pinned (never evicted)
    version: str | None = None  # which version of the adapter these weights are (None: unknown, never cached)
    last_used: int = 0     # the pool's clock at its last load or pin (LRU against cached blocks)

    @property
    def num_pages(self) -> int:
        return int(self.pages.numel())


class PoolListener(Protocol):
    """Told of every adapter entering or leaving the pool, after the fact (e.g. `SlotTables`,
    which derives the kernels' per-slot metadata once per load)."""

    def adapter_loaded(self, adapter: PooledAdapter) -> None: ...

    def adapter_evicted(self, adapter: PooledAdapter) -> None: ...


@dataclass(frozen=True)
class PoolUsage:
    total_pages: int       # pages per layer
    free_pages: int        # pages owned by nobody
    kv_pages: int          # pages holding KV blocks of live sequences (a shared block counts once)
    cached_pages: int      # full KV blocks no live sequence uses, kept for prefix hits (evictable)
    adapter_pages: int     # pages holding resident adapters (pinned or idle)
    pinned_adapter_pages: int  # of adapter_pages, those of pinned adapters
    sequences: int         # live sequences
    adapters: int          # resident adapters
    pinned_adapters: int   # resident adapters with refcount > 0
    loads: int             # adapters written into the pool since creation
    evictions: int         # adapters evicted to make room since creation
    block_evictions: int   # cached KV blocks evicted to make room since creation

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class PagePool:
    """One rank's unified page pool; see the module docstring."""

    def __init__(self, config: PoolConfig, listener: PoolListener | None = None) -> None:
        self.config = config
        self.listener = listener
        c = config
        # (num_layers, num_pages, P): every KV block and adapter page of every layer.
        self.data = torch.zeros(c.num_layers, c.num_pages, c.elems_per_page, dtype=c.dtype, device=c.device)
        self._free: list[int] = list(range(c.num_pages))  # min-heap of free page ids (a sorted list is a heap)
        self._seqs: dict[Hashable, list[int]] = {}  # sequence id -> its KV page table, block i = tokens [i*bs, (i+1)*bs)
        self._adapters: OrderedDict[str, PooledAdapter] = OrderedDict()  # oldest use first (LRU order)
        self._free_slots: list[int] = []  # min-heap of slot ids freed by evictions
        self._next_slot = 0               # slots ever handed out: the lowest never-used id
        self._loads = 0
        self._evictions = 0
        self._clock = 0                   # ticks at every adapter use and block release: one LRU order for both
        self._refs: dict[int, int] = {}   # KV page -> live sequences whose table holds it
        self._hash_of: dict[int, str] = {}   # registered KV page -> its block hash
        self._page_of: dict[str, int] = {}   # block hash -> the page holding that block
        self._cached: OrderedDict[int, int] = OrderedDict()  # registered pages nobody uses -> clock, oldest first
        self._block_evictions = 0
        log.info("page pool: %d layers x %d pages x %d elems (%.1f MiB, %s on %s)", c.num_layers,
                 c.num_pages, c.elems_per_page, c.nbytes / 2**20, c.dtype, c.device)

    # ---- page allocation ---------------------------------------------------

    def _idle_pages(self) -> int:
        return sum(s.num_pages for s in self._adapters.values() if s.refcount == 0)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def available(self, keep: str | None = None, reuse: tuple[int, ...] = ()) -> int:
        """Pages `_take` could hand out now: free, cached blocks and idle adapters, except adapter
        `keep` and the cached pages in `reuse` (about to be pinned or shared)."""
        idle = self._idle_pages()
        if keep is not None and keep in self._adapters and self._adapters[keep].refcount == 0:
            idle -= self._adapters[keep].num_pages
        return len(self._free) + len(self._cached) - sum(p in self._cached for p in reuse) + idle

    def _take(self, n: int, what: str, top: bool = False) -> list[int]:
        """n free page ids, evicting cached blocks and idle adapters, least recently used first,
        if needed; all or nothing. The lowest free ids, or with `top` the highest, ascending."""
        if n > len(self._free) and n > len(self._free) + len(self._cached) + self._idle_pages():
            u = self.usage()
            raise PoolExhausted(
                f"{what} needs {n} pages; free {u.free_pages}, cached blocks {u.cached_pages}, idle adapters "
                f"{u.adapter_pages - u.pinned_adapter_pages}, KV {u.kv_pages}, pinned adapters "
                f"{u.pinned_adapter_pages} of {u.total_pages}")
        while len(self._free) < n:
            adapter = next((a for a in self._adapters.values() if a.refcount == 0), None)
            block = next(iter(self._cached.items()), None)
            if block is not None and (adapter is None or block[1] < adapter.last_used):
                self._drop_block(block[0])
            else:
                self._evict(adapter.name)
        if not top:
            return [heapq.heappop(self._free) for _ in range(n)]
        taken = sorted(heapq.nlargest(n, self._free))
        high = set(taken)
        self._free = [p for p in self._free if p not in high]
        heapq.heapify(self._free)
        return taken

    def _drop_block(self, page: int) -> None:
        """Forget a cached block nobody uses; its page becomes free."""
        del self._cached[page]
        del self._page_of[self._hash_of.pop(page)]
        heapq.heappush(self._free, page)
        self._block_evictions += 1

    def _give_back(self, pages: list[int]) -> None:
        for p in pages:
            heapq.heappush(self._free, p)

    # ---- KV cache ----------------------------------------------------------

    def allocate_kv(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s page table to hold `num_tokens` tokens; returns the table.

        A new sequence starts with an empty table. Raises PoolExhausted (and
        allocates nothing) when the pages cannot be found even after evicting
        every idle adapter.
        """
        table = self._seqs.get(seq_id, [])
        need = -(-num_tokens // self.config.block_size) - len(table)
        if need > 0:
            new = self._take(need, f"sequence {seq_id!r}")
            for p in new:
                self._refs[p] = 1
            table = table + new
        self._seqs[seq_id] = table
        return table

    def free_kv(self, seq_id: Hashable) -> None:
        """Release a finished sequence's blocks (no-op for an unknown id). Registered blocks that
        nobody else uses stay cached; its last blocks are the first to be evicted (as vLLM frees)."""
        for p in reversed(self._seqs.pop(seq_id, [])):
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if p in self._hash_of:
                self._cached[p] = self._tick()
            else:
                heapq.heappush(self._free, p)

    # ---- prefix cache ----------------------------------------------------------

    def cached_page(self, block_hash: str) -> int | None:
        """The page holding the block registered under `block_hash`, if any (a read: nothing changes)."""
        return self._page_of.get(block_hash)

    def share_kv(self, seq_id: Hashable, pages: list[int]) -> list[int]:
        """Start `seq_id`'s page table with registered blocks (prefix hits), shared, not copied."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has KV blocks")
        for p in pages:
            if p not in self._hash_of:
                raise ValueError(f"page {p} holds no registered block")
        for p in pages:
            self._cached.pop(p, None)
            self._refs[p] = self._refs.get(p, 0) + 1
        self._seqs[seq_id] = list(pages)
        return self._seqs[seq_id]

    def cache_blocks(self, seq_id: Hashable, first: int, hashes: list[str]) -> int:
        """Register `seq_id`'s blocks first, first+1, ... (full, computed) under `hashes`; a hash already
        registered for another page, or a page already registered, is left as it is. Returns how many
        were registered."""
        table, done = self._seqs[seq_id], 0
        for i, h in enumerate(hashes, start=first):
            p = table[i]
            if h in self._page_of or p in self._hash_of:
                continue
            self._page_of[h], self._hash_of[p] = p, h
            done += 1
        return done

    def kv_page_table(self, seq_id: Hashable) -> list[int]:
        return self._seqs[seq_id]

    def kv_cache(self, layer: int) -> Tensor:
        """Layer `layer` as KV blocks: (num_pages, 2, block_size, kv_heads, head_dim), a view."""
        c = self.config
        return self.data[layer, :, :c.kv_block_elems].view(c.num_pages, 2, c.block_size, c.kv_heads, c.head_dim)

    # ---- adapters ----------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def adapter(self, name: str) -> PooledAdapter:
        """The resident adapter `name`; KeyError if it is not in the pool."""
        return self._adapters[name]

    def load_adapter(self, name: str, shard: dict[str, Tensor], meta: AdapterMeta,
                     pin: bool = False, version: str | None = None) -> PooledAdapter:
        """Make `name` resident (copying `shard` into its pages unless already there).

        `shard` is this rank's tensors, named `layers.{l}.{target}.lora_A|B`
        (e.g. `ShardBlob.tensors()` from the adapter store).
        Marks the adapter most recently used; `pin=True` also pins it. `version` names the
        weights (the prefix cache keys KV blocks by it); a resident adapter keeps its own.
        """
        slot = self._adapters.get(name)
        if slot is None:
            layout = AdapterLayout.from_shard(self.config.num_layers, shard)
            if not layout.segments:
                raise ValueError(f"adapter {name!r}: shard has no layer-0 tensors")
            # Adapters from the top of the pool, KV blocks from the bottom: adapters loaded one after
            # another then lie in runs of pages at a regular stride, which the torch kernels read in
            # place as one strided tensor (no per-step gather of their pages).
            ids = self._take(layout.num_pages(self.config.elems_per_page), f"adapter {name!r}", top=True)
            pages = torch.tensor(ids, dtype=torch.int32, device=self.config.device)
            try:
                layout.write_to_pool(shard, self.data, pages)
            except Exception:
                self._give_back(ids)  # a malformed shard must not leak pages
                raise
            slot = PooledAdapter(name=name, meta=meta, layout=layout, pages=pages, slot=self._take_slot(),
                                 version=version)
            self._adapters[name] = slot
            self._loads += 1
            if self.listener is not None:
                self.listener.adapter_loaded(slot)
            log.debug("loaded adapter %s into %d pages", name, len(ids))
        self._adapters.move_to_end(name)
        slot.last_used = self._tick()
        if pin:
            slot.refcount += 1
        return slot

    def pin(self, name: str) -> PooledAdapter:
        """Count one more user of a resident adapter; it cannot be evicted until unpinned."""
        slot = self._adapters[name]
        slot.refcount += 1
        self._adapters.move_to_end(name)
        slot.last_used = self._tick()
        return slot

    def unpin(self, name: str) -> None:
        slot = self._adapters[name]
        if slot.refcount <= 0:
            raise ValueError(f"adapter {name!r} is not pinned")
        slot.refcount -= 1

    def evict_adapter(self, name: str) -> None:
        """Drop an idle adapter now (e.g. it was deleted from the store)."""
        if self._adapters[name].refcount:
            raise ValueError(f"adapter {name!r} is pinned by {self._adapters[name].refcount} request(s)")
        self._evict(name)

    def _take_slot(self) -> int:
        """The lowest free slot id: slot tables stay as small as the resident set."""
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._next_slot += 1
        return self._next_slot - 1

    def _evict(self, name: str) -> None:
        slot = self._adapters.pop(name)
        self._give_back(slot.pages.tolist())
        heapq.heappush(self._free_slots, slot.slot)
        if self.listener is not None:
            self.listener.adapter_evicted(slot)
        self._evictions += 1
        log.debug("evicted adapter %s (%d pages)", name, slot.num_pages)

    def adapters_lru(self) -> list[str]:
        """Resident adapter names, least recently used first (the eviction order)."""
        return list(self._adapters)

    def adapter_page_table(self, names: list[str]) -> Tensor:
        """(len(names), max_pages) int32 page tables for the kernels, padded with page 0.

        Padding is never read: a slot only addresses its own layout's elements.
        """
        slots = [self._adapters[n] for n in names]
        width = max((s.num_pages for s in slots), default=1)
        table = torch.zeros(len(slots), width, dtype=torch.int32, device=self.config.device)
        for i, s in enumerate(slots):
            table[i, :s.num_pages] = s.pages
        return table

    # ---- accounting ----------------------------------------------------------

    def usage(self) -> PoolUsage:
        ad = sum(s.num_pages for s in self._adapters.values())
        pinned = [s for s in self._adapters.values() if s.refcount > 0]
        return PoolUsage(
            total_pages=self.config.num_pages, free_pages=len(self._free), kv_pages=len(self._refs),
            cached_pages=len(self._cached), adapter_pages=ad,
            pinned_adapter_pages=sum(s.num_pages for s in pinned), sequences=len(self._seqs),
            adapters=len(self._adapters), pinned_adapters=len(pinned), loads=self._loads,
            evictions=self._evictions, block_evictions=self._block_evictions)
