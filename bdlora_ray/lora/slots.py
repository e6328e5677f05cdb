"""Persistent per-slot LoRA kernel metadata of one TP rank (vLLM punica's slot buffers).

Every resident adapter owns a slot (`PooledAdapter.slot`, given by the pool).
When it enters the pool, `SlotTables.adapter_loaded` writes, once, its row of
every table the kernels read: page ids, scale and, per fused linear, each
slice's factor offsets, ranks and output columns. A step then only uploads
its row -> slot index (`SlotTables.batch`); the tables are indexed by slot
on the device, whatever the number of distinct adapters in the batch.

Host mirrors of two small per-slot facts (rank-space width and whether the
slot needs the `slora` collective, per fused linear) let a step decide its
buffer widths and collectives with vectorised host ops on its own index,
without reading the device back and without a loop over adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from bdlora_ray import kernels
from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.layout import GROUPS, AdapterLayout
from bdlora_ray.lora.shard import AdapterMeta

log = logging.getLogger(__name__)

COLUMN_GROUPS = ("qkv", "gate_up")
_INT_FIELDS = ("a_offset", "rank_a", "b_offset", "rank_b", "out_start", "out_len")
_DTYPES = {"a_offset": torch.int64, "b_offset": torch.int64}  # the others are int32


@dataclass
class GroupTable:
    """One fused linear's kernel arguments for every slot; all (C, n_slices) on the device."""

    a_offset: Tensor   # int64 virtual offset of A per slot and slice
    rank_a: Tensor     # int32 rows of A (0: the slot does not adapt this slice, or the slot is free)
    b_offset: Tensor   # int64 virtual offset of B
    rank_b: Tensor     # int32 columns of B (N * rank_a for slora column layers)
    out_start: Tensor  # int32 first output column B writes
    out_len: Tensor    # int32 rows of B
    slora: Tensor      # (C + 1,) bool: slot needs this linear's collective; entry C (idx -1) False


