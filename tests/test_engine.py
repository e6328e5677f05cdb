"""The engine at TP=1, stepped by hand: scheduling, preemption, cancellation,
sampling, stop conditions and refusals. (TP=2 on Ray: test_group.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bdlora_ray.config import LlamaConfig
from bdlora_ray.engine import EngineConfig
from bdlora_ray.errors import AdapterInUse, InvalidRequest, Overloaded
from bdlora_ray.request import GenerationRequest, SamplingParams
from bdlora_ray.sampling import make_generator, sample_row
from engine_harness import engine_files, hf_generate, local_engine, run_to_completion, tokens

CFG = LlamaConfig.from_name("tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return engine_files(tmp_path_factory.mktemp("engine"), CFG)


def req(rid, prompt, adapter=None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(rid, tuple(prompt), adapter, SamplingParams(**params))


def test_preempted_requests_finish_with_correct_output(files):
    ckpt, adapters = files
    # KV for all 6 sequences at full length needs 6 * ceil(30/4) = 48 pages; give 28 + the adapter.
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(num_pages=28 + 7), block_size=4)
    g = torch.Generator().manual_seed(3)
    reqs = [req(f"p{i}", torch.randint(3, 1024, (6,), generator=g).tolist(), "small" if i % 2 else None,
                max_tokens=24) for i in range(6)]
    outs = run_to_completion(engine, reqs)
    assert engine.counters["preemptions"] > 0
    for r in reqs:
        ref = hf_generate(ckpt, list(r.prompt_ids), 24, adapters["small"][0] if r.adapter else None)
        assert tokens(outs[r.request_id]) == ref, r.request_id
    u = engine.pool.usage()
    assert u.kv_pages == 0 and u.pinned_adapters == 0


def test_cancel_frees_pages_at_once(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters)
    baseline = engine.pool.usage()
    events = []
    fetched = engine.prefetch("bd")
    engine.step()  # starts the fetch in the background
    fetched.result(timeout=60)
    engine.submit(req("c", [5, 6, 7, 8, 9], "bd", max_tokens=50), events.append)
    for _ in range(5):
        engine.step()
    assert len(tokens(events)) == 5 and not events[-1].finished
    during = engine.pool.usage()
    assert during.kv_pages > 0 and during.pinned_adapters == 1
    engine.abort("c")
    engine.step()
    after = engine.pool.usage()
    assert after.kv_pages == baseline.kv_pages == 0 and after.pinned_adapters == 0
    assert events[-1].finished and events[-1].finish_reason == "abort"
    # The adapter stays resident, idle; the 2 full blocks of the 9 computed tokens stay cached.
    assert after.cached_pages == 2 and after.free_pages + after.adapter_pages + 2 == after.total_pages


def test_requests_join_a_running_batch(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters)
    first = req("first", [3, 4, 5], max_tokens=10)
    late = req("late", [7, 8, 9, 10], "small", max_tokens=4)
    joined = {}

    def add_late(i, outs):
        if i == 3:
            outs["late"] = []
            engine.submit(late, outs["late"].append)
            joined["running"] = len(engine.scheduler.running)

    outs = run_to_completion(engine, [first], on_step=add_late)
    assert joined["running"] == 1  # "first" was mid-decode when "late" arrived
    assert tokens(outs["late"]) == hf_generate(ckpt, [7, 8, 9, 10], 4, adapters["small"][0])
    assert tokens(outs["first"]) == hf_generate(ckpt, [3, 4, 5], 10)


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters)
    p = [11, 12, 13, 14]
    outs = run_to_completion(engine, [
        req("s1", p, temperature=1.0, seed=7, max_tokens=12), req("s2", p, temperature=1.0, seed=7, max_tokens=12),
        req("s3", p, temperature=1.0, seed=8, max_tokens=12), req("k1", p, temperature=0.9, top_k=1, max_tokens=12),
        req("p0", p, temperature=0.9, top_p=1e-6, max_tokens=12), req("g", p, max_tokens=12)])
    assert tokens(outs["s1"]) == tokens(outs["s2"])
    assert tokens(outs["s1"]) != tokens(outs["s3"])
    assert tokens(outs["k1"]) == tokens(outs["p0"]) == tokens(outs["g"])


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    top5 = set(torch.topk(logits, 5).indices.tolist())
    probs, order = torch.sort(logits.softmax(-1), descending=True)
    nucleus = set(order[:int((probs.cumsum(0) < 0.5).sum()) + 1].tolist())
    g = make_generator(SamplingParams(seed=1))
    assert {sample_row(logits, SamplingParams(top_k=5), g) for _ in range(300)} <= top5
    seen = {sample_row(logits, SamplingParams(top_p=0.5), g) for _ in range(300)}
    assert seen <= nucleus and len(seen) > 1


def test_stop_string_and_eos(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters)
    prompt = list(b"hello there")
    full = run_to_completion(engine, [req("full", prompt, max_tokens=40)])["full"]
    text = "".join(e.text for e in full)
    assert len(text) >= 4, "the fixture model should emit some byte tokens"
    stop = text[2:4]
    cut = run_to_completion(engine, [req("cut", prompt, max_tokens=40, stop=(stop,))])["cut"]
    assert cut[-1].finish_reason == "stop"
    assert "".join(e.text for e in cut) == text[:text.find(stop)]
    first = tokens(full)[0]
    engine.eos_ids = {first}  # the model's first greedy token is now EOS
    eos = run_to_completion(engine, [req("eos", prompt, max_tokens=40)])["eos"]
    assert tokens(eos) == [first] and eos[-1].finish_reason == "stop" and "".join(e.text for e in eos) == ""
    assert eos[-1].completion_tokens == 1


@pytest.mark.parametrize("bad", [
    dict(prompt=[]), dict(prompt=[5] * 1000), dict(prompt=[5, 99999]), dict(temperature=-1.0),
    dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=0), dict(stop=("",))])
def test_bad_requests_are_refused_with_invalid_request(files, bad):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(max_model_len=512))
    prompt = bad.pop("prompt", [5, 6])
    with pytest.raises(InvalidRequest):
        engine.submit(req("bad", prompt, **bad), lambda e: None)
    assert len(run_to_completion(engine, [req("ok", [5, 6], max_tokens=2)])["ok"]) == 2


def test_queue_bound_and_wait_bound(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(max_queue_len=2, max_queue_wait_s=0.0))
    events = {"a": [], "b": []}
    engine.submit(req("a", [5, 6]), events["a"].append)
    engine.submit(req("b", [5, 6]), events["b"].append)
    with pytest.raises(Overloaded):
        engine.submit(req("c", [5, 6]), lambda e: None)
    engine.step()  # both waited longer than 0 s before the step scheduled them
    for rid in "ab":
        assert events[rid][-1].finish_reason == "error" and events[rid][-1].error_status == 503
    assert engine.pool.usage().kv_pages == 0


def test_unknown_adapter_fails_alone_and_too_big_request_gets_503(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters, EngineConfig(num_pages=8, max_model_len=1000), block_size=4)
    outs = run_to_completion(engine, [req("nope", [5, 6], "missing"), req("fine", [5, 6], max_tokens=3),
                                      req("huge", list(range(3, 60)), max_tokens=3)])
    assert outs["nope"][-1].error_status == 404 and outs["nope"][-1].error_type == "AdapterNotFound"
    assert outs["huge"][-1].error_status == 503 and outs["huge"][-1].error_type == "PoolExhausted"
    assert tokens(outs["fine"]) == hf_generate(ckpt, [5, 6], 3)


def test_unload_evicts_idle_adapter_only(files):
    ckpt, adapters = files
    engine = local_engine(CFG, ckpt, adapters)
    run_to_completion(engine, [req("x", [5, 6], "small", max_tokens=2)])
    assert "small" in engine.pool
    fut = engine.unload("small")
    engine.step()
    assert fut.result(timeout=5) is True and "small" not in engine.pool
    events = []
    fetched = engine.prefetch("small")
    engine.step()
    fetched.result(timeout=60)
    engine.submit(req("y", [5, 6], "small", max_tokens=50), events.append)
    engine.step()
    assert engine.pool.adapter("small").refcount == 1
    busy = engine.unload("small")
    engine.step()
    with pytest.raises(AdapterInUse):
        busy.result(timeout=5)


def test_engine_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().num_pages = 3  # type: ignore[misc]
