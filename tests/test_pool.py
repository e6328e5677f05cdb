"""PagePool: KV blocks and adapter pages in one pool, LRU eviction, pinning, exhaustion."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bdlora_ray.config import LlamaConfig
from bdlora_ray.errors import PoolExhausted
from bdlora_ray.lora.layout import TARGETS, AdapterLayout, tensor_name
from bdlora_ray.lora.shard import AdapterMeta, expected_shard_shapes
from bdlora_ray.memory import PagePool, PoolConfig
from bdlora_ray.kernels.lora_ref import lora_expand_ref, lora_shrink_ref, read_paged

# Tiny on purpose: 200 adapters must cycle through in seconds. KV page = 2*8*1*16 = 256 elems.
CFG = LlamaConfig(name="pool-test", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
TP, BLOCK = 2, 8
RANKS = (8, 16, 32, 64)


def make_shard(rank: int, seed: int, tp_rank: int = 0, targets=TARGETS) -> tuple[AdapterMeta, dict]:
    meta = AdapterMeta(mode="bd", tp=TP, rank=rank, alpha=2.0 * rank, scale=0.5 + seed % 3, targets=targets,
                       num_layers=CFG.num_layers, base_model=CFG.name, block_targets=targets)
    g = torch.Generator().manual_seed(seed)
    return meta, {k: torch.randn(shape, generator=g)
                  for k, shape in expected_shard_shapes(CFG, meta, tp_rank).items()}


def make_pool(num_pages: int) -> PagePool:
    return PagePool(PoolConfig.for_model(CFG, TP, num_pages, block_size=BLOCK))


def pages_of(shard: dict) -> int:
    return AdapterLayout.from_shard(CFG.num_layers, shard).num_pages(2 * BLOCK * 16)


def assert_pages_hold(pool: PagePool, name: str, shard: dict) -> None:
    """Every matrix read back from the adapter's pages (as the kernels read it) equals the shard."""
    a = pool.adapter(name)
    for layer in range(CFG.num_layers):
        for s in a.layout.segments:
            got = s.unstored(read_paged(pool.data[layer], a.pages, s.offset, *s.stored_shape))
            assert torch.equal(got, shard[tensor_name(layer, s.target, s.factor)]), (name, layer, s)


