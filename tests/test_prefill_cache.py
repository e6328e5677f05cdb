"""Chunked prefill and prefix caching: greedy outputs with either on or off equal HF + PEFT for
prompts longer than the step budget, at TP=1 (stepped by hand) and TP=2 (two gloo processes, the
engine on rank 0); prefix-cache isolation between adapters and adapter versions; cached blocks give
way before a request is refused; admission checks KV room before loading an adapter."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import EngineConfig
from bdlora_ray.request import GenerationRequest, SamplingParams
from deploy.metrics import GroupStatsCollector
from engine_harness import engine_files, hf_generate, local_engine, run_to_completion, tokens
from reference import make_adapter

CFG = LlamaConfig.from_name("tiny")
BUDGET = 16      # tokens per step: every prompt below is longer
NEW = 6
MODES = [dict(enable_chunked_prefill=c, enable_prefix_caching=p) for c in (True, False) for p in (True, False)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # At TP=1 the BD-LoRA adapter (2 blocks) is served replicated; the TP=2 test serves it bd.
    return engine_files(tmp_path_factory.mktemp("prefill"), CFG, seeds=(31, 32), bd_blocks=2, bd_mode="replicated")


def req(rid, prompt, adapter=None, n=NEW) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), adapter, SamplingParams(max_tokens=n, temperature=0.0))


def long_prompts(seed: int = 0) -> list[list[int]]:
    """Four prompts of 37..61 tokens; the last two share a 32-token prefix with the first."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    first = rand(45)
    return [first, rand(61), first[:32] + rand(5), first[:32] + rand(20)]


def workload(adapters: dict) -> list[GenerationRequest]:
    names = [None, "small", "bd", "small", "bd", None]
    ps = long_prompts()
    # The same prompts once more under other adapters: cached blocks must not cross adapters.
    return [req(f"r{i}", p, names[i % 6]) for i, p in enumerate(ps)] + \
           [req(f"x{i}", p, names[(i + 1) % 3]) for i, p in enumerate(ps)]


def references(ckpt, adapters, reqs) -> dict[str, list[int]]:
    return {r.request_id: hf_generate(ckpt, list(r.prompt_ids), NEW, adapters[r.adapter][0] if r.adapter else None)
            for r in reqs}


@pytest.fixture(scope="module")
def expected(files):
    ckpt, adapters = files
    return references(ckpt, adapters, workload(adapters))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"chunked={m['enable_chunked_prefill']},"
                                                       f"cache={m['enable_prefix_caching']}")
def test_greedy_outputs_equal_hf_with_chunked_prefill_and_prefix_caching_on_or_off(files, expected, mode):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(max_num_batched_tokens=BUDGET, **mode))
    outs = run_to_completion(engine, workload(adapters))
    for rid, ref in expected.items():
        assert tokens(outs[rid]) == ref, rid
    u = engine.pool.usage()
    assert u.kv_pages == 0 and u.pinned_adapters == 0
    if mode["enable_prefix_caching"]:
        # r0/x2 (base) and r3/x0/x3 ("small") share a 32-token prefix; a hit across adapters would
        # have changed an output.
        assert engine.counters["prefix_cache_hits"] > 0 and u.cached_pages > 0
    else:
        assert engine.counters["prefix_cache_hits"] == 0 and u.cached_pages == 0


def test_decodes_go_on_while_a_long_prompt_is_prefilled_in_pieces(files):
    ckpt, adapters = files
    long = long_prompts()[1]  # 61 tokens: pieces of 15 beside the decode of "short", then the last one
    for chunked in (True, False):
        engine = local_engine(CFG, ckpt, adapters, EngineConfig(max_num_batched_tokens=BUDGET,
                                                                enable_chunked_prefill=chunked))
        fetched = engine.prefetch("bd")
        engine.step()
        fetched.result(timeout=60)
        seen = []  # per step: (tokens "short" has, tokens "long" has)

        def add_long(i, outs):
            if i == 1:
                outs["long"] = []
                engine.submit(req("long", long, "bd"), outs["long"].append)
            seen.append((len(tokens(outs["short"])), len(tokens(outs.get("long", [])))))

        outs = run_to_completion(engine, [req("short", [5, 6, 7], n=12)], on_step=add_long)
        assert tokens(outs["long"]) == hf_generate(ckpt, long, NEW, adapters["bd"][0])
        first_long = next(i for i, (_, n) in enumerate(seen) if n)
        if chunked:  # submitted after step 1; 5 steps of prefill pieces, "short" got a token in each
            assert first_long == 6 and [s for s, _ in seen[:7]] == [1, 2, 3, 4, 5, 6, 7]
        else:  # one step may only hold the prompt when alone: it waits for "short" to finish
            assert seen[first_long - 1][0] == 12


