"""Torch versions of the paged LoRA ops: the CPU serving path.

Same signatures and semantics as `lora_ref` (read that first). The cost
follows rows and total rank, not the number of distinct adapters: there is
no loop over adapters. Per step, rows are sorted by (layout class, slot),
where slots of one class hold every factor at the same offsets with the same
ranks (adapters of one rank and targets). Per layer and class, the used
slots' pages form one (U_c, pages * P) buffer in which each factor of every
slot is a strided view: a view of the pool itself when the slots' pages lie
at a regular stride (one adapter in consecutive pages, the common case), else
one gather into a reused workspace. Per class and call, one batched product
serves all its rows, in whichever of three shapes is cheapest (`strategy`):

- "matmul": one slot: x_c @ A.T, a plain GEMM (Punica SGMV with one segment);
- "padded": rows grouped per slot and padded to the busiest slot's count,
  one bmm over slots (SGMV as a batched GEMM); no padding copy when every
  slot has as many rows; pays while padding is small;
- "rows":    each row's factor gathered from the buffer, one bmm of GEMVs
  (S-LoRA's BGMV); for skewed batches where padding would waste more.

Factors whose pages lie back to back (a fused linear's A factors, see
`bdlora_ray.lora.layout`) are applied in one product: the shrink of q|k|v
is one GEMM per class, not three.

Everything a call needs besides the products is computed once per step (the
row plan, each class's page runs) or once per step and linear (each class's
offsets and ranks as Python ints): a call is a few tensor ops per class.

Classes come from the caller (`StepCache(slot_class=..., slot_pages=...)`,
computed once per adapter load by `bdlora_ray.lora.slots`), so all the
linears of a layer share one buffer; without them each call derives classes
from its own metadata (same results).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# A padded batch computes U_c * m_c rows for T_c real ones; above this waste,
# gathering each row's factor (a copy about as costly as its GEMV) is cheaper.
PADDED_MAX_WASTE = 2.0


class Workspace:
    """Memory for the per-layer page gathers, kept across layers and steps: a fresh multi-MB
    tensor per layer costs page faults comparable to the copy itself."""

    def __init__(self) -> None:
        self._flat = torch.empty(0)

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._flat.numel() < numel or self._flat.dtype != dtype or self._flat.device != device:
            self._flat = torch.empty(max(numel, 2 * self._flat.numel()), dtype=dtype, device=device)
        return self._flat[:numel]


class StepCache:
    """What every layer of one batch shares on the torch path: its row plan and, per layer,
    the class buffers. Computed at the first layer, reused by the others. Entries are keyed
    by the batch's tensors' storage, so one cache serves one batch (whose tensors live as long
    as it does).

    slot_class: (C,) int64 host tensor; slots with equal class have equal offsets, ranks,
        output columns and page counts in every linear (None: derived per call).
    slot_pages: (C,) int64 host tensor; pages each slot uses (None: the page table's width).
    workspace: where gathered pages go (None: fresh tensors)."""

    def __init__(self, slot_class: Tensor | None = None, slot_pages: Tensor | None = None,
                 workspace: Workspace | None = None) -> None:
        self.slot_class, self.slot_pages = slot_class, slot_pages
        self.workspace = workspace
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


def _cached(cache: StepCache | None, key: tuple, make: Callable[[], Any]) -> Any:
    return make() if cache is None else cache.get(key, make)


def _ptr(t: Tensor | int) -> int | tuple:
    return t if isinstance(t, int) else (t.data_ptr(), tuple(t.shape))


@dataclass(frozen=True)
class ClassPlan:
    """The rows of one layout class: positions r0:r1 of the plan's sorted rows."""

    r0: int            # first sorted row of the class
    r1: int            # one past its last
    slots: Tensor      # (U_c,) int64 distinct slots, in the order the rows are sorted
    first_slot: int    # slots[0]: every slot of the class has its metadata
    inv: Tensor        # (T_c,) int64 each row's index into slots
    pos: Tensor        # (T_c,) int64 each row's position among its slot's rows
    busiest: int       # m_c, rows of the slot with the most
    pages: int         # pages every slot of the class uses
    strategy: str      # "matmul" | "padded" | "rows"

    @property
    def uniform(self) -> bool:
        """Every slot has m_c rows: the sorted rows are already the padded batch."""
        return len(self.slots) * self.busiest == self.r1 - self.r0


@dataclass(frozen=True)
class RowPlan:
    rows: Tensor                   # (Ta,) int64 active rows sorted by (class, slot)
    slot_of_row: Tensor            # (Ta,) int64 their slots
    classes: tuple[ClassPlan, ...]
    identity: bool = False         # rows == arange(T): every row active and already in order

    def take(self, t: Tensor) -> Tensor:
        """t's rows in plan order (t itself when the order is the identity)."""
        return t if self.identity else t.index_select(0, self.rows)


def strategy(num_rows: int, num_slots: int, busiest: int) -> str:
    """Cheapest product shape for T_c rows over U_c slots (see the module docstring)."""
    if num_slots == 1:
        return "matmul"
    return "padded" if num_slots * busiest <= PADDED_MAX_WASTE * num_rows else "rows"


def _row_plan(idx: Tensor, slot_class: Tensor, slot_pages: Tensor) -> RowPlan:
    """Sort active rows by (class, slot) and cut them into classes; vectorised but for the
    per-class bookkeeping (a few classes: the distinct ranks/targets in the batch)."""
    act = (idx >= 0).nonzero().squeeze(1)  # (Ta,)
    slot = idx[act].long()
    cls = slot_class[slot.cpu()].to(slot.device)
    order = torch.argsort(cls * (int(slot.max()) + 1 if len(slot) else 1) + slot, stable=True)
    rows, slot, cls = act[order], slot[order], cls[order]
    Ta = len(rows)
    if Ta == 0:
        return RowPlan(rows, slot, ())
    new_slot = torch.ones(Ta, dtype=torch.bool, device=rows.device)
    new_slot[1:] = slot[1:] != slot[:-1]
    u_id = torch.cumsum(new_slot, 0) - 1                          # (Ta,) index into the distinct slots
    starts = new_slot.nonzero().squeeze(1)                        # (U,) first sorted row of each slot
    counts = torch.diff(starts, append=torch.tensor([Ta], device=rows.device))  # (U,)
    pos = torch.arange(Ta, device=rows.device) - starts[u_id]    # (Ta,)
    uniq = slot[new_slot]                                         # (U,)
    new_cls = torch.ones(len(uniq), dtype=torch.bool, device=rows.device)
    new_cls[1:] = cls[new_slot][1:] != cls[new_slot][:-1]
    u_bounds = new_cls.nonzero().squeeze(1).tolist() + [len(uniq)]
    starts_l, counts_l, uniq_l = starts.tolist() + [Ta], counts.tolist(), uniq.tolist()
    classes = []
    for u0, u1 in zip(u_bounds[:-1], u_bounds[1:]):
        r0, r1 = starts_l[u0], starts_l[u1]
        busiest = max(counts_l[u0:u1])
        classes.append(ClassPlan(r0, r1, uniq[u0:u1], uniq_l[u0], u_id[r0:r1] - u0, pos[r0:r1], busiest,
                                 int(slot_pages[uniq_l[u0]]), strategy(r1 - r0, u1 - u0, busiest)))
    identity = Ta == len(idx) and bool((rows == torch.arange(Ta, device=rows.device)).all())
    return RowPlan(rows, slot, tuple(classes), identity)


def _plan(idx: Tensor, page_table: Tensor, meta: tuple[Tensor, ...], cache: StepCache | None) -> RowPlan:
    """The batch's row plan: shared by every call if the cache knows the slots' classes, else
    per call, classing slots by this call's own metadata."""
    given = cache is not None and cache.slot_class is not None

    def make() -> RowPlan:
        S = page_table.shape[0]
        if given:
            slot_class = cache.slot_class
        else:  # slots with equal metadata rows form a class
            sig = torch.cat([m.reshape(S, -1).to(torch.int64).cpu() for m in meta], 1)  # (S, k)
            slot_class = torch.unique(sig, dim=0, return_inverse=True)[1]
        pages = cache.slot_pages if cache is not None and cache.slot_pages is not None else None
        if pages is None:
            pages = torch.full((S,), page_table.shape[1], dtype=torch.int64)
        return _row_plan(idx, slot_class, pages)

    if cache is None:
        return make()
    key = ("plan", _ptr(idx)) if given else ("plan", _ptr(idx), *(_ptr(m) for m in meta))
    return cache.get(key, make)


@dataclass(frozen=True)
class PageRun:
    """Where one class's pages are: `ids` (U_c * pages_c,) for a gather, and, when slot u's pages
    are first + u * stride + (0, 1, .., pages_c - 1), `first` and `stride` (a strided view)."""

    ids: Tensor
    first: int | None
    stride: int


def _page_runs(page_table: Tensor, plan: RowPlan) -> list[PageRun]:
    out = []
    for c in plan.classes:
        pt = page_table.index_select(0, c.slots)[:, :c.pages].long()  # (U_c, pages_c)
        first, stride = None, 0
        if bool((pt[:, 1:] - pt[:, :-1] == 1).all()):
            bases = pt[:, 0].tolist()
            steps = {b - a for a, b in zip(bases[:-1], bases[1:])}
            if not steps:
                first = bases[0]
            elif len(steps) == 1 and next(iter(steps)) >= c.pages:
                first, stride = bases[0], steps.pop()
        out.append(PageRun(pt.reshape(-1), first, stride))
    return out


def _class_buffers(pool: Tensor, page_table: Tensor, plan: RowPlan, cache: StepCache | None) -> list[Tensor]:
    """Per class, its slots' pages of this layer: (U_c, pages_c * P) float32, a view of the pool
    where the pages lie at a regular stride, else one copy. The newest layer's are kept in the
    cache: every linear of a layer shares them."""
    runs = _cached(cache, ("runs", _ptr(page_table), id(plan)), lambda: _page_runs(page_table, plan))

    def make() -> list[Tensor]:
        P = pool.shape[1]
        gathered = [c for c, run in zip(plan.classes, runs) if run.first is None]
        ws = cache.workspace if cache is not None else None
        flat = ws.take(sum(len(c.slots) * c.pages * P for c in gathered), pool.dtype, pool.device) \
            if ws is not None and gathered else None
        out, at = [], 0
        for c, run in zip(plan.classes, runs):
            U, width = len(c.slots), c.pages * P
            if run.first is not None:  # in place: pool row first + u * stride holds slot u's first page
                buf = pool.as_strided((U, width), (run.stride * P, 1), pool.storage_offset() + run.first * P)
            elif flat is None:
                buf = pool.index_select(0, run.ids)
            else:  # the previous layer's buffers are dead: layers run one after the other
                buf = torch.index_select(pool, 0, run.ids, out=flat[at:at + U * width].view(-1, P))
                at += U * width
            out.append(buf.view(U, width).float())
        return out

    if cache is None:
        return make()
    return cache.latest("buffers", (pool.data_ptr(), id(plan)), make)


def _slot_meta(plan: RowPlan, tables: tuple[Tensor, ...], cache: StepCache | None) -> list[list[list[int]]]:
    """Per class, its metadata rows (every slot's are the same): one list per table; read to the
    host once per step and linear."""
    def make() -> list[list[list[int]]]:
        slots = torch.tensor([c.first_slot for c in plan.classes], device=tables[0].device)
        return [list(rows) for rows in zip(*(t.index_select(0, slots).tolist() for t in tables))]

    return _cached(cache, ("meta", id(plan), *(_ptr(t) for t in tables)), make)


def _runs_of_slices(offs: list[int], ranks: list[int], d_in: int) -> list[tuple[int, int, int]]:
    """Slices with rank > 0 grouped into runs whose A factors lie back to back: (s0, s1, offset)."""
    runs: list[list[int]] = []
    for s, (off, r) in enumerate(zip(offs, ranks)):
        if r == 0:
            continue
        if runs and runs[-1][1] == s and off == offs[s - 1] + ranks[s - 1] * d_in:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1, off])
    return [tuple(run) for run in runs]


