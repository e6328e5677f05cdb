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
    kv_pages: int          # pages holding KV blocks of live sequences
    adapter_pages: int     # pages holding resident adapters (pinned or idle)
    pinned_adapter_pages: int  # of adapter_pages, those of pinned adapters
    sequences: int         # live sequences
    adapters: int          # resident adapters
    pinned_adapters: int   # resident adapters with refcount > 0
    loads: int             # adapters written into the pool since creation
    evictions: int         # adapters evicted to make room since creation

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
        log.info("page pool: %d layers x %d pages x %d elems (%.1f MiB, %s on %s)", c.num_layers,
                 c.num_pages, c.elems_per_page, c.nbytes / 2**20, c.dtype, c.device)

    # ---- page allocation ---------------------------------------------------

    def _idle_pages(self) -> int:
        return sum(s.num_pages for s in self._adapters.values() if s.refcount == 0)

    def _take(self, n: int, what: str) -> list[int]:
        """n free page ids, evicting idle adapters LRU-first if needed; all or nothing."""
        if n > len(self._free) and n > len(self._free) + self._idle_pages():  # the sum only when short
            u = self.usage()
            raise PoolExhausted(
                f"{what} needs {n} pages; free {u.free_pages}, idle adapters {u.adapter_pages - u.pinned_adapter_pages}, "
                f"KV {u.kv_pages}, pinned adapters {u.pinned_adapter_pages} of {u.total_pages}")
        while len(self._free) < n:
            victim = next(name for name, s in self._adapters.items() if s.refcount == 0)
            self._evict(victim)
        return [heapq.heappop(self._free) for _ in range(n)]

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
            table = table + self._take(need, f"sequence {seq_id!r}")
        self._seqs[seq_id] = table
        return table

    def free_kv(self, seq_id: Hashable) -> None:
        """Release a finished sequence's blocks (no-op for an unknown id)."""
        self._give_back(self._seqs.pop(seq_id, []))

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
                     pin: bool = False) -> PooledAdapter:
        """Make `name` resident (copying `shard` into its pages unless already there).

        `shard` is this rank's tensors, named `layers.{l}.{target}.lora_A|B`
        (e.g. `ShardBlob.tensors()` from the adapter store).
        Marks the adapter most recently used; `pin=True` also pins it.
        """
        slot = self._adapters.get(name)
        if slot is None:
            layout = AdapterLayout.from_shard(self.config.num_layers, shard)
            if not layout.segments:
                raise ValueError(f"adapter {name!r}: shard has no layer-0 tensors")
            ids = self._take(layout.num_pages(self.config.elems_per_page), f"adapter {name!r}")
            pages = torch.tensor(ids, dtype=torch.int32, device=self.config.device)
            try:
                layout.write_to_pool(shard, self.data, pages)
            except Exception:
                self._give_back(ids)  # a malformed shard must not leak pages
                raise
            slot = PooledAdapter(name=name, meta=meta, layout=layout, pages=pages, slot=self._take_slot())
            self._adapters[name] = slot
            self._loads += 1
            if self.listener is not None:
                self.listener.adapter_loaded(slot)
            log.debug("loaded adapter %s into %d pages", name, len(ids))
        self._adapters.move_to_end(name)
        if pin:
            slot.refcount += 1
        return slot

    def pin(self, name: str) -> PooledAdapter:
        """Count one more user of a resident adapter; it cannot be evicted until unpinned."""
        slot = self._adapters[name]
        slot.refcount += 1
        self._adapters.move_to_end(name)
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
        kv = sum(len(t) for t in self._seqs.values())
        ad = sum(s.num_pages for s in self._adapters.values())
        pinned = [s for s in self._adapters.values() if s.refcount > 0]
        return PoolUsage(
            total_pages=self.config.num_pages, free_pages=len(self._free), kv_pages=kv, adapter_pages=ad,
            pinned_adapter_pages=sum(s.num_pages for s in pinned), sequences=len(self._seqs),
            adapters=len(self._adapters), pinned_adapters=len(pinned), loads=self._loads,
            evictions=self._evictions)