def local_slices(cfg: LlamaConfig, tp: int, group: str) -> list[tuple[int, int]]:
    """(start, length) of each target's output inside this rank's fused column output."""
    lens = [cfg.out_features(t) // tp for t in GROUPS[group]]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return list(zip(starts, lens))


def slot_rows(meta: AdapterMeta, layout: AdapterLayout, cfg: LlamaConfig, tp_rank: int, tp: int
              ) -> dict[str, tuple[dict[str, list[int]], bool]]:
    """One adapter's row of every group table: group -> (field -> per-slice values, needs slora)."""
    out = {}
    for group, targets in GROUPS.items():
        column = group in COLUMN_GROUPS
        local = local_slices(cfg, tp, group) if column else None
        row = {f: [0] * len(targets) for f in _INT_FIELDS}
        slora_any = False
        for s, target in enumerate(targets):
            seg_a, seg_b = layout.segment(target, "A"), layout.segment(target, "B")
            if seg_a is None:
                continue
            row["a_offset"][s], row["rank_a"][s] = seg_a.offset, seg_a.rows
            row["b_offset"][s], row["rank_b"][s], row["out_len"][s] = seg_b.offset, seg_b.cols, seg_b.rows
            slora = meta.target_mode(target) == "slora"
            slora_any |= slora
            if column:
                row["out_start"][s] = local[s][0]
            elif slora:  # B[O_i, :] lands in this rank's slice of the partial output
                row["out_start"][s] = tp_rank * seg_b.rows
        out[group] = (row, slora_any)
    return out


class SlotTables:
    """The kernels' per-slot tables of one rank; see the module docstring.

    Grows (doubling) when a slot or an adapter's page count exceeds it; a
    grown table is a new tensor, so a step must take its views after loads."""

    def __init__(self, cfg: LlamaConfig, tp_rank: int, tp: int, device: str | torch.device = "cpu",
                 capacity: int = 16, max_pages: int = 1) -> None:
        self.cfg, self.tp_rank, self.tp = cfg, tp_rank, tp
        self.device = torch.device(device)
        self.capacity = 0
        self.page_table = torch.zeros(0, max_pages, dtype=torch.int32, device=self.device)  # (C, max_pages)
        self.scale = torch.zeros(0, dtype=torch.float32, device=self.device)  # (C,)
        self.groups = {g: GroupTable(*(torch.zeros(0, len(t), dtype=_DTYPES.get(f, torch.int32), device=self.device)
                                       for f in _INT_FIELDS), torch.zeros(1, dtype=torch.bool, device=self.device))
                       for g, t in GROUPS.items()}
        # Host mirrors, (C + 1, n_groups); row C answers idx -1 (no adapter) with 0 / False.
        self.width_host = torch.zeros(1, len(GROUPS), dtype=torch.int32)
        self.slora_host = torch.zeros(1, len(GROUPS), dtype=torch.bool)
        # (C,) host int64: the slot's layout class (equal class: equal rows in every table but
        # page ids and scale) and its page count; the torch kernels share one gather per class.
        self.class_host = torch.zeros(0, dtype=torch.int64)
        self.pages_host = torch.zeros(0, dtype=torch.int64)
        self.first_host = torch.zeros(0, dtype=torch.int64)  # (C,) its first page id: the kernels' slot order
        self._classes: dict[tuple, int] = {}  # layout signature -> class id, never reused
        self.workspace = kernels.Workspace()  # the torch kernels' page gathers and class specs, across steps
        self._grow(capacity, max_pages)

    # ---- writes: once per adapter load / eviction ------------------------------

    def _grow(self, capacity: int, max_pages: int) -> None:
        """Reallocate to at least (capacity, max_pages), keeping every slot's row."""
        capacity, max_pages = max(capacity, self.capacity), max(max_pages, self.page_table.shape[1])
        if capacity == self.capacity and max_pages == self.page_table.shape[1]:
            return
        C = self.capacity

        def grown(t: Tensor, shape: tuple[int, ...], rows: int) -> Tensor:
            new = torch.zeros(shape, dtype=t.dtype, device=t.device)
            new[tuple(slice(0, n) for n in (rows,) + t.shape[1:])] = t[:rows]
            return new

        self.page_table = grown(self.page_table, (capacity, max_pages), C)
        self.scale = grown(self.scale, (capacity,), C)
        for g in self.groups.values():
            for f in _INT_FIELDS:
                t = getattr(g, f)
                setattr(g, f, grown(t, (capacity, t.shape[1]), C))
            g.slora = grown(g.slora, (capacity + 1,), C)  # the new last entry (idx -1) is False
        self.width_host = grown(self.width_host, (capacity + 1, len(GROUPS)), C)
        self.slora_host = grown(self.slora_host, (capacity + 1, len(GROUPS)), C)
        self.class_host = grown(self.class_host, (capacity,), C)
        self.pages_host = grown(self.pages_host, (capacity,), C)
        self.first_host = grown(self.first_host, (capacity,), C)
        self.capacity = capacity
        self.workspace.forget()  # its specs name the old tables
        if C:
            log.debug("slot tables grown to %d slots x %d pages", capacity, max_pages)

    def set_slot(self, slot: int, meta: AdapterMeta, layout: AdapterLayout, pages: Tensor) -> None:
        """Write one adapter's rows (its metadata, computed here once)."""
        if slot < 0:
            raise ValueError(f"slot {slot} must be >= 0")
        n = int(pages.numel())
        self._grow(max(slot + 1, 2 * self.capacity) if slot >= self.capacity else self.capacity, n)
        self.workspace.slots_changed()
        self.page_table[slot].zero_()
        self.page_table[slot, :n] = pages.to(self.device, torch.int32)
        self.scale[slot] = meta.scale
        signature = (layout.segments, tuple(meta.target_mode(t) for t in layout.targets))
        self.class_host[slot] = self._classes.setdefault(signature, len(self._classes))
        self.pages_host[slot] = n
        self.first_host[slot] = int(pages[0]) if n else 0
        for gi, (group, (row, slora)) in enumerate(slot_rows(meta, layout, self.cfg, self.tp_rank, self.tp).items()):
            table = self.groups[group]
            for f in _INT_FIELDS:
                getattr(table, f)[slot] = torch.tensor(row[f])
            table.slora[slot] = slora
            self.width_host[slot, gi] = max(row["rank_a"] + row["rank_b"])
            self.slora_host[slot, gi] = slora

    def clear_slot(self, slot: int) -> None:
        """Forget a slot (its adapter left the pool): rank 0 everywhere, so it adapts nothing."""
        if slot >= self.capacity:
            return
        self.workspace.slots_changed()
        self.page_table[slot].zero_()
        self.scale[slot] = 0.0
        for table in self.groups.values():
            for f in _INT_FIELDS:
                getattr(table, f)[slot].zero_()
            table.slora[slot] = False
        self.width_host[slot].zero_()
        self.slora_host[slot].zero_()
        self.pages_host[slot] = 0

    # The pool's listener interface (`bdlora_ray.memory.PoolListener`).
    def adapter_loaded(self, adapter) -> None:
        self.set_slot(adapter.slot, adapter.meta, adapter.layout, adapter.pages)

    def adapter_evicted(self, adapter) -> None:
        self.clear_slot(adapter.slot)