def _product(left: Tensor, right: Tensor, c: ClassPlan) -> Tensor:
    """Row t of the result: left[t] @ right[slot of t].T; left (T_c, k), right (U_c, n, k)."""
    if c.strategy == "matmul":
        return left @ right[0].T  # (T_c, n)
    if c.strategy == "padded":
        U, k = len(c.slots), left.shape[1]
        if c.uniform and c.busiest == 1 and k < right.shape[1]:
            # one row per slot, a wide factor (expand): as GEMVs of the factor in its own row-major
            # order, which MKL's batched path runs ~1.5x faster than the transposed form
            return torch.bmm(right, left.unsqueeze(2)).squeeze(2)  # (U_c, n)
        if c.uniform:  # rows sorted by slot, m_c each: already (U_c, m_c, k)
            return torch.bmm(left.reshape(U, c.busiest, k), right.transpose(1, 2)).reshape(-1, right.shape[1])
        padded = left.new_zeros(U, c.busiest, k)  # (U_c, m_c, k)
        padded[c.inv, c.pos] = left
        return torch.bmm(padded, right.transpose(1, 2))[c.inv, c.pos]  # (T_c, n)
    per_row = right.index_select(0, c.inv)  # (T_c, n, k)
    return torch.bmm(left.unsqueeze(1), per_row.transpose(1, 2)).squeeze(1)  # (T_c, n)


