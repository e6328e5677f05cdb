"""Per-step LoRA metadata: which adapter slot each row uses, and where every
slot's factors sit in the pool, grouped as the model's fused linears are.

Every TP rank builds its own `LoraBatch` from the same slot list and row
assignment (its page ids and its slice offsets are its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import kernels

from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.layout import AdapterLayout
from bdlora_ray.lora.shard import AdapterMeta

# Fused linear of the model -> the LoRA targets it carries, in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
COLUMN_GROUPS = ("qkv", "gate_up")


@dataclass(frozen=True)
class AdapterSlot:
    """An adapter resident in this rank's pool."""

    meta: AdapterMeta
    layout: AdapterLayout
    pages: Tensor  # (n,) int32 page ids, the same in every layer


@dataclass
class GroupMeta:
    """Kernel arguments for one fused linear; all (S, n_slices) unless noted."""

    a_offset: Tensor    # int64 virtual offset of A per slot and slice
    rank_a: Tensor      # int32 rows of A (0: slot does not adapt this slice)
    b_offset: Tensor    # int64 virtual offset of B
    rank_b: Tensor      # int32 columns of B (N * rank_a for slora column layers)
    out_start: Tensor   # int32 first output column B writes
    out_len: Tensor     # int32 rows of B
    slora_rows: Tensor  # (T,) bool: rows whose adapter needs this group's collective
    any_slora: bool     # whether the collective is issued at all this step
    width: int          # width R of the rank-space buffer h

    @property
    def active(self) -> bool:
        return self.width > 0


def _local_slices(cfg: LlamaConfig, tp: int, group: str) -> list[tuple[int, int]]:
    """(start, length) of each target's output inside this rank's fused column output."""
    lens = [cfg.out_features(t) // tp for t in GROUPS[group]]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return list(zip(starts, lens))


@dataclass
class LoraBatch:
    idx: Tensor                  # (T,) int32 slot of each row, -1 = base model only
    page_table: Tensor           # (S, max_pages) int32
    scale: Tensor                # (S,) float32
    pool: Tensor                 # (num_layers, num_pages, P): this rank's unified pool
    groups: dict[str, GroupMeta]
    segments: Any = None         # kernels.plan_segments: what every layer's kernels share this step

    @classmethod
    def build(cls, slots: list[AdapterSlot], idx: Tensor, pool: Tensor, cfg: LlamaConfig,
              tp_rank: int, tp: int) -> "LoraBatch":
        device = pool.device
        S = max(len(slots), 1)
        max_pages = max([len(s.pages) for s in slots] + [1])
        page_table = torch.zeros(S, max_pages, dtype=torch.int32)
        scale = torch.zeros(S, dtype=torch.float32)
        for a, slot in enumerate(slots):
            page_table[a, :len(slot.pages)] = slot.pages.to(torch.int32)
            scale[a] = slot.meta.scale
        idx = idx.to(torch.int32)
        groups = {g: cls._group(g, slots, idx, cfg, tp_rank, tp, S, device) for g in GROUPS}
        idx = idx.to(device)
        return cls(idx, page_table.to(device), scale.to(device), pool, groups, kernels.plan_segments(idx, S))

    @staticmethod
    def _group(group: str, slots: list[AdapterSlot], idx: Tensor, cfg: LlamaConfig,
               tp_rank: int, tp: int, S: int, device: torch.device) -> GroupMeta:
        targets = GROUPS[group]
        column = group in COLUMN_GROUPS
        z = lambda dtype: torch.zeros(S, len(targets), dtype=dtype)  # noqa: E731
        a_off, b_off = z(torch.int64), z(torch.int64)
        rank_a, rank_b, out_start, out_len = z(torch.int32), z(torch.int32), z(torch.int32), z(torch.int32)
        slora_slots = torch.zeros(S + 1, dtype=torch.bool)  # last entry: rows with no adapter
        local = _local_slices(cfg, tp, group) if column else None
        for a, slot in enumerate(slots):
            for s, target in enumerate(targets):
                seg_a, seg_b = slot.layout.segment(target, "A"), slot.layout.segment(target, "B")
                if seg_a is None:
                    continue
                a_off[a, s], rank_a[a, s] = seg_a.offset, seg_a.rows
                b_off[a, s], rank_b[a, s], out_len[a, s] = seg_b.offset, seg_b.cols, seg_b.rows
                slora = slot.meta.target_mode(target) == "slora"
                slora_slots[a] |= slora
                if column:
                    out_start[a, s] = local[s][0]
                elif slora:  # B[O_i, :] lands in this rank's slice of the partial output
                    out_start[a, s] = tp_rank * seg_b.rows
        slora_rows = slora_slots[idx.long()] if len(idx) else torch.zeros(0, dtype=torch.bool)
        width = int(max(rank_a.max(), rank_b.max())) if slots else 0
        return GroupMeta(a_off.to(device), rank_a.to(device), b_off.to(device), rank_b.to(device),
                         out_start.to(device), out_len.to(device), slora_rows.to(device),
                         bool(slora_rows.any()), width)