def test_prefix_hits_only_within_one_adapter_version(files, tmp_path):
    ckpt, adapters = files
    moved = {n: (str(shutil.copytree(p, tmp_path / n)), m) for n, (p, m) in adapters.items()}
    engine = local_engine(CFG, ckpt, moved, EngineConfig(max_num_batched_tokens=BUDGET))
    prompt = long_prompts()[0]  # 45 tokens: 11 full blocks of 4 may be shared
    hits = lambda: engine.counters["prefix_cache_hits"]  # noqa: E731

    first = run_to_completion(engine, [req("a", prompt, "small")])["a"]
    assert hits() == 0
    cached = engine.pool.usage().cached_pages
    # Other adapters and the base model, same prompt: never a hit, only blocks of their own.
    for name in ("bd", None):
        out = run_to_completion(engine, [req(f"o{name}", prompt, name)])[f"o{name}"]
        assert hits() == 0
        assert tokens(out) == hf_generate(ckpt, prompt, NEW, moved[name][0] if name else None)
    assert engine.pool.usage().cached_pages >= 3 * cached
    # The same adapter again: all blocks but the one holding the last token are hits, same output.
    again = run_to_completion(engine, [req("b", prompt, "small")])["b"]
    assert hits() == 44 and tokens(again) == tokens(first) == hf_generate(ckpt, prompt, NEW, moved["small"][0])
    # A re-pushed version of "small" (other weights, same name) never hits the old version's blocks.
    shutil.rmtree(moved["small"][0])
    make_adapter(ckpt, Path(moved["small"][0]), rank=8, seed=77)
    engine.unload("small")
    engine.step()
    new = run_to_completion(engine, [req("c", prompt, "small")])["c"]
    assert hits() == 44
    assert tokens(new) == hf_generate(ckpt, prompt, NEW, moved["small"][0]) != tokens(first)
    again = run_to_completion(engine, [req("d", prompt, "small")])["d"]
    assert hits() == 88 and tokens(again) == tokens(new)
    # /metrics reads the same numbers from the engine's published stats.
    collector = GroupStatsCollector()
    collector.update([engine.stats(), engine.stats()])
    m = {s.name: s.value for fam in collector.collect() for s in fam.samples if not s.labels}
    assert m["bdlora_prefix_cache_hits"] == 2 * 88
    assert m["bdlora_prefix_cache_queries"] == 2 * 6 * len(prompt)
    cached = {s.labels["kind"]: s.value for fam in collector.collect() for s in fam.samples
              if s.name == "bdlora_pool_pages"}["cached"]
    assert cached == 2 * engine.pool.usage().cached_pages > 0


def test_cached_blocks_give_way_before_a_request_is_refused(files):
    ckpt, adapters = files
    # 40 pages of 4 tokens: each finished request below leaves its full blocks cached.
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(num_pages=40, max_num_batched_tokens=BUDGET,
                                                            max_model_len=160))
    ps = long_prompts()
    run_to_completion(engine, [req(f"w{i}", p) for i, p in enumerate(ps[:2])])
    assert engine.pool.usage().cached_pages == (45 + NEW - 1) // 4 + (61 + NEW - 1) // 4 == 28
    big = list(range(3, 3 + 140))  # 35 blocks, 38 with its output: room only if the cached ones go
    out = run_to_completion(engine, [req("big", big, n=10)])["big"]
    assert out[-1].finish_reason == "length" and tokens(out) == hf_generate(ckpt, big, 10)
    u = engine.pool.usage()
    assert u.block_evictions >= 38 - (40 - 28) and u.kv_pages == 0


def test_admission_checks_kv_room_before_loading_the_adapter(files):
    ckpt, adapters = files
    probe = local_engine(CFG, ckpt, adapters)
    fetched = probe.prefetch("small")
    probe.step()
    fetched.result(timeout=60)
    adapter_pages = probe.worker.adapter_needs("small")[1]
    # A base request grows from 16 to 31 blocks; "small" and its 25-block prompt do not fit beside it.
    # Loading the adapter anyway would be undone: the base request's growth evicts it again.
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(num_pages=30 + adapter_pages, max_model_len=160,
                                                            enable_prefix_caching=False))
    ps = long_prompts()
    reqs = [req("base", ps[1], n=64), req("lora", ps[1] + ps[0][:39], "small", n=2)]
    outs = run_to_completion(engine, reqs)
    assert tokens(outs["lora"]) == hf_generate(ckpt, list(reqs[1].prompt_ids), 2, adapters["small"][0])
    assert engine.pool.usage().loads == 1 and engine.pool.usage().evictions == 0


def test_a_sequence_that_can_never_fit_is_refused_not_preempted_forever(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(num_pages=12, max_num_batched_tokens=BUDGET,
                                                            max_model_len=200))
    # The 40-token prompt fits (10 blocks of 12); its output grows past the pool.
    out = run_to_completion(engine, [req("grow", list(range(3, 43)), n=30)])["grow"]
    assert out[-1].error_status == 503 and out[-1].error_type == "PoolExhausted"
    assert engine.pool.usage().kv_pages == 0


