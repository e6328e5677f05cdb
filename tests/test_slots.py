"""Persistent slot tables: written once per adapter load, read by every step.

The tables must hold exactly what the adapter's layout says (checked against
the kernels' reference reading the same pool), follow loads, evictions and
slot reuse, and a step must take every argument but its row index from them.
The torch path's three product shapes are checked against the reference,
and a running batch is shown not to change when another adapter joins it.
"""

from __future__ import annotations

import pytest
import torch

from bdlora_ray import kernels
from bdlora_ray.comm import Comm
from bdlora_ray.config import LlamaConfig
from bdlora_ray.lora.batch import LoraBatch
from bdlora_ray.lora.layout import TARGETS
from bdlora_ray.lora.slots import COLUMN_GROUPS, GROUPS, SlotTables, slot_rows
from bdlora_ray.memory import PagePool, PoolConfig
from bdlora_ray.synthetic import random_adapter, write_peft_adapter, write_random_checkpoint
from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker
from bdlora_ray.kernels.lora_ref import lora_expand_ref, lora_shrink_ref
from bdlora_ray.kernels.lora_torch import _page_runs, _plan, lora_expand_torch, lora_shrink_torch, strategy
from test_pool import BLOCK, CFG, TP, make_shard


def make_pool(num_pages: int, capacity: int = 2) -> tuple[PagePool, SlotTables]:
    tables = SlotTables(CFG, tp_rank=1, tp=TP, capacity=capacity)
    return PagePool(PoolConfig.for_model(CFG, TP, num_pages, block_size=BLOCK), listener=tables), tables


def assert_rows_hold(tables: SlotTables, pool: PagePool, name: str) -> None:
    a = pool.adapter(name)
    assert torch.equal(tables.page_table[a.slot, :a.num_pages], a.pages)
    assert int(tables.pages_host[a.slot]) == a.num_pages
    assert float(tables.scale[a.slot]) == pytest.approx(a.meta.scale)
    for gi, (group, (row, slora)) in enumerate(slot_rows(a.meta, a.layout, CFG, 1, TP).items()):
        t = tables.groups[group]
        for field, values in row.items():
            assert getattr(t, field)[a.slot].tolist() == values, (name, group, field)
        assert bool(t.slora[a.slot]) == slora == bool(tables.slora_host[a.slot, gi])
        assert int(tables.width_host[a.slot, gi]) == max(row["rank_a"] + row["rank_b"])


def test_tables_follow_loads_evictions_and_slot_reuse():
    pool, tables = make_pool(2000)
    shards = {f"a{i}": make_shard(r, seed=i, tp_rank=1) for i, r in enumerate((8, 64, 8, 16, 32))}
    for name, (meta, shard) in shards.items():
        pool.load_adapter(name, shard, meta)
    assert [pool.adapter(n).slot for n in shards] == [0, 1, 2, 3, 4]
    assert tables.capacity >= 5  # grew from 2, keeping the first slots' rows
    pool.evict_adapter("a1")
    pool.evict_adapter("a3")
    assert all(int(t.rank_a[1].abs().sum()) == 0 for t in tables.groups.values())  # forgotten
    assert int(tables.width_host[1].sum()) == 0 and int(tables.pages_host[1]) == 0
    meta, shard = make_shard(16, seed=9, tp_rank=1, targets=("q_proj", "v_proj", "down_proj"))
    pool.load_adapter("b", shard, meta)
    assert pool.adapter("b").slot == 1  # the lowest free slot is reused
    for name in pool.adapters_lru():
        assert_rows_hold(tables, pool, name)
    # Same rank and targets: one class (the torch path shares their gather); otherwise not.
    cls = {n: int(tables.class_host[pool.adapter(n).slot]) for n in pool.adapters_lru()}
    assert cls["a0"] == cls["a2"] and len({cls["a0"], cls["a4"], cls["b"]}) == 3


def test_a_step_takes_everything_but_its_index_from_the_tables():
    pool, tables = make_pool(2000)
    for i, r in enumerate((8, 32, 16)):
        meta, shard = make_shard(r, seed=i, tp_rank=1, targets=TARGETS if i != 2 else ("o_proj",))
        pool.load_adapter(f"a{i}", shard, meta)
    idx = torch.tensor([2, -1, 0, 0, 2], dtype=torch.int32)
    batch = LoraBatch.from_tables(tables, idx, pool.data)
    assert batch.page_table is tables.page_table and batch.scale is tables.scale
    for name, g in batch.groups.items():
        t = tables.groups[name]
        assert g.a_offset is t.a_offset and g.rank_b is t.rank_b and g.out_len is t.out_len
    # Widths: the largest rank among the rows' slots, per linear (slot 1, rank 32, is not in the step).
    per_rank = {8: 4, 16: 8}  # bd at TP=2: r / 2 per rank
    assert batch.groups["qkv"].width == per_rank[8] and batch.groups["o"].width == per_rank[16]
    assert not LoraBatch.from_tables(tables, torch.tensor([-1, -1]), pool.data).groups["qkv"].active
    with pytest.raises(ValueError, match="beyond the slot tables"):
        LoraBatch.from_tables(tables, torch.tensor([0, tables.capacity]), pool.data)


