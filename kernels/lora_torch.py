"""Torch versions of the paged LoRA ops: the CPU serving path.

Same signatures and semantics as `lora_ref` (read that first). Per layer,
one indexing op gathers the pages of every slot the batch uses (their
virtual buffers, which hold every target's factors); then, as Punica's SGMV
does, each adapter's rows are multiplied by views of its factors in that
buffer, all its rows at once. What every layer shares (rows per slot, the
factors' offsets and ranks) comes from a per-batch `StepCache` and is
computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class StepCache:
    """What every layer of one batch shares on the torch path: which rows use which slot and
    where each slot's factors sit in its pages (the page ids are the same in every layer).
    Computed at the first layer, reused by the others. Entries are keyed by the batch's tensors'
    storage, so one cache serves one batch (whose tensors live as long as it does)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}
        self._latest: dict[str, tuple[tuple, Any]] = {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self._entries.get(key)
        if value is None:
            value = self._entries[key] = make()
        return value

    def latest(self, kind: str, key: tuple, make: Callable[[], Any]) -> Any:
        """Like `get`, but keeping only the newest `key` of each `kind` (per-layer data: the next
        layer's replaces it, so a step never holds every layer's)."""
        held = self._latest.get(kind)
        if held is None or held[0] != key:
            held = self._latest[kind] = (key, make())
        return held[1]


def _ptr(t: Tensor | int) -> int | tuple:
    return t if isinstance(t, int) else (t.data_ptr(), tuple(t.shape))


def _cached(cache: StepCache | None, key: tuple, make: Callable[[], Any]) -> Any:
    return make() if cache is None else cache.get(key, make)


def _slot_buffers(pool: Tensor, page_table: Tensor, cache: StepCache | None) -> Tensor:
    """Every slot's virtual buffer in this layer's pool: (S, max_pages * P) float32. The last
    layer's is kept in the cache: shrink and expand of one linear share it."""
    def make() -> Tensor:  # whole pages: row copies
        return pool.index_select(0, page_table.reshape(-1).long()).view(page_table.shape[0], -1).float()

    if cache is None:
        return make()
    return cache.latest("buffers", (pool.data_ptr(), _ptr(page_table)), make)


def _slot_rows(idx: Tensor, cache: StepCache | None) -> list[tuple[int, Tensor]]:
    """(slot, its rows) for every slot the batch uses, in slot order."""
    def make() -> list[tuple[int, Tensor]]:
        rows = (idx >= 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return []
        slot = idx[rows].long()
        order = torch.argsort(slot, stable=True)
        slots, counts = torch.unique_consecutive(slot[order], return_counts=True)
        return list(zip(slots.tolist(), torch.split(rows[order], counts.tolist())))

    return _cached(cache, ("rows", _ptr(idx)), make)


def lora_shrink_torch(x: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, a_offset: Tensor,
                      rank: Tensor, max_rank: int, cache: StepCache | None = None) -> Tensor:
    T, d_in = x.shape
    n_slices = a_offset.shape[1]
    h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    groups = _slot_rows(idx, cache)
    if not groups or max_rank == 0:
        return h

    def plan() -> list[tuple[int, Tensor, list[tuple[int, int, int]]]]:
        """Per used slot: its rows and (slice, offset of A, rank) of each slice it adapts."""
        offs, ranks = a_offset.tolist(), rank.tolist()
        return [(a, rows, [(s, offs[a][s], r) for s, r in enumerate(ranks[a]) if r > 0]) for a, rows in groups]

    per_slot = _cached(cache, ("shrink", _ptr(idx), _ptr(a_offset), _ptr(rank)), plan)
    buf = _slot_buffers(pool, page_table, cache)
    xf = x.float()
    for a, rows, slices in per_slot:
        if not slices:
            continue
        xa = xf[rows]
        ha = torch.zeros(len(rows), n_slices, max_rank, dtype=torch.float32, device=x.device)
        for s, off, r in slices:
            ha[:, s, :r] = xa @ buf[a, off:off + r * d_in].view(r, d_in).T
        h[rows] = ha
    return h


def lora_expand_torch(h: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, b_offset: Tensor, rank: Tensor,
                      out_start: Tensor, out_len: Tensor, scale: Tensor, y: Tensor,
                      cache: StepCache | None = None) -> Tensor:
    groups = _slot_rows(idx, cache)
    if not groups:
        return y

    def plan() -> list[tuple[int, Tensor, list[tuple[int, int, int, int, int]], float]]:
        """Per used slot: its rows, (slice, offset of B, rank, first output column, columns) of each
        slice it adapts, and its scale."""
        offs, ranks, starts, lens, scales = (t.tolist() for t in (b_offset, rank, out_start, out_len, scale))
        return [(a, rows, [(s, offs[a][s], r, starts[a][s], lens[a][s]) for s, r in enumerate(ranks[a])
                           if r > 0 and lens[a][s] > 0], scales[a]) for a, rows in groups]

    per_slot = _cached(cache, ("expand", _ptr(idx), _ptr(b_offset), _ptr(rank), _ptr(out_start), _ptr(out_len),
                                _ptr(scale)), plan)
    buf = _slot_buffers(pool, page_table, cache)
    R = h.shape[2]
    for a, rows, slices, sc in per_slot:
        if not slices:
            continue
        ha = h[rows]
        ya = y[rows].float()
        for s, off, r, o, n in slices:
            # B_s is (out_len, rank) row-major; h holds at most R of its columns.
            B = buf[a, off:off + n * r].view(n, r)[:, :min(r, R)]
            ya[:, o:o + n] += (ha[:, s, :B.shape[1]] @ B.T) * sc
        y[rows] = ya.to(y.dtype)
    return y