def assert_outputs_match(pool: PagePool, names: list[str], shards: dict, gen: torch.Generator) -> None:
    """Mixed batch through the paged kernel references == s * B(Ax) from the shard; -1 rows untouched."""
    table = pool.adapter_page_table(names)  # (S, max_pages)
    layer = 1
    for target in ("q_proj", "down_proj"):  # one column- and one row-parallel target
        slots = [pool.adapter(n) for n in names]
        a_seg = [s.layout.segment(target, "A") for s in slots]
        b_seg = [s.layout.segment(target, "B") for s in slots]
        d_in, d_out = a_seg[0].cols, b_seg[0].rows
        idx = torch.tensor([i for i in range(len(names)) for _ in range(2)] + [-1, -1], dtype=torch.int32)
        x = torch.randn(len(idx), d_in, generator=gen)           # (T, d_in)
        y0 = torch.randn(len(idx), d_out, generator=gen)         # (T, d_out)
        rank = torch.tensor([[s.rows] for s in a_seg], dtype=torch.int32)  # (S, 1)
        h = lora_shrink_ref(x, pool.data[layer], table, idx,
                            torch.tensor([[s.offset] for s in a_seg]), rank, int(rank.max()))
        y = lora_expand_ref(h, pool.data[layer], table, idx, torch.tensor([[s.offset] for s in b_seg]), rank,
                            torch.zeros(len(names), 1, dtype=torch.int32),
                            torch.full((len(names), 1), d_out, dtype=torch.int32),
                            torch.tensor([s.meta.scale for s in slots]), y0.clone())
        for i, n in enumerate(names):
            A = shards[n][tensor_name(layer, target, "A")]
            B = shards[n][tensor_name(layer, target, "B")]
            rows = idx == i
            want = y0[rows] + slots[i].meta.scale * (x[rows] @ A.T @ B.T)
            # the same float32 sums in another order (the pool holds B.T): ~1e-5 apart at rank 64
            torch.testing.assert_close(y[rows], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(y[idx == -1], y0[idx == -1])


def test_page_size_and_kv_view():
    pool = make_pool(10)
    assert pool.config.elems_per_page == 2 * BLOCK * (CFG.num_kv_heads // TP) * CFG.head_dim
    assert pool.data.shape == (CFG.num_layers, 10, 256)
    kv = pool.kv_cache(1)  # (num_pages, 2, block, kv_heads, head_dim)
    assert kv.shape == (10, 2, BLOCK, 1, 16)
    kv[3, 1, 2, 0, 5] = 7.0  # V of token 2 in page 3 of layer 1
    assert pool.data[1, 3, BLOCK * 16 + 2 * 16 + 5] == 7.0 and pool.data[0].abs().sum() == 0
    with pytest.raises(ValueError):
        PoolConfig(num_layers=1, num_pages=4, block_size=8, kv_heads=1, head_dim=16, page_elems=100)
    wide = PagePool(PoolConfig(num_layers=1, num_pages=4, block_size=8, kv_heads=1, head_dim=16, page_elems=300))
    wide.kv_cache(0)[2, 0, 0, 0, 0] = 1.0  # pages wider than a KV block: the block is each page's head
    assert wide.data[0, 2, 0] == 1.0 and wide.data.sum() == 1.0


def test_kv_table_grows_one_block_at_a_time():
    pool = make_pool(6)
    assert pool.allocate_kv("s", 1) == [0]
    assert pool.allocate_kv("s", BLOCK) == [0]              # still fits the first block
    assert pool.allocate_kv("s", BLOCK + 1) == [0, 1]       # earlier pages never move
    assert pool.allocate_kv("t", 3 * BLOCK) == [2, 3, 4]
    u = pool.usage()
    assert (u.kv_pages, u.free_pages, u.adapter_pages, u.sequences) == (5, 1, 0, 2)
    pool.free_kv("s")
    assert pool.usage().free_pages == 3
    assert pool.allocate_kv("u", 2 * BLOCK) == [0, 1]       # freed pages are reused


def test_adapter_weights_and_outputs_from_scattered_pages():
    pool = make_pool(400)
    gen = torch.Generator().manual_seed(0)
    shards, metas = {}, {}
    for i, r in enumerate((64, 8, 32, 16, 8, 64)):
        metas[f"a{i}"], shards[f"a{i}"] = make_shard(r, seed=i)
        pool.load_adapter(f"a{i}", shards[f"a{i}"], metas[f"a{i}"])
        pool.allocate_kv(f"s{i}", BLOCK * (i + 1))  # interleave KV so adapter pages are not one run
    pool.evict_adapter("a1")
    pool.free_kv("s2")
    metas["b"], shards["b"] = make_shard(32, seed=99)
    pool.load_adapter("b", shards["b"], metas["b"])  # lands in reused, non-contiguous pages
    pages = pool.adapter("b").pages.tolist()
    assert pages != list(range(pages[0], pages[0] + len(pages)))
    names = [n for n in pool.adapters_lru()]
    for n in names:
        assert_pages_hold(pool, n, shards[n])
    assert_outputs_match(pool, names, shards, gen)


def test_exhaustion_raises_and_changes_nothing():
    meta, shard = make_shard(64, seed=1)
    n = pages_of(shard)
    pool = make_pool(2 * n + 3)
    pool.load_adapter("p1", shard, meta, pin=True)
    pool.load_adapter("p2", make_shard(64, seed=2)[1], meta, pin=True)
    pool.allocate_kv("s", 2 * BLOCK)
    before = pool.usage()
    with pytest.raises(PoolExhausted):
        pool.allocate_kv("s", 4 * BLOCK)
    with pytest.raises(PoolExhausted):
        pool.load_adapter("x", make_shard(8, seed=3)[1], meta)
    assert pool.usage() == before and pool.kv_page_table("s") and "x" not in pool
    pool.unpin("p1")
    pool.load_adapter("x", make_shard(8, seed=3)[1], meta)  # now p1 is idle and gives way
    assert "p1" not in pool and "p2" in pool and pool.usage().evictions == 1


def test_kv_growth_evicts_least_recently_used_idle_adapter():
    shards = {f"a{i}": make_shard(16, seed=i) for i in range(3)}
    n = pages_of(shards["a0"][1])
    pool = make_pool(3 * n)
    for name, (meta, shard) in shards.items():
        pool.load_adapter(name, shard, meta)
    pool.pin("a0")                       # oldest, but in use
    pool.load_adapter("a1", shards["a1"][1], shards["a1"][0])  # touch: a2 is now the LRU idle one
    pool.allocate_kv("s", BLOCK)
    assert pool.adapters_lru() == ["a0", "a1"]
    pool.allocate_kv("s", BLOCK * (n + 1))
    assert pool.adapters_lru() == ["a0"]
    with pytest.raises(ValueError):
        pool.evict_adapter("a0")
    pool.unpin("a0")
    with pytest.raises(ValueError):
        pool.unpin("a0")


def test_200_adapters_cycle_through_a_pool_of_about_20():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    adapters = {f"ad{i:03d}": make_shard(RANKS[i % 4], seed=1000 + i) for i in range(200)}
    pages = {n: pages_of(s) for n, (_, s) in adapters.items()}
    pool = make_pool(20 * sum(pages.values()) // len(pages))
    names = list(adapters)
    order = names * 2 + [rng.choice(names[:20]) for _ in range(100)]  # cold sweeps + hot re-use
    rng.shuffle(order)
    pinned: list[str] = []  # adapter of each running request (repeats = several requests)
    finish: list[int] = []  # step at which that request finishes and unpins
    long_pinned_survived = 0  # steps at which a pinned adapter was among the oldest and was skipped
    for step, name in enumerate(order):
        before, free = pool.adapters_lru(), pool.usage().free_pages
        meta, shard = adapters[name]
        pool.load_adapter(name, shard, meta)
        after = pool.adapters_lru()
        evicted = [a for a in before if a not in after]
        # Exactly the oldest idle adapters, as few as make room, went; the rest kept their order.
        want = []
        if name not in before:
            for a in before:
                if free >= pages[name]:
                    break
                if a not in pinned:
                    want.append(a)
                    free += pages[a]
        assert evicted == want, step
        assert after == [a for a in before if a not in evicted and a != name] + [name]
        assert set(pinned) <= set(after)
        long_pinned_survived += any(a in pinned for a in before[:len(evicted) + 1])
        # Requests: most finish within 3 steps, a few run long, so pinned adapters grow old in LRU order.
        pool.pin(name)
        pinned.append(name)
        finish.append(step + (150 if rng.random() < 0.02 else 3))
        for i in reversed(range(len(pinned))):
            if finish[i] <= step:
                pool.unpin(pinned.pop(i))
                finish.pop(i)
        if step % 40 == 39:
            resident = pool.adapters_lru()
            for a in resident:
                assert_pages_hold(pool, a, adapters[a][1])
            batch = rng.sample(resident, min(4, len(resident)))
            assert_outputs_match(pool, batch, {a: adapters[a][1] for a in batch}, gen)
    u = pool.usage()
    assert 12 <= u.adapters <= 40 and u.evictions >= 350 and u.loads == u.evictions + u.adapters
    assert u.pinned_adapters == len(set(pinned)) and u.free_pages + u.adapter_pages == u.total_pages
    assert long_pinned_survived >= 100  # pinned adapters really were eviction candidates by age


def test_packing_bench_runs_and_counts_consistently(tmp_path, capsys):
    from bench import packing
    out = tmp_path / "packing.json"
    res = packing.main(["--model", "tiny", "--tp", "2", "--gib", "0.02", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ratio unified/fixed: {res['ratio']:.2f}x"
    assert res["fixed_adapters"] == res["budget_bytes"] // res["fixed_slot_bytes"]
    assert res["unified_used_bytes"] <= res["budget_bytes"]
    for row in res["per_rank"]:
        assert row["exact_bytes"] <= row["paged_bytes"] < row["exact_bytes"] + res["page_bytes"]
    assert res["per_rank"][-1]["exact_bytes"] == res["fixed_slot_bytes"]  # rank 64 == max rank
    # Ranks 8..64 average 30, slots hold 64: paging fits about twice as many.
    assert 1.8 < res["ratio"] < 2.5


def test_prefix_blocks_are_shared_cached_and_evicted_lru_with_idle_adapters():
    meta, shard = make_shard(8, seed=5)
    n = pages_of(shard)
    pool = make_pool(n + 6)
    assert pool.allocate_kv("a", 3 * BLOCK) == [0, 1, 2]
    assert pool.cache_blocks("a", 0, ["h0", "h1"]) == 2 and pool.cached_page("h1") == 1
    assert pool.share_kv("b", [0, 1]) == [0, 1] and pool.allocate_kv("b", 2 * BLOCK + 1) == [0, 1, 3]
    assert pool.cache_blocks("b", 0, ["h0", "h1"]) == 0     # registered already: nothing changes
    assert pool.cache_blocks("b", 2, ["h0"]) == 0           # a hash held by another page stays there
    assert (pool.usage().kv_pages, pool.usage().sequences) == (4, 2)  # shared pages count once
    pool.free_kv("a")                                       # 0, 1 still used by b; 2 was never registered
    assert (pool.usage().cached_pages, pool.usage().free_pages) == (0, n + 3)
    pool.load_adapter("x", shard, meta)                     # idle, and used before b lets go of its blocks
    pool.free_kv("b")
    u = pool.usage()
    assert (u.kv_pages, u.cached_pages, u.free_pages, u.adapter_pages) == (0, 2, 4, n)
    with pytest.raises(ValueError):
        pool.share_kv("c", [3])                             # not a registered block
    # The adapter is the least recently used: it goes before the cached blocks.
    pool.allocate_kv("c", BLOCK * (n + 4))
    assert "x" not in pool and pool.cached_page("h0") == 0 and pool.cached_page("h1") == 1
    # Then the cached blocks, the later block of a sequence first (freed first, as vLLM does).
    pool.allocate_kv("c", BLOCK * (n + 5))
    assert pool.cached_page("h1") is None and pool.cached_page("h0") == 0 and pool.usage().block_evictions == 1
    pool.allocate_kv("c", BLOCK * (n + 6))
    before = pool.usage()
    assert before.cached_pages == 0 and before.free_pages == 0 and before.block_evictions == 2
    with pytest.raises(PoolExhausted):
        pool.allocate_kv("c", BLOCK * (n + 7))
    assert pool.usage() == before
    pool.free_kv("c")
    assert pool.usage().free_pages == n + 6


def test_blocks_released_before_an_adapter_was_used_go_first():
    meta, shard = make_shard(8, seed=6)
    n = pages_of(shard)
    pool = make_pool(n + 2)
    pool.allocate_kv("a", 2 * BLOCK)
    pool.cache_blocks("a", 0, ["h0", "h1"])
    pool.free_kv("a")
    pool.load_adapter("x", shard, meta)
    pool.allocate_kv("b", BLOCK)                            # one cached block gives way, not the adapter
    assert "x" in pool and pool.usage().cached_pages == 1 and pool.usage().block_evictions == 1
    assert pool.available() == 1 + n and pool.available(keep="x") == 1 and pool.available(reuse=(0,)) == n