@pytest.mark.parametrize("targets", ["all", "some"])
@pytest.mark.parametrize("pages", ["irregular", "runs"])
@pytest.mark.parametrize("rows,want", [
    ([0] * 8, "matmul"),                                 # one adapter, every row: h is the product itself
    ([0] * 7 + [-1], "matmul"),                          # one adapter
    ([0, 1, 2, 3, 4, 5, -1, 1, 3, 5, 0, 2, 4], "padded"),  # even use: no padding at all
    ([3, 0, 5, 1, 4, 2, 0, 1, 2, 3, 4, 5], "padded"),      # even use, every row, out of order (a decode step)
    ([0, 1, 2, 3, 4, 5, 1, 3, 0], "padded"),             # uneven use: padded
    ([0] * 10 + [1, 2, 3, 4, 5, -1], "rows"),             # skewed: gather each row's factors
])
def test_torch_product_shapes_match_the_reference(rows, want, pages, targets):
    """Six adapters of one class (rank 16): the planned shape is `want`, results are the
    reference's in every fused linear, rows with no adapter are bit-identical. `runs`: the
    adapters' pages lie at a regular stride (KV blocks taken between loads come from the other
    end of the pool), read in place as one strided view; `irregular`: adapters of another rank
    between some of them, so the six's pages are gathered. `some`: targets that leave a slice
    out of q|k|v and gate|up, so a shrink is two products, not one."""
    pool, tables = make_pool(3000)
    pool.allocate_kv("filler", BLOCK * 7)
    some = ("q_proj", "v_proj", "up_proj", "o_proj")
    for i in range(6):
        meta, shard = make_shard(16, seed=i, tp_rank=1, targets=TARGETS if targets == "all" else some)
        pool.load_adapter(f"a{i}", shard, meta)
        pool.allocate_kv(f"gap{i}", BLOCK * (i + 1))
        if pages == "irregular" and i in (1, 3):
            other_meta, other_shard = make_shard(8, seed=10 + i, tp_rank=1)
            pool.load_adapter(f"other{i}", other_shard, other_meta)
    idx = torch.tensor([pool.adapter(f"a{r}").slot if r >= 0 else -1 for r in rows], dtype=torch.int32)
    used = torch.tensor([r for r in rows if r >= 0])
    counts = torch.bincount(used)
    assert strategy(len(used), int((counts > 0).sum()), int(counts.max())) == want
    batch = LoraBatch.from_tables(tables, idx, pool.data)
    g = batch.groups["qkv"]
    plan = _plan(batch.idx, batch.page_table, (g.a_offset, g.rank_a), batch.segments)
    in_place = [run.first is not None for run in _page_runs(batch.page_table, plan)]
    assert in_place == [pages == "runs" or len(set(used.tolist())) == 1]
    gen = torch.Generator().manual_seed(0)
    args = (pool.data[1], batch.page_table, batch.idx)
    for group, g in batch.groups.items():
        d_in = CFG.in_features(GROUPS[group][0]) // (1 if group in COLUMN_GROUPS else TP)
        x = torch.randn(len(idx), d_in, generator=gen)
        d_out = sum(CFG.out_features(t) // (TP if group in COLUMN_GROUPS else 1) for t in GROUPS[group])
        y0 = torch.randn(len(idx), d_out, generator=gen)
        h = lora_shrink_torch(x, *args, g.a_offset, g.rank_a, g.width, batch.segments)
        h_ref = lora_shrink_ref(x, *args, g.a_offset, g.rank_a, g.width)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
        meta = (g.b_offset, g.rank_b, g.out_start, g.out_len, batch.scale)
        y = lora_expand_torch(h_ref, *args, *meta, y0.clone(), batch.segments)
        y_ref = lora_expand_ref(h_ref, *args, *meta, y0.clone())
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(y[idx == -1], y0[idx == -1])
        assert not torch.equal(y[idx >= 0], y0[idx >= 0]) or not g.active, group


def test_a_repeated_index_reuses_its_plan_until_a_slot_changes():
    """Decode steps repeat one index: the second step finds the first's row plan (and page runs,
    and the gathered pages of slots not lying at a regular stride); after a slot's adapter is
    replaced, by one of the same rank (new weights in the same slot and class) or of another
    rank, the same index gets a new plan, and every step's results are the reference's."""
    pool, tables = make_pool(3000)
    for i, name in enumerate(("a0", "other", "a1", "a2")):  # a0, a1, a2 of one class, not at one stride
        meta, shard = make_shard(8 if name == "other" else 16, seed=i, tp_rank=1)
        pool.load_adapter(name, shard, meta)
    slots = [pool.adapter(n).slot for n in ("a0", "a1", "a2")]
    idx = torch.tensor([slots[r] for r in (1, 0, 2, 1, 0, 2)] + [-1], dtype=torch.int32)
    x = torch.randn(len(idx), CFG.hidden_size, generator=torch.Generator().manual_seed(0))

    def step(gathered: bool = True) -> object:
        batch = LoraBatch.from_tables(tables, idx, pool.data)
        g = batch.groups["gate_up"]
        for layer in range(CFG.num_layers):
            args = (pool.data[layer], batch.page_table, batch.idx, g.a_offset, g.rank_a, g.width)
            torch.testing.assert_close(lora_shrink_torch(x, *args, batch.segments), lora_shrink_ref(x, *args),
                                       rtol=1e-5, atol=1e-5)
        plan = _plan(batch.idx, batch.page_table, (g.a_offset, g.rank_a), batch.segments)
        if gathered:  # one class, its pages gathered
            assert [run.first is None for run in _page_runs(batch.page_table, plan)] == [True]
        return plan

    first = step()
    assert step() is first
    pool.evict_adapter("a2")
    meta, shard = make_shard(16, seed=7, tp_rank=1)  # same class, other weights, a2's slot
    pool.load_adapter("b", shard, meta)
    assert pool.adapter("b").slot == slots[2]
    second = step()
    assert second is not first and step() is second
    pool.evict_adapter("a1")
    meta, shard = make_shard(8, seed=5, tp_rank=1)
    pool.load_adapter("c", shard, meta)
    assert pool.adapter("c").slot == slots[1]
    assert step(gathered=False) is not second


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    cfg = LlamaConfig.from_name("tiny")
    d = tmp_path_factory.mktemp("slots")
    write_random_checkpoint(cfg, d / "model", seed=0)
    adapters = {}
    for i, (rank, targets) in enumerate([(8, TARGETS), (8, TARGETS), (16, TARGETS), (8, TARGETS),
                                         (4, ("q_proj", "v_proj"))]):
        path = write_peft_adapter(random_adapter(cfg, rank, targets, seed=i), d / f"ad{i}")
        adapters[f"ad{i}"] = (str(path), "replicated")
    return cfg, d / "model", adapters


def _steps(tiny_world, join: bool) -> list[torch.Tensor]:
    """Logits of three running sequences (two adapters, one base) over a prefill and 4 decode
    steps; with `join`, after step 1 an idle adapter is evicted and two others enter the pool
    (one reusing its slot, one of the running adapters' class) and their sequences join."""
    cfg, ckpt, adapters = tiny_world
    worker = TPWorker(cfg, str(ckpt), Comm(), PoolConfig.for_model(cfg, 1, 400, block_size=4),
                      LocalShardSource(adapters, cfg, 1), StepChannel(1))
    for name in ("ad0", "ad4", "ad1"):
        worker.apply("load_adapter", [name])
    running = [["s0", "ad0", 0, [5, 9, 14, 3]], ["s1", "ad1", 0, [7, 2, 11]], ["s2", None, 0, [4, 4, 8, 20, 6]]]
    joined: list[list] = []
    out = []
    for step in range(5):
        if join and step == 2:
            worker.apply("evict_adapter", ["ad4"])
            worker.apply("load_adapter", ["ad2"])  # takes ad4's slot
            worker.apply("load_adapter", ["ad3"])  # same rank and targets as ad0/ad1
            joined = [["j0", "ad2", 0, [9, 9, 1]], ["j1", "ad3", 0, [3]]]
        seqs = running + joined
        for s in seqs:
            worker.pool.allocate_kv(s[0], s[2] + len(s[3]))
        logits = worker.execute(seqs)  # (len(seqs), vocab): each sequence's last row
        out.append(logits[:len(running)])
        for s, row in zip(seqs, logits):  # greedy decode
            s[2], s[3] = s[2] + len(s[3]), [int(row.argmax())]
    assert worker.pool.adapter("ad2").slot == 1 if join else "ad2" not in worker.pool
    return out


def test_adding_adapters_to_a_running_batch_leaves_other_rows_unchanged(tiny_world):
    kernels.set_backend("torch")
    try:
        alone, joined = _steps(tiny_world, join=False), _steps(tiny_world, join=True)
    finally:
        kernels.set_backend(None)
    for step, (a, j) in enumerate(zip(alone, joined)):
        # Rows computed independently of the others; the base GEMM over a taller batch may
        # round differently in its last bits, so closeness is the bound, not bit equality.
        torch.testing.assert_close(j, a, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert not torch.equal(alone[0][0], alone[0][2])