# ---- TP=2: the engine on rank 0 of two gloo processes, rank 1 replaying its steps --------------------

def _tp_rank(rank: int, world: int, init: str, ckpt: str, adapters: dict, reqs: list, modes: list,
             out_dir: str) -> None:
    from bdlora_ray.comm import end_spawned_rank, init_distributed, leave_world
    from bdlora_ray.engine import Engine
    from bdlora_ray.memory import PoolConfig
    from bdlora_ray.tokenizer import load_tokenizer
    from bdlora_ray.worker import LocalShardSource, StepChannel, TPWorker
    import torch.distributed as dist

    torch.set_num_threads(1)
    comm = init_distributed(rank, world, f"file://{init}", backend="gloo")
    group = dist.new_group(backend="gloo")
    result = {}
    for i, mode in enumerate(modes):
        config = EngineConfig(max_num_batched_tokens=BUDGET, **mode)
        pool = PoolConfig.for_model(CFG, world, config.num_pages, block_size=4)
        worker = TPWorker(CFG, ckpt, comm, pool, LocalShardSource(adapters, CFG, world), StepChannel(world, group))
        if rank == 0:
            engine = Engine(worker, load_tokenizer(ckpt), config)
            outs = run_to_completion(engine, reqs)
            engine.step()  # sends the last step's frees to rank 1
            engine.stop()
            result[i] = {"tokens": {rid: tokens(o) for rid, o in outs.items()},
                         "hits": engine.counters["prefix_cache_hits"]}
        else:
            worker.serve_forever()
        result[f"usage{i}"] = worker.pool.usage().to_dict()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    leave_world(barrier=True)
    end_spawned_rank()


@pytest.mark.slow
def test_tp2_outputs_equal_hf_with_chunked_prefill_and_prefix_caching_on_or_off(files, expected):
    ckpt, adapters = files
    adapters = {"small": (adapters["small"][0], "slora"), "bd": (adapters["bd"][0], "bd")}
    reqs = workload(adapters)
    modes = [MODES[0], MODES[3]]  # both on, both off
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_rank, args=(2, os.path.join(d, "init"), str(ckpt), adapters, reqs, modes, d), nprocs=2)
        rank0, rank1 = (json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2))
    for i in range(len(modes)):
        assert rank0[str(i)]["tokens"] == expected, modes[i]
        assert rank0[f"usage{i}"] == rank1[f"usage{i}"]  # rank 1 replayed the sharing and caching exactly
    assert rank0["0"]["hits"] > 0 and rank0["1"]["hits"] == 0
    assert rank0["usage0"]["cached_pages"] > 0 and rank0["usage1"]["cached_pages"] == 0


def test_engine_config_defaults_turn_both_on():
    c = EngineConfig()
    assert c.enable_chunked_prefill and c.enable_prefix_caching
    assert dataclasses.replace(c, enable_prefix_caching=False).enable_chunked_prefill


@pytest.mark.slow
def test_prefill_bench_runs_both_comparisons_in_one_run(tmp_path, files, capsys):
    from bench import prefill

    ckpt, _ = files
    out = tmp_path / "prefill.json"
    res = prefill.main(["--model-dir", str(ckpt), "--rounds", "1", "--no-warmup", "--decoders", "2", "--long", "64", "--every", "3",
                        "--arrivals", "2", "--budget", "16", "--system", "32", "--requests", "3", "--pages", "256",
                        "--json", str(out)])
    assert json.loads(out.read_text()) == res
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2:] == [f"ratio TPOT p99 chunked on/off: {res['tpot_p99_ratio_on_over_off']:.2f}x",
                            f"ratio TTFT p50 prefix caching on/off: {res['ttft_ratio_on_over_off']:.2f}x"]
    # Every request after the first found the whole system prompt (2 blocks of 16) cached, only with it on.
    assert res["prefix_caching"]["on"]["hit_tokens"] == 2 * 32 and res["prefix_caching"]["off"]["hit_tokens"] == 0
    assert all(m["gaps"] > 0 for m in res["chunked_prefill"].values())


def test_rows_after_a_cached_context_run_on_a_fused_kernel_and_equal_plain_attention():
    """A prefill piece or a prefix hit: n new rows after a context. Query heads grouped per KV head with
    the mask, no enable_gqa (which CUDA serves with a mask only on the math backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bdlora_ray import attention

    g = torch.Generator().manual_seed(2)
    n, total, nh, nkv, hd = 5, 13, 8, 2, 16
    q, k, v = torch.randn(n, nh, hd, generator=g), torch.randn(total, nkv, hd, generator=g), \
        torch.randn(total, nkv, hd, generator=g)
    kr, vr = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)   # (total, nh, hd)
    scores = torch.einsum("nhd,thd->hnt", q, kr) / hd ** 0.5
    visible = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]  # (n, total)
    want = torch.einsum("hnt,thd->nhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vr)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = attention._causal(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
