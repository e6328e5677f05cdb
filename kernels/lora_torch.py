"""Torch versions of the paged LoRA ops: the CPU serving path.

Same signatures and semantics as `lora_ref` (read that first). The cost
follows rows and total rank, not the number of distinct adapters: there is
no loop over adapters. Per step, rows are sorted by (layout class, slot),
where slots of one class hold every factor at the same offsets with the same
ranks (adapters of one rank and targets). Per layer and class, the used
slots' pages form one (U_c, pages * P) buffer in which each factor of every
slot is a strided view: a view of the pool itself when the slots' pages lie
at a regular stride (one adapter in consecutive pages, the common case), else
one gather, kept across the steps that repeat the batch's index (within a
memory budget, see `Workspace`) or into a reused workspace. Per class and call, one batched product
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

Everything a call needs besides the products is computed once per index
(the row plan and each class's page runs, kept across the steps that repeat
it, as decode steps do) or once per class and linear (its offsets and ranks
as Python ints): a call is a few tensor ops per class. Rows out of plan order
go back by one select of the inverse permutation when every row is active,
and the expand reads the shrink's output in plan order as it left it.

Classes come from the caller (`StepCache(slot_class=..., slot_pages=...)`,
computed once per adapter load by `bdlora_ray.lora.slots`), so all the
linears of a layer share one buffer; without them each call derives classes
from its own metadata (same results).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

# A padded batch computes U_c * m_c rows for T_c real ones; above this waste,
# gathering each row's factor (a copy about as costly as its GEMV) is cheaper.
PADDED_MAX_WASTE = 2.0


class Workspace:
    """What the torch path keeps across steps, for one set of slot tables: memory for the
    per-layer page gathers (a fresh multi-MB tensor per layer costs page faults comparable to
    the copy itself); per layout class and table, the host form of the class's metadata
    (`specs`; a class's metadata never changes, so it is read from the device once); and the
    row plans and page runs of recent step indices (`plans`: decode steps repeat one index
    until a sequence joins or leaves, so a step usually finds its plan). The tables' owner
    calls `slots_changed` when a slot's row changes and `forget` when it replaces the tables."""

    MAX_PLANS = 64  # index compositions kept; serving makes a new one whenever a sequence joins or leaves
    # Gathered pages (classes not lying at a regular stride) kept across steps, for one plan at a time
    # (a decode step repeats its plan) from its second step on: a copy of those pages in every layer,
    # up to this many bytes.
    GATHER_BUDGET = 64 * 2**20

    def __init__(self) -> None:
        self._flat = torch.empty(0)
        self.specs: dict[tuple, Any] = {}
        self.plans: dict[tuple, Any] = {}
        self._gathers_of: Any = None               # the plan whose gathered pages are kept
        self._gathers: dict[int, list[Tensor]] = {}  # its class buffers by layer (the layer pool's data_ptr)
        self._gather_bytes = 0

    def forget(self) -> None:
        """Drop everything read from the tables: they are gone (keys hold their ids)."""
        self.specs.clear()
        self.slots_changed()

    def slots_changed(self) -> None:
        """Drop the plans, page runs and kept gathers: a slot's class, pages, first page or
        weights may have changed."""
        self.plans.clear()
        self._gathers_of, self._gathers, self._gather_bytes = None, {}, 0

    def kept_gathers(self, plan: Any, layer: int) -> list[Tensor] | None:
        return self._gathers.get(layer) if plan is self._gathers_of else None

    def can_keep_gathers(self, plan: Any, nbytes: int) -> bool:
        """Whether `plan`'s gathered pages of one more layer (nbytes) may be kept; the first call for
        another plan drops the kept ones."""
        if plan is not self._gathers_of:
            self._gathers_of, self._gathers, self._gather_bytes = plan, {}, 0
        return self._gather_bytes + nbytes <= self.GATHER_BUDGET

    def keep_gathers(self, plan: Any, layer: int, buffers: list[Tensor], nbytes: int) -> None:
        self._gathers[layer] = buffers
        self._gather_bytes += nbytes

    def plan(self, key: tuple, make: Callable[[], Any]) -> Any:
        value = self.plans.get(key)
        if value is None:
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            value = self.plans[key] = make()
        return value

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._flat.numel() < numel or self._flat.dtype != dtype or self._flat.device != device:
            self._flat = torch.empty(max(numel, 2 * self._flat.numel()), dtype=dtype, device=device)
        return self._flat[:numel]


_STEP_SERIALS = itertools.count()


class StepCache:
    """What every layer of one batch shares on the torch path: its row plan and, per layer,
    the class buffers. Computed at the first layer, reused by the others. Entries are keyed
    by the identity of the batch's tensors (the layer's pool view by its storage), so one cache
    serves one batch, whose tensors live as long as it does.

    slot_class: (C,) int64 host tensor; slots with equal class have equal offsets, ranks,
        output columns and page counts in every linear (None: derived per call).
    slot_pages: (C,) int64 host tensor; pages each slot uses (None: the page table's width).
    slot_first: (C,) int64 host tensor; each slot's first page id (None: slots in id order).
    workspace: where gathered pages go (None: fresh tensors)."""

    def __init__(self, slot_class: Tensor | None = None, slot_pages: Tensor | None = None,
                 workspace: Workspace | None = None, slot_first: Tensor | None = None) -> None:
        self.slot_class, self.slot_pages, self.slot_first = slot_class, slot_pages, slot_first
        self.workspace = workspace
        self.serial = next(_STEP_SERIALS)  # tells one step's cache from another's
        self._entries: dict[tuple, Any] = {}
        self._latest: dict[str, tuple[tuple, Any]] = {}
        self._shrunk: tuple[int, int, Tensor] | None = None  # (id(h), id(plan), h in plan order): the last shrink's

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

    def shrunk(self, h: Tensor, plan: "RowPlan", in_plan_order: Tensor) -> Tensor:
        """Return h, the shrink's output in batch order, remembering its rows in plan order, which
        the expand that follows (it takes h itself) would otherwise select again."""
        self._shrunk = (id(h), id(plan), in_plan_order)
        return h

    def take(self, h: Tensor, plan: "RowPlan") -> Tensor:
        """h's rows in plan order: remembered by `shrunk` if h is the last shrink's output (h is
        alive, so its id names no other tensor), else selected."""
        held = self._shrunk
        if held is not None and held[0] == id(h) and held[1] == id(plan):
            return held[2]
        return plan.take(h)


def _cached(cache: StepCache | None, key: tuple, make: Callable[[], Any]) -> Any:
    return make() if cache is None else cache.get(key, make)


@dataclass(frozen=True)
class ClassPlan:
    """The rows of one layout class: positions r0:r1 of the plan's sorted rows."""

    r0: int            # first sorted row of the class
    r1: int            # one past its last
    cls: int | None    # the caller's class id (None: classes derived from this call's metadata)
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
    inverse: Tensor | None = None  # (T,) int64 when every row is active, out of order: each row's plan position
    kept: bool = False             # kept across steps by a workspace (see `Workspace.plans`)
    # what depends only on the plan's slots and their pages, kept as long as the plan is (its slots'
    # pages do not change while it is, see `Workspace`): page runs by page table (`_runs`), factor
    # views by layer and linear (`_uniform_views`)
    memo: dict[tuple, Any] = field(default_factory=dict, compare=False, repr=False)

    def take(self, t: Tensor) -> Tensor:
        """t's rows in plan order (t itself when the order is the identity)."""
        return t if self.identity else t.index_select(0, self.rows)

    def restore(self, t: Tensor) -> Tensor:
        """The inverse of `take` when every row is active: t's rows (in plan order) in batch order."""
        return t if self.identity else t.index_select(0, self.inverse)


def strategy(num_rows: int, num_slots: int, busiest: int) -> str:
    """Cheapest product shape for T_c rows over U_c slots (see the module docstring)."""
    if num_slots == 1:
        return "matmul"
    return "padded" if num_slots * busiest <= PADDED_MAX_WASTE * num_rows else "rows"


def _row_plan(idx: Tensor, dev: torch.device, slot_class: Tensor, slot_pages: Tensor,
              slot_first: Tensor | None = None) -> RowPlan:
    """Sort active rows by (class, first page, slot) and cut them into classes. On the host, in
    numpy: a batch's index is a few hundred ints at most, for which each torch op would cost
    more than numpy's whole plan. Within a class the slots come in the order of their first
    pages, so slots whose pages lie at a regular stride form one strided view of the pool."""
    i = idx.numpy().astype(np.int64)  # (T,) idx is on the host
    T = len(i)
    act = np.flatnonzero(i >= 0)  # (Ta,)
    Ta = len(act)
    cls_of = slot_class.numpy()
    pages_of = slot_pages.numpy()

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    if Ta == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return RowPlan(empty, empty, ())
    if Ta == T and i.min() == i.max():  # every row on one slot: nothing to sort
        s = int(i[0])
        rows = torch.arange(T, device=dev)
        c = ClassPlan(0, T, int(cls_of[s]), tensor(i[:1]), s, torch.zeros(T, dtype=torch.int64, device=dev), rows, T,
                      int(pages_of[s]), "matmul")
        return RowPlan(rows, tensor(i), (c,), identity=True)
    slot = i[act]
    cls = cls_of[slot]
    first = slot_first.numpy()[slot] if slot_first is not None else slot
    order = np.lexsort((slot, first, cls))  # by class, then first page, then slot
    rows, slot, cls = act[order], slot[order], cls[order]
    new_slot = np.ones(Ta, dtype=bool)
    new_slot[1:] = slot[1:] != slot[:-1]
    u_id = np.cumsum(new_slot) - 1                # (Ta,) index into the distinct slots
    starts = np.flatnonzero(new_slot)             # (U,) first sorted row of each slot
    counts = np.diff(np.append(starts, Ta))       # (U,)
    pos = np.arange(Ta) - starts[u_id]            # (Ta,)
    uniq, ucls = slot[starts], cls[starts]        # (U,)
    new_cls = np.ones(len(uniq), dtype=bool)
    new_cls[1:] = ucls[1:] != ucls[:-1]
    u_bounds = np.flatnonzero(new_cls).tolist() + [len(uniq)]
    starts_l, counts_l = starts.tolist() + [Ta], counts.tolist()
    classes = []
    for u0, u1 in zip(u_bounds[:-1], u_bounds[1:]):
        r0, r1 = starts_l[u0], starts_l[u1]
        busiest = max(counts_l[u0:u1])
        classes.append(ClassPlan(r0, r1, int(ucls[u0]), tensor(uniq[u0:u1]), int(uniq[u0]), tensor(u_id[r0:r1] - u0),
                                 tensor(pos[r0:r1]), busiest, int(pages_of[uniq[u0]]),
                                 strategy(r1 - r0, u1 - u0, busiest)))
    identity = Ta == T and bool((rows == np.arange(T)).all())
    inverse = tensor(np.argsort(rows)) if Ta == T and not identity else None
    return RowPlan(tensor(rows), tensor(slot), tuple(classes), identity, inverse)


def _plan(idx: Tensor, page_table: Tensor, meta: tuple[Tensor, ...], cache: StepCache | None) -> RowPlan:
    """The batch's row plan: shared by every call if the cache knows the slots' classes, else
    per call, classing slots by this call's own metadata. With classes and a workspace, kept
    across steps by the index's contents (the slot tables' owner drops them when a slot changes)."""
    given = cache is not None and cache.slot_class is not None

    def build(i: Tensor) -> RowPlan:
        S = page_table.shape[0]
        if given:
            slot_class = cache.slot_class
        else:  # slots with equal metadata rows form a class
            sig = torch.cat([m.reshape(S, -1).to(torch.int64).cpu() for m in meta], 1)  # (S, k)
            slot_class = torch.unique(sig, dim=0, return_inverse=True)[1]
        pages = cache.slot_pages if cache is not None and cache.slot_pages is not None else None
        if pages is None:
            pages = torch.full((S,), page_table.shape[1], dtype=torch.int64)
        plan = _row_plan(i, idx.device, slot_class.cpu(), pages.cpu(), cache.slot_first if given else None)
        if not given:  # per-call classes: no ids that would mean the same in another call
            plan = RowPlan(plan.rows, plan.slot_of_row, tuple(replace(c, cls=None) for c in plan.classes),
                           plan.identity, plan.inverse)
        return plan

    def make() -> RowPlan:
        i = idx.cpu()
        if not given or cache.workspace is None:
            return build(i)
        key = (i.numpy().tobytes(), id(cache.slot_class), id(cache.slot_pages), id(cache.slot_first))
        return cache.workspace.plan(key, lambda: replace(build(i), kept=True))

    if cache is None:
        return make()
    key = ("plan", id(idx)) if given else ("plan", id(idx), *map(id, meta))
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


def _runs(page_table: Tensor, plan: RowPlan) -> list[PageRun]:
    runs = plan.memo.get(("runs", id(page_table)))
    if runs is None:
        runs = plan.memo[("runs", id(page_table))] = _page_runs(page_table, plan)
    return runs


def _one_slot_in_place(pool: Tensor, page_table: Tensor, plan: RowPlan, cache: StepCache | None) -> int | None:
    """The first page of the batch's only slot when every row uses it, its pages lie in place and
    its class is the caller's (the common decode step of one adapter); None otherwise. Such a
    step's factor views depend only on the class and the pages, so they are kept across steps."""
    if cache is None or cache.workspace is None or not plan.identity or len(plan.classes) != 1:
        return None
    c = plan.classes[0]
    if c.strategy != "matmul" or c.cls is None or pool.dtype != torch.float32:
        return None
    return _runs(page_table, plan)[0].first


def _uniform_in_place(pool: Tensor, page_table: Tensor, plan: RowPlan, cache: StepCache | None
                      ) -> PageRun | None:
    """The page run of the batch's only class when every row is active, its slots' pages lie in
    place and each slot has as many rows (a decode step of many adapters, one row or a few each);
    None otherwise. Such a step's factors are (U, rows, cols) views of the pool, the same in
    every step of the plan, so they are kept with it (`_uniform_views`)."""
    if cache is None or cache.workspace is None or len(plan.classes) != 1 or pool.dtype != torch.float32:
        return None
    c = plan.classes[0]
    if c.strategy != "padded" or not c.uniform or c.cls is None or not (plan.identity or plan.inverse is not None):
        return None
    run = _runs(page_table, plan)[0]
    return run if run.first is not None else None


def _uniform_views(kind: str, pool: Tensor, run: PageRun, plan: RowPlan, key: tuple,
                   factors: Callable[[], list[tuple[Any, int, int, int]]]) -> list[tuple[Any, Tensor]]:
    """Per (tag, offset, rows, cols) of `factors()`: (tag, the (U, rows, cols) factor of every slot,
    a view of this layer's pool), kept in the plan's memo by layer and `key`."""
    k = (kind, pool.data_ptr(), *key)
    views = plan.memo.get(k)
    if views is None:
        P, U = pool.shape[1], len(plan.classes[0].slots)
        views = plan.memo[k] = [
            (tag, pool.as_strided((U, rows, cols), (run.stride * P, cols, 1),
                                  pool.storage_offset() + run.first * P + offset))
            for tag, offset, rows, cols in factors()]
    return views


def _factor(pool: Tensor, first: int, offset: int, rows: int, cols: int) -> Tensor:
    """The (rows, cols) factor at `offset` of the virtual buffer starting at page `first`, in place."""
    at = pool.storage_offset() + first * pool.shape[1] + offset
    return pool.as_strided((rows, cols), (cols, 1), at)


def _class_buffers(pool: Tensor, page_table: Tensor, plan: RowPlan, cache: StepCache | None) -> list[Tensor]:
    """Per class, its slots' pages of this layer: (U_c, pages_c * P) float32, a view of the pool
    where the pages lie at a regular stride, else one copy. The newest layer's are kept in the
    cache: every linear of a layer shares them."""
    runs = _runs(page_table, plan)

    def make() -> list[Tensor]:
        P = pool.shape[1]
        gathered = [c for c, run in zip(plan.classes, runs) if run.first is None]
        ws = cache.workspace if cache is not None else None
        layer, numel = pool.data_ptr(), sum(len(c.slots) * c.pages * P for c in gathered)
        if ws is not None and plan.kept and gathered:
            kept = ws.kept_gathers(plan, layer)
            if kept is not None:
                return kept
            # from the plan's second step on: a plan used once (a batch changing every step) gathers
            # into the reused memory, as before, rather than into fresh tensors
            first_step = plan.memo.setdefault("first step", cache.serial)
            keep = first_step != cache.serial and ws.can_keep_gathers(plan, numel * pool.element_size())
        else:
            keep = False
        # kept gathers are fresh tensors; others go to the workspace's memory, reused by the next layer
        flat = ws.take(numel, pool.dtype, pool.device) if ws is not None and gathered and not keep else None
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
        if keep:
            ws.keep_gathers(plan, layer, out, numel * pool.element_size())
        return out

    if cache is None:
        return make()
    return cache.latest("buffers", (pool.data_ptr(), id(plan)), make)


def _class_specs(kind: str, plan: RowPlan, tables: tuple[Tensor, ...], extra: Any, cache: StepCache | None,
                 build: Callable[[list[list[int]]], Any]) -> list[Any]:
    """Per class, `build` of its metadata rows (one list per table; every slot of a class has the
    same). Kept per step in the cache, and per class in the workspace across steps, so that the
    tables are read back only when a new class appears."""
    def make() -> list[Any]:
        store = cache.workspace.specs if cache is not None and cache.workspace is not None else None
        out = []
        for c in plan.classes:
            key = (kind, c.cls, *map(id, tables), extra)
            spec = store.get(key) if store is not None and c.cls is not None else None
            if spec is None:
                spec = build([t[c.first_slot].tolist() for t in tables])
                if store is not None and c.cls is not None:
                    store[key] = spec
            out.append(spec)
        return out

    return _cached(cache, (kind, id(plan), *map(id, tables), extra), make)


@dataclass(frozen=True)
class ShrinkRun:
    """Slices s0..s1-1 of a class, whose A factors lie back to back from `offset`: one product."""

    s0: int
    s1: int
    offset: int
    ranks: tuple[int, ...]  # of slices s0..s1-1, all > 0

    def whole(self, n_slices: int, max_rank: int) -> bool:
        """The run is every slice at full width: its product, viewed (T, n_slices, max_rank), is h."""
        return (self.s0, self.s1) == (0, n_slices) and all(r == max_rank for r in self.ranks)

    def split(self, prod: Tensor, h: Tensor) -> None:
        """Write the run's product (T, sum of ranks), slices side by side, into h's (T, slice, :rank)."""
        at = 0
        for s, r in zip(range(self.s0, self.s1), self.ranks):
            h[:, s, :r] = prod[:, at:at + r]
            at += r


def _shrink_runs(meta: list[list[int]], d_in: int) -> list[ShrinkRun]:
    """A class's slices with rank > 0 grouped into runs of adjacent A factors."""
    offs, ranks = meta
    runs: list[ShrinkRun] = []
    for s, (off, r) in enumerate(zip(offs, ranks)):
        if r == 0:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.s1 == s and off == offs[s - 1] + ranks[s - 1] * d_in:
            runs[-1] = ShrinkRun(last.s0, s + 1, last.offset, last.ranks + (r,))
        else:
            runs.append(ShrinkRun(s, s + 1, off, (r,)))
    return runs


def _expand_slices(meta: list[list[int]]) -> list[tuple[int, int, int, int, int]]:
    """A class's (slice, B offset, rank, first output column, columns) of slices that write."""
    return [(s, off, r, o, n) for s, (off, r, o, n) in enumerate(zip(*meta)) if r > 0 and n > 0]


def _product(left: Tensor, right: Tensor, c: ClassPlan) -> Tensor:
    """Row t of the result: left[t] @ right[slot of t]; left (T_c, k), right (U_c, k, n) (the
    expand's B.T as stored; shrinks read A by `_shrink_product`)."""
    if c.strategy == "matmul":
        return left @ right[0]  # (T_c, n)
    if c.strategy == "padded":
        U, k = len(c.slots), left.shape[1]
        if c.uniform:  # rows sorted by slot, m_c each: already (U_c, m_c, k)
            return torch.bmm(left.reshape(U, c.busiest, k), right).reshape(-1, right.shape[2])
        padded = left.new_zeros(U, c.busiest, k)  # (U_c, m_c, k)
        padded[c.inv, c.pos] = left
        return torch.bmm(padded, right)[c.inv, c.pos]  # (T_c, n)
    per_row = right.index_select(0, c.inv)  # (T_c, k, n)
    return torch.bmm(left.unsqueeze(1), per_row).squeeze(1)  # (T_c, n)


def _shrink_product(x: Tensor, A: Tensor, c: ClassPlan) -> Tensor:
    """Row t of the result: x[t] @ A[slot of t].T; x (T_c, d_in), A (U_c, width, d_in) as stored.
    Batched over slots as A @ x.T, a GEMV per slot along A's stored rows: ~1.5x faster than
    x @ A.T (`_product`) when the factors are not in cache, as a step of many adapters finds them."""
    if c.strategy == "matmul":
        return x @ A[0].T  # (T_c, width)
    if c.strategy == "padded":
        U, k = len(c.slots), x.shape[1]
        if c.uniform:  # rows sorted by slot, m_c each: already (U_c, m_c, d_in)
            return torch.bmm(A, x.reshape(U, c.busiest, k).transpose(1, 2)).transpose(1, 2).reshape(-1, A.shape[1])
        padded = x.new_zeros(U, c.busiest, k)  # (U_c, m_c, d_in)
        padded[c.inv, c.pos] = x
        return torch.bmm(A, padded.transpose(1, 2)).transpose(1, 2)[c.inv, c.pos]  # (T_c, width)
    per_row = A.index_select(0, c.inv)  # (T_c, width, d_in)
    return torch.bmm(per_row, x.unsqueeze(2)).squeeze(2)  # (T_c, width)


def _in_batch_order(hs: Tensor, plan: RowPlan, cache: StepCache | None) -> Tensor:
    """Every row's h, given in plan order, in batch order (remembered in plan order for the expand)."""
    h = plan.restore(hs)
    return h if cache is None or plan.identity else cache.shrunk(h, plan, hs)


def lora_shrink_torch(x: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, a_offset: Tensor,
                      rank: Tensor, max_rank: int, cache: StepCache | None = None) -> Tensor:
    T, d_in = x.shape
    n_slices = a_offset.shape[1]
    if max_rank == 0:
        return torch.zeros(T, n_slices, 0, dtype=torch.float32, device=x.device)
    plan = _plan(idx, page_table, (a_offset, rank), cache)
    if not plan.classes:
        return torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    specs = _class_specs("shrink", plan, (a_offset, rank), d_in, cache, lambda m: _shrink_runs(m, d_in))
    first = _one_slot_in_place(pool, page_table, plan, cache)
    if first is not None and x.dtype == torch.float32:
        key = ("shrink views", id(a_offset), id(rank), plan.classes[0].cls, pool.data_ptr(), first, d_in)
        views = cache.workspace.specs.get(key)
        if views is None:  # per run of adjacent A factors: A.T (d_in, width), a view of the pool
            views = cache.workspace.specs[key] = [
                (run, _factor(pool, first, run.offset, sum(run.ranks), d_in).T) for run in specs[0]]
        if len(views) == 1 and views[0][0].whole(n_slices, max_rank):
            return (x @ views[0][1]).view(T, n_slices, max_rank)  # every slice at full width
        h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
        for run, AT in views:
            run.split(x @ AT, h)
        return h
    run = _uniform_in_place(pool, page_table, plan, cache)
    if run is not None and x.dtype == torch.float32:
        c = plan.classes[0]
        views = _uniform_views("shrink", pool, run, plan, (id(a_offset), id(rank)),
                               lambda: [(r, r.offset, sum(r.ranks), d_in) for r in specs[0]])
        xs = plan.take(x)  # rows sorted by slot, m_c each
        if len(views) == 1 and views[0][0].whole(n_slices, max_rank):  # every slice at full width
            return _in_batch_order(_shrink_product(xs, views[0][1], c).view(-1, n_slices, max_rank), plan, cache)
        hs = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
        for r, A in views:  # A (U, width, d_in)
            r.split(_shrink_product(xs, A, c), hs)
        return _in_batch_order(hs, plan, cache)
    bufs = _class_buffers(pool, page_table, plan, cache)
    xs = plan.take(x).float()  # (Ta, d_in)
    every_row = plan.identity or plan.inverse is not None
    if every_row and len(plan.classes) == 1 and len(specs[0]) == 1:
        run = specs[0][0]
        if run.whole(n_slices, max_rank):
            # one class, every row, every slice at full width: h is the product itself, in batch order
            A = bufs[0][:, run.offset:run.offset + n_slices * max_rank * d_in].view(-1, n_slices * max_rank, d_in)
            hs = _shrink_product(xs, A, plan.classes[0]).view(-1, n_slices, max_rank)
            return _in_batch_order(hs, plan, cache)
    hs = torch.zeros(len(plan.rows), n_slices, max_rank, dtype=torch.float32, device=x.device)
    for c, buf, runs in zip(plan.classes, bufs, specs):
        xc = xs[c.r0:c.r1]
        for run in runs:
            width = sum(run.ranks)
            A = buf[:, run.offset:run.offset + width * d_in].view(-1, width, d_in)  # (U_c, width, d_in), a view
            run.split(_shrink_product(xc, A, c), hs[c.r0:c.r1])  # (T_c, width): slices side by side
    if every_row:
        return _in_batch_order(hs, plan, cache)
    h = torch.zeros(T, n_slices, max_rank, dtype=torch.float32, device=x.device)
    h[plan.rows] = hs
    return h


def lora_expand_torch(h: Tensor, pool: Tensor, page_table: Tensor, idx: Tensor, b_offset: Tensor, rank: Tensor,
                      out_start: Tensor, out_len: Tensor, scale: Tensor, y: Tensor,
                      cache: StepCache | None = None) -> Tensor:
    if h.shape[2] == 0:  # no row's adapter adapts this linear
        return y
    meta = (b_offset, rank, out_start, out_len)
    plan = _plan(idx, page_table, meta, cache)
    if not plan.classes:
        return y
    specs = _class_specs("expand", plan, meta, None, cache, _expand_slices)
    first = _one_slot_in_place(pool, page_table, plan, cache)
    if first is not None and y.dtype == torch.float32:
        c = plan.classes[0]
        key = ("expand views", *map(id, meta), c.cls, pool.data_ptr(), first)
        views = cache.workspace.specs.get(key)
        if views is None:  # per slice: B.T (r, n) as stored, a view of the pool
            views = cache.workspace.specs[key] = [
                (s, r, o, n, _factor(pool, first, off, r, n)) for s, off, r, o, n in specs[0]]
        alpha = _cached(cache, ("scale", id(plan), 0, id(scale)), lambda: float(scale[c.first_slot]))
        for s, r, o, n, BT in views:
            y[:, o:o + n].addmm_(h[:, s, :r], BT, alpha=alpha)
        return y
    run = _uniform_in_place(pool, page_table, plan, cache)
    if run is not None and y.dtype == torch.float32:
        c = plan.classes[0]
        U, m = len(c.slots), c.busiest
        views = _uniform_views("expand", pool, run, plan, tuple(map(id, meta)),
                               lambda: [((s, r, o, n), off, r, n) for s, off, r, o, n in specs[0]])
        sc = plan.memo.get(("scales", id(scale)))
        if sc is None:  # (U, 1, 1, 1) each slot's scale; a slot's scale is fixed while the plan is kept
            sc = plan.memo[("scales", id(scale))] = scale.index_select(0, c.slots)[:, None, None, None]
        hc = cache.take(h, plan).reshape(U, m, -1, h.shape[2]) * sc  # (U, m, n_slices, R) scaled
        for (s, r, o, n), BT in views:  # BT (U, r, n) as stored
            y[:, o:o + n].add_(plan.restore(torch.bmm(hc[:, :, s, :r], BT).view(-1, n)))
        return y
    bufs = _class_buffers(pool, page_table, plan, cache)
    hs = plan.take(h) if cache is None else cache.take(h, plan)  # (Ta, n_slices, R)
    # float32 y is updated where it is, each row once: rows in plan order in place; when one class
    # holds every row out of order, its rows put back in batch order (a select and an add, ~3x
    # cheaper than index_add_); else by index_add_. The same sums as the reference's
    # y.float() + delta; other dtypes via a float32 copy.
    direct = y.dtype == torch.float32
    ys = y if direct else plan.take(y).float()  # (Ta or T, d_out)
    restore = direct and plan.inverse is not None and len(plan.classes) == 1
    for ci, (c, buf, slices) in enumerate(zip(plan.classes, bufs, specs)):
        rows = plan.rows[c.r0:c.r1] if direct and not plan.identity and not restore else None  # (T_c,) rows of y
        yc = ys if rows is not None or len(plan.classes) == 1 else ys[c.r0:c.r1]
        if c.strategy == "matmul":  # one slot: its scale is one number
            alpha = _cached(cache, ("scale", id(plan), ci, id(scale)), lambda: float(scale[c.first_slot]))
            hc = hs if len(plan.classes) == 1 else hs[c.r0:c.r1]
            for s, off, r, o, n in slices:
                BT = buf[0, off:off + n * r].view(r, n)  # B.T (r, n) as stored, a view
                if restore:
                    yc[:, o:o + n].add_(plan.restore(hc[:, s, :r] @ BT), alpha=alpha)
                elif rows is None:
                    yc[:, o:o + n].addmm_(hc[:, s, :r], BT, alpha=alpha)
                else:
                    yc[:, o:o + n].index_add_(0, rows, hc[:, s, :r] @ BT, alpha=alpha)
        else:
            sc = _cached(cache, ("scales", id(plan), id(scale)),
                         lambda: scale.index_select(0, plan.slot_of_row)[:, None, None])  # (Ta, 1, 1)
            hc = hs[c.r0:c.r1] * sc[c.r0:c.r1]  # (T_c, n_slices, R) scaled per row
            for s, off, r, o, n in slices:
                BT = buf[:, off:off + n * r].view(-1, r, n)  # (U_c, r, n) B.T as stored, a view
                if restore:
                    yc[:, o:o + n].add_(plan.restore(_product(hc[:, s, :r], BT, c)))
                elif rows is None:
                    yc[:, o:o + n].add_(_product(hc[:, s, :r], BT, c))
                else:
                    yc[:, o:o + n].index_add_(0, rows, _product(hc[:, s, :r], BT, c))
    if not direct:
        y[plan.rows] = ys.to(y.dtype)
    return y