def lora_shrink_torch(x: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, a_offset: Tensor,
                      rank: Tensor, max_rank: int, cache: StepCache | None = None) -> Tensor:
    T, d_in = x.shape
    n_slices = a_offset.shape[1]
    if max_rank == 0:
        return torch.zeros(T, n_slices, 0, dtype=torch.float32, device=x.device)
    plan = _plan(idx, page_table, (a_offset, rank), cache)
    if not plan.classes:
        return torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    bufs = _class_buffers(pool, page_table, plan, cache)
    metas = _slot_meta(plan, (a_offset, rank), cache)
    xs = plan.take(x).float()  # (Ta, d_in)
    if plan.identity and len(plan.classes) == 1:  # one class, every row: h may be the product itself
        offs, ranks = metas[0]
        runs = _runs_of_slices(offs, ranks, d_in)
        if len(runs) == 1 and runs[0][:2] == (0, n_slices) and all(r == max_rank for r in ranks):
            c, off = plan.classes[0], runs[0][2]
            A = bufs[0][:, off:off + n_slices * max_rank * d_in].view(len(c.slots), -1, d_in)
            return _product(xs, A, c).view(T, n_slices, max_rank)
    h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    hs = h if plan.identity else torch.zeros(len(plan.rows), n_slices, max_rank, dtype=torch.float32,
                                              device=x.device)
    for c, buf, (offs, ranks) in zip(plan.classes, bufs, metas):
        xc = xs[c.r0:c.r1]
        for s0, s1, off in _runs_of_slices(offs, ranks, d_in):
            width = sum(ranks[s0:s1])
            A = buf[:, off:off + width * d_in].view(len(c.slots), width, d_in)  # (U_c, width, d_in), a view
            prod = _product(xc, A, c)  # (T_c, width): slices s0..s1-1 side by side
            at = 0
            for s in range(s0, s1):
                hs[c.r0:c.r1, s, :ranks[s]] = prod[:, at:at + ranks[s]]
                at += ranks[s]
    if not plan.identity:
        h[plan.rows] = hs
    return h


