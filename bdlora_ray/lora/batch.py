"""Per-step LoRA batch: the step's row -> slot index beside the persistent slot tables.

`LoraBatch.from_tables` is what a step costs: one upload of the index and a
few vectorised host ops on it; every other kernel argument is a view of the
rank's `SlotTables`, written when adapters entered the pool. Every TP rank
builds its own from the same rows (its tables hold its own page ids and
slice offsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bdlora_ray import kernels

from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.layout import AdapterLayout
from bdlora_ray.lora.shard import AdapterMeta
from bdlora_ray.lora.slots import COLUMN_GROUPS, GROUPS, SlotTables

__all__ = ["AdapterSlot", "COLUMN_GROUPS", "GROUPS", "GroupMeta", "LoraBatch"]


@dataclass(frozen=True)
class AdapterSlot:
    """An adapter resident in a rank's pool, outside a `PagePool` (tests place pages themselves)."""

    meta: AdapterMeta
    layout: AdapterLayout
    pages: Tensor  # (n,) int32 page ids, the same in every layer


@dataclass
class GroupMeta:
    """Kernel arguments for one fused linear; all (C, n_slices) slot tables unless noted."""

    a_offset: Tensor    # int64 virtual offset of A per slot and slice
    rank_a: Tensor      # int32 rows of A (0: slot does not adapt this slice)
    b_offset: Tensor    # int64 virtual offset of B
    rank_b: Tensor      # int32 columns of B (N * rank_a for slora column layers)
    out_start: Tensor   # int32 first output column B writes
    out_len: Tensor     # int32 rows of B
    slora_rows: Tensor  # (T,) bool: rows whose adapter needs this group's collective
    any_slora: bool     # whether the collective is issued at all this step
    width: int          # width R of the rank-space buffer h: the largest rank the step's rows use

    @property
    def active(self) -> bool:
        return self.width > 0


@dataclass
class LoraBatch:
    idx: Tensor                  # (T,) int32 slot of each row, -1 = base model only
    page_table: Tensor           # (C, max_pages) int32 slot table
    scale: Tensor                # (C,) float32 slot table
    pool: Tensor                 # (num_layers, num_pages, P): this rank's unified pool
    groups: dict[str, GroupMeta]
    segments: Any = None         # kernels.plan_segments: what every layer's kernels share this step
    backend: str | None = None   # the kernel backend every layer's calls run, resolved once per step

    @classmethod
    def from_tables(cls, tables: SlotTables, idx: Tensor, pool: Tensor) -> "LoraBatch":
        """The step's batch for rows using slots `idx` ((T,) host ints, -1 = no adapter)."""
        idx_host = idx.to(torch.int32)
        T = len(idx_host)
        if T and int(idx_host.max()) >= tables.capacity:
            raise ValueError(f"slot {int(idx_host.max())} is beyond the slot tables ({tables.capacity} slots)")
        rows = idx_host.long()  # -1 reads the mirrors' last row: width 0, no slora
        widths = tables.width_host[rows].amax(0).tolist() if T else [0] * len(GROUPS)
        any_slora = tables.slora_host[rows].any(0).tolist() if T else [False] * len(GROUPS)
        idx_dev = idx_host.to(tables.device)  # the step's one upload
        groups = {}
        for gi, (name, t) in enumerate(tables.groups.items()):
            slora_rows = t.slora[idx_dev.long()]  # (T,) gather on the device; -1 reads entry C (False)
            groups[name] = GroupMeta(t.a_offset, t.rank_a, t.b_offset, t.rank_b, t.out_start, t.out_len,
                                     slora_rows, bool(any_slora[gi]), int(widths[gi]))
        backend = kernels.resolve_backend(None, idx_dev)
        segments = kernels.plan_segments(idx_dev, tables.capacity, backend, slot_class=tables.class_host,
                                         slot_pages=tables.pages_host, workspace=tables.workspace,
                                         slot_first=tables.first_host)
        return cls(idx_dev, tables.page_table, tables.scale, pool, groups, segments, backend)

    @classmethod
    def build(cls, slots: list[AdapterSlot], idx: Tensor, pool: Tensor, cfg: LlamaConfig,
              tp_rank: int, tp: int) -> "LoraBatch":
        """A one-off batch over `slots` (idx indexes that list): fresh tables, for callers
        without a `PagePool` (tests, tools). Serving keeps its tables across steps instead."""
        tables = SlotTables(cfg, tp_rank, tp, pool.device, capacity=max(len(slots), 1))
        for a, slot in enumerate(slots):
            tables.set_slot(a, slot.meta, slot.layout, slot.pages)
        return cls.from_tables(tables, idx, pool)