def lora_expand_torch(h: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, b_offset: Tensor, rank: Tensor,
                      out_start: Tensor, out_len: Tensor, scale: Tensor, y: Tensor,
                      cache: StepCache | None = None) -> Tensor:
    plan = _plan(idx, page_table, (b_offset, rank, out_start, out_len), cache)
    if not plan.classes:
        return y
    bufs = _class_buffers(pool, page_table, plan, cache)
    metas = _slot_meta(plan, (b_offset, rank, out_start, out_len), cache)
    hs = plan.take(h)  # (Ta, n_slices, R)
    # float32 y in plan order is updated in place: the same sums as the reference's y.float() + delta
    in_place = plan.identity and y.dtype == torch.float32
    ys = y if in_place else plan.take(y).float()  # (Ta, d_out)
    for ci, (c, buf, (offs, ranks, starts, lens)) in enumerate(zip(plan.classes, bufs, metas)):
        if c.strategy == "matmul":  # one slot: its scale is one number
            alpha = _cached(cache, ("scale", id(plan), ci, _ptr(scale)), lambda: float(scale[c.first_slot]))
            hc = hs[c.r0:c.r1]
        else:
            sc = _cached(cache, ("scales", id(plan), _ptr(scale)),
                         lambda: scale.index_select(0, plan.slot_of_row)[:, None, None])  # (Ta, 1, 1)
            hc = hs[c.r0:c.r1] * sc[c.r0:c.r1]  # (T_c, n_slices, R) scaled per row
        for s, (off, r, o, n) in enumerate(zip(offs, ranks, starts, lens)):
            if r > 0 and n > 0:
                B = buf[:, off:off + n * r].view(len(c.slots), n, r)  # (U_c, n, r), a view
                if c.strategy == "matmul":
                    ys[c.r0:c.r1, o:o + n].addmm_(hc[:, s, :r], B[0].T, alpha=alpha)
                else:
                    ys[c.r0:c.r1, o:o + n] += _product(hc[:, s, :r], B, c)
    if not in_place:
        y[plan.rows] = ys.to(y.dtype)
    return y
