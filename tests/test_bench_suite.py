"""The serving benchmarks (bench/): workload statistics, traces, runner metrics over a fake HTTP
server, the equal-parameter rank, the CLI, and one tiny end-to-end comparison."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.runner import SLO, RequestRecord, RunnerConfig, percentile, run, summarize
from bench.workload import (PROMPT_TOKEN_RANGE, Request, TraceError, WorkloadConfig, gamma_arrivals, generate,
                            popularity, read_trace, write_trace)

ROOT = Path(__file__).resolve().parent.parent


# ---- workload ---------------------------------------------------------------------------------

def test_workload_is_seeded():
    cfg = WorkloadConfig(num_requests=50, num_adapters=7, seed=3)
    assert generate(cfg) == generate(cfg)
    assert generate(cfg) != generate(WorkloadConfig(num_requests=50, num_adapters=7, seed=4))


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.6])
def test_popularity_follows_the_power_law_hottest_first(alpha):
    n, reqs = 10, generate(WorkloadConfig(num_requests=20_000, num_adapters=10, alpha=alpha, seed=1))
    counts = np.bincount([int(r.adapter.rsplit("-", 1)[1]) for r in reqs], minlength=n)
    p = popularity(n, alpha)
    assert np.all(np.diff(p) < 0)                          # strictly decreasing in the adapter index
    assert counts[0] > counts[1] > counts[4] > counts[9]   # and so are the draws
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.012)
    # S-LoRA's definition: adapter floor(x * n) for x ~ Power(alpha)
    x = np.random.default_rng(0).power(alpha, 200_000)
    np.testing.assert_allclose(np.bincount((x * n).astype(int), minlength=n) / x.size, p, atol=0.005)


def test_alpha_one_is_uniform_and_zero_adapters_is_the_base_model():
    np.testing.assert_allclose(popularity(8, 1.0), np.full(8, 1 / 8))
    assert all(r.adapter is None for r in generate(WorkloadConfig(num_requests=20, num_adapters=0)))


@pytest.mark.parametrize("rate,cv", [(5.0, 1.0), (20.0, 0.5), (2.0, 3.0)])
def test_gamma_arrivals_have_the_rate_and_cv(rate, cv):
    t = gamma_arrivals(100_000, rate, cv, np.random.default_rng(7))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_lengths_are_uniform_in_their_inclusive_ranges():
    reqs = generate(WorkloadConfig(num_requests=4000, num_adapters=3, input_len=(5, 9), output_len=(2, 4), seed=2))
    ins, outs = [r.prompt_len for r in reqs], [r.max_tokens for r in reqs]
    assert sorted(set(ins)) == [5, 6, 7, 8, 9] and sorted(set(outs)) == [2, 3, 4]
    assert np.bincount(outs)[2:].min() > 4000 / 3 * 0.85
    assert all(PROMPT_TOKEN_RANGE[0] <= t < PROMPT_TOKEN_RANGE[1] for r in reqs for t in r.prompt_ids)
    assert [r.index for r in reqs] == list(range(4000))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))


@pytest.mark.parametrize("bad", [dict(num_requests=0), dict(alpha=0), dict(rate=0), dict(cv=-1),
                                 dict(input_len=(0, 3)), dict(output_len=(5, 4))])
def test_bad_workload_configs_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadConfig(**bad)


# ---- traces -----------------------------------------------------------------------------------

def test_trace_round_trip_and_forms(tmp_path):
    reqs = generate(WorkloadConfig(num_requests=30, num_adapters=4, seed=5))
    assert read_trace(write_trace(reqs, tmp_path / "t.jsonl")) == reqs
    lines = [{"arrival_s": 2.0, "adapter": None, "prompt": "hello", "max_tokens": 3},
             {"arrival_s": 0.5, "adapter": "a-1", "prompt_len": 6, "max_tokens": 1},
             {"arrival_s": 0.5, "adapter": "a-2", "prompt": [4, 5], "max_tokens": 2}]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = read_trace(path, seed=1)
    assert [(r.index, r.arrival_s, r.adapter, r.max_tokens) for r in out] == [
        (0, 0.5, "a-1", 1), (1, 0.5, "a-2", 2), (2, 2.0, None, 3)]    # sorted by arrival, ties in file order
    assert len(out[0].prompt_ids) == 6 and out[1].prompt_ids == (4, 5) and out[2].prompt_text == "hello"
    assert out[2].prompt_len == 5
    assert read_trace(path, seed=1) == out


@pytest.mark.parametrize("line,message", [
    ("{not json", "not JSON"),
    ('[1, 2]', "JSON object"),
    ('{"arrival_s": 1, "max_tokens": 2, "prompt": "x", "adaptor": "a"}', "unknown keys"),
    ('{"arrival_s": -1, "max_tokens": 2, "prompt": "x"}', "arrival_s"),
    ('{"arrival_s": "soon", "max_tokens": 2, "prompt": "x"}', "arrival_s"),
    ('{"arrival_s": 1, "max_tokens": 0, "prompt": "x"}', "max_tokens"),
    ('{"arrival_s": 1, "max_tokens": 2}', "exactly one"),
    ('{"arrival_s": 1, "max_tokens": 2, "prompt": "x", "prompt_len": 3}', "exactly one"),
    ('{"arrival_s": 1, "max_tokens": 2, "prompt_len": 0}', "prompt_len"),
    ('{"arrival_s": 1, "max_tokens": 2, "prompt": []}', "prompt must"),
    ('{"arrival_s": 1, "max_tokens": 2, "prompt": "x", "adapter": "../etc"}', "adapter"),
])
def test_bad_traces_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "max_tokens": 1, "prompt": "ok"}\n' + line + "\n")
    with pytest.raises(TraceError, match=message) as e:
        read_trace(path)
    assert f"{path}:2:" in str(e.value)


def test_empty_trace_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(tmp_path / "e.jsonl")


# ---- metrics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 101])
def test_percentile_matches_numpy(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summary_throughput_percentiles_and_slo_on_known_latencies():
    def rec(i, ttft, tpot, tokens=11, error=None):
        first = i + ttft
        return RequestRecord(i, "a", float(i), first_s=first, done_s=first + tpot * (tokens - 1), tokens=tokens,
                             error=error)

    records = [rec(0, 0.1, 0.10), rec(1, 0.2, 0.30), rec(2, 0.3, 0.05), rec(3, 0.4, 0.10),
               rec(4, 0.1, 0.10, error="HTTP 503 overloaded"), RequestRecord(5, None, 5.0, error="time limit"),
               rec(6, 0.2, 0.0, tokens=1)]  # one token: no per-token latency
    s = summarize(records, wall_s=2.0, slo=SLO(ttft_s=0.3, tpot_s=0.2))
    assert (s["requests"], s["ok"], s["errors"]) == (7, 5, 2)
    assert s["error_kinds"] == {"HTTP 503 overloaded": 1, "time limit": 1}
    assert s["req_per_s"] == pytest.approx(2.5) and s["tokens_per_s"] == pytest.approx((4 * 11 + 1) / 2)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["p90"] == pytest.approx(0.36)  # .1 .2 .2 .3 .4
    assert s["tpot_s"]["p50"] == pytest.approx(0.10) and s["tpot_s"]["p99"] == pytest.approx(np.percentile(
        [0.1, 0.3, 0.05, 0.1], 99))
    # SLO met by requests 0, 2 and 6 (1: TPOT too slow, 3: TTFT too slow, 4 and 5 failed), out of all 7
    assert s["slo"]["attainment"] == pytest.approx(3 / 7)


# ---- the runner over HTTP ---------------------------------------------------------------------

def _fake_openai_app(bodies: list[dict]):
    """/v1/completions streaming like deploy/api.py: 'missing' is a 404, 'broken' fails mid-stream,
    'hang' never answers; any other model streams one chunk per token, usage, then [DONE]."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def sse(d) -> str:
        return f"data: {d if isinstance(d, str) else json.dumps(d)}\n\n"

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        model, n = body["model"], body["max_tokens"]
        if model == "missing":
            return JSONResponse({"error": {"message": "no", "type": "not_found_error", "code": "model_not_found"}},
                                status_code=404)
        if model == "hang":
            await asyncio.Event().wait()

        async def events():
            for i in range(n):
                await asyncio.sleep(0)
                if model == "broken" and i == 1:
                    yield sse({"error": {"message": "worker died", "type": "server_error",
                                         "code": "replica_group_failed"}})
                    yield sse("[DONE]")
                    return
                yield sse({"choices": [{"text": "ab"[i % 2], "finish_reason": "length" if i == n - 1 else None}]})
            yield sse({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def fake_server():
    import uvicorn

    bodies: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_fake_openai_app(bodies), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # another thread's state: poll it, bounded
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", bodies
    server.should_exit = server.force_exit = True  # the 'hang' request would hold a graceful exit
    thread.join(timeout=10)


def _req(i: int, adapter: str | None, max_tokens: int = 4, arrival: float = 0.0) -> Request:
    return Request(i, arrival, adapter, (5, 6, 7), None, max_tokens)


def test_runner_counts_tokens_errors_and_sends_openai_requests(fake_server):
    url, bodies = fake_server
    bodies.clear()
    reqs = [_req(0, "a-1", 4), _req(1, None, 3, 0.01), _req(2, "missing", 2, 0.02), _req(3, "broken", 5, 0.03),
            _req(4, "a-2", 1, 0.04)]
    res = run(reqs, RunnerConfig(url, "base-model", time_limit_s=60, progress=False, label="fake"))
    s = res.summary
    assert (s["requests"], s["ok"], s["errors"]) == (5, 3, 2)
    assert s["error_kinds"] == {"HTTP 404 model_not_found": 1, "stream error replica_group_failed": 1}
    assert [r.tokens for r in res.records if r.ok] == [4, 3, 1] and s["tokens"] == 8
    for r in res.records:
        if r.ok:
            assert r.arrival_s <= r.first_s <= r.done_s
    assert res.records[4].tpot is None and res.records[0].tpot is not None
    assert s["req_per_s"] == pytest.approx(3 / res.wall_s)
    by_model = {b["model"]: b for b in bodies}
    assert set(by_model) == {"a-1", "base-model", "missing", "broken", "a-2"}
    assert by_model["a-1"] == {"model": "a-1", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0,
                               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def test_runner_ttft_from_the_first_text_chunk(fake_server):
    url, _ = fake_server
    res = run([_req(0, "a-1", 3)], RunnerConfig(url, "base", time_limit_s=60, progress=False, ttft_at="first_text"))
    (r,) = res.records
    assert r.ok and r.tokens == 3 and r.first_s <= r.done_s


def test_runner_bounds_the_run_and_counts_what_did_not_finish(fake_server):
    url, _ = fake_server
    res = run([_req(0, "a-1", 2), _req(1, "hang", 2), _req(2, "a-1", 2, arrival=3600.0)],
              RunnerConfig(url, "base", time_limit_s=1.0, progress=False))
    assert [r.error for r in res.records] == [None, "time limit", "time limit"]
    assert res.summary["error_kinds"] == {"time limit": 2}


def test_runner_config_is_checked():
    with pytest.raises(ValueError):
        RunnerConfig("http://127.0.0.1:1", "m", ttft_at="headers")
    with pytest.raises(ValueError):
        run([], RunnerConfig("http://127.0.0.1:1", "m"))


# ---- comparisons ------------------------------------------------------------------------------

def test_equal_parameter_rank_is_computed_from_the_shapes():
    from bdlora_ray.synthetic import random_adapter
    from bench.modes import adapter_params, equal_param_rank
    from deploy.seed import TINY as c

    for rank, nblocks in ((8, None), (6, 2), (8, 4)):  # the count of the tensors PEFT's layout has
        assert adapter_params(rank, nblocks) == sum(
            t.numel() for t in random_adapter(c, rank, nblocks=nblocks).tensors.values())

    dims = {t: (c.in_features(t), c.out_features(t)) for t in
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    dense = sum(i + o for i, o in dims.values())
    # BD-LoRA with 2 blocks: B of column layers and A of row layers have half their columns
    bd = sum(i + o // 2 if t not in ("o_proj", "down_proj") else i // 2 + o for t, (i, o) in dims.items())
    assert adapter_params(16, None) == 16 * c.num_layers * dense
    assert adapter_params(24, 2) == 24 * c.num_layers * bd
    r = equal_param_rank(16, 2)
    assert r % 2 == 0
    best = min(range(2, 129, 2), key=lambda k: abs(k * bd - 16 * dense))
    assert r == best == 24


def test_bench_entry_point_lists_comparisons_and_programs():
    p = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    listed = {line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")}
    assert listed == {"modes", "scaling", "peft", "cold", "tax", "decode", "kernels", "packing", "plots"} | {
        path.stem for path in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in path.read_text()
        and path.stem not in ("__main__", "compare")}
    bad = subprocess.run([sys.executable, "-m", "bench", "no-such-bench"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown benchmark 'no-such-bench'" in bad.stderr


def test_bench_entry_point_runs_a_program_with_its_options(tmp_path):
    """`python -m bench packing ...` is `python -m bench.packing ...`: options reach it, it writes its JSON."""
    out = tmp_path / "packing.json"
    p = subprocess.run([sys.executable, "-m", "bench", "packing", "--tp", "2", "--gib", "0.5", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("ratio unified/fixed:")
    assert json.loads(out.read_text())["tp"] == 2


def test_cli_has_no_bench_command():
    from bdlora_ray import cli

    assert set(cli.build_parser()._subparsers._group_actions[0].choices) == {"push", "ls"}


@pytest.mark.slow
def test_modes_comparison_end_to_end_tiny(tmp_path):
    """`python -m bench modes` at the smallest size: a real server, all three modes, table, JSON, plot."""
    out, png = tmp_path / "modes.json", tmp_path / "modes.png"
    cmd = [sys.executable, "-m", "bench", "modes", "--adapters", "1", "--lora-rank", "4",
           "--requests", "3", "--rate", "50", "--output-len", "2-3", "--input-len", "4-8", "--repeats", "1",
           "--pages", "256", "--engine-batch", "2", "--engine-steps", "2", "--engine-rounds", "1",
           "--wave-rounds", "1", "--wave-tokens", "3", "--no-progress", "--json", str(out), "--plot", str(png)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("bd / slora throughput:") and lines[-1].endswith("x")
    assert any(line.startswith("engine alone bd / slora:") for line in lines)
    assert any(line.startswith("| bd |") for line in lines) and any("anchor" in line for line in lines)
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["runs"]] == ["bd", "slora", "replicated"]
    assert all(r["summary"]["ok"] == 3 and r["summary"]["errors"] == 0 for r in result["runs"])
    assert result["config"]["bd_rank"] == 6 and set(result["ratios"]) == {
        "bd / slora", "bd / replicated", "engine alone bd / slora", "engine alone bd / replicated",
        "HTTP bd/slora / engine bd/slora", "HTTP waves bd / slora", "HTTP waves bd/slora / engine bd/slora"}
    e = result["engine_alone_tokens_per_s"]
    assert set(e) == {"bd", "slora", "replicated"} and all(v > 0 for v in e.values())
    assert result["ratios"]["engine alone bd / slora"] == pytest.approx(e["bd"] / e["slora"])
    assert result["engine_alone_rounds"] == {m: [e[m]] for m in e}  # one round: its rates are the medians
    w = result["wave_tokens_per_s"]  # closed waves of the engine-alone batch over HTTP, every wave kept
    assert set(w) == {"bd", "slora", "replicated"} and all(len(v) == 1 and min(v) > 0 for v in w.values())
    assert result["ratios"]["HTTP waves bd / slora"] == pytest.approx(w["bd"][0] / w["slora"][0])
    assert any(line.startswith("HTTP waves bd / slora (median round):") for line in lines)
    assert result["command"].startswith("python -m bench modes")
    assert png.stat().st_size > 1000


def test_tax_rounds_take_the_median_of_per_round_ratios_against_the_engine_around_each_round():
    from bench.tax import aggregate

    # The engine alone measured 4 times around 3 rounds; round i is held to the faster of i and i + 1.
    engines = [[{"batch": 32, "variant": "base", "tokens_per_s": t, "windows": [t - 1, t, t + 5]}]
               for t in (100.0, 80.0, 120.0, 90.0)]
    http = [{"front": "python", "stream_interval": 1, "stream_budget": 16, "ingress": "auto", "batch": 32,
             "variant": "base",
             "stream": False, "round": i, "tokens_per_s": t, "ttft_ms_p50": None, "tpot_ms_p50": None,
             "tpot_ms_p90": None, "waves_tokens_per_s": [t]}
            for i, t in enumerate((90.0, 60.0, 117.0))]
    engine_rows, rows = aggregate(engines, http)
    assert engine_rows == [{"batch": 32, "variant": "base", "tokens_per_s": 120.0, "rounds": [100.0, 120.0, 120.0],
                            "measurements": [100.0, 80.0, 120.0, 90.0],
                            "windows": [[t - 1, t, t + 5] for t in (100.0, 80.0, 120.0, 90.0)]}]
    (row,) = rows
    # Per round: 90 / 100, 60 / 120, 117 / 120; the median of those, not a quotient of medians.
    assert [r["http_over_engine"] for r in row["rounds"]] == pytest.approx([0.9, 0.5, 0.975])
    assert row["http_over_engine"] == pytest.approx(0.9) and row["tokens_per_s"] == 90.0
    assert row["engine_tokens_per_s"] == 120.0 and row["tpot_ms_p50"] is None


@pytest.mark.slow
def test_tax_comparison_end_to_end_tiny(tmp_path):
    """`python -m bench tax` at the smallest size: engine alone, then HTTP in every variant behind each
    front (Serve's Python proxy, HAProxy), streamed at a stream interval of 2 tokens, and with the API in
    an Ingress of its own (the default one-group app serves it from the group's replica), CPU per token
    of each serving process, the ratio last."""
    out, png = tmp_path / "tax.json", tmp_path / "tax.png"
    cmd = [sys.executable, "-m", "bench", "tax", "--batches", "1", "2", "--waves", "2", "--tokens", "16", "--steps",
           "2", "--stream-intervals", "2", "--separate-ingress", "--no-progress", "--json", str(out), "--plot",
           str(png)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("HTTP / engine at batch 2: ") and lines[-1].endswith("x")
    assert lines[-3].startswith("HTTP / engine at batch 2 (base, behind haproxy): ")
    result = json.loads(out.read_text())
    from bdlora_ray.spec import EngineConfig

    assert {r["stream_budget"] for r in result["http"]} == {EngineConfig().stream_events_per_step}
    rows = {(r["front"], r["ingress"], r["batch"], r["variant"], r["stream"], r["stream_interval"]): r
            for r in result["http"]}
    assert len(rows) == len(result["http"])
    servers = (("python", "auto"), ("haproxy", "auto"), ("python", "separate"))
    assert set(rows) == {(f, i, b, v, s, 1) for f, i in servers
                         for b in (1, 2) for v in ("base", "mixed") for s in (False, True)} | {
        ("python", "auto", b, v, True, 2) for b in (1, 2) for v in ("base", "mixed")}
    for v in ("base", "mixed"):
        for streamed in (False, True):
            name = f"HTTP tok/s, API in the group / separate ingress at batch 2 ({v}{', streamed' if streamed else ''})"
            auto, sep = (rows[("python", i, 2, v, streamed, 1)]["tokens_per_s"] for i in ("auto", "separate"))
            assert result["ratios"][name] == pytest.approx(auto / sep)
            assert f"{name}: " in p.stdout
    assert result["ratios"]["streamed HTTP / engine at batch 2 (mixed, stream interval 2)"] == pytest.approx(
        rows[("python", "auto", 2, "mixed", True, 2)]["http_over_engine"])
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["http_over_engine"] == pytest.approx(
            r["tokens_per_s"] / r["engine_tokens_per_s"])
        assert (r["tpot_ms_p50"] is not None) == r["stream"]  # 16 tokens streamed: TTFT and TPOT measured
    assert float(lines[-1].split(": ")[1][:-1]) == pytest.approx(result["ratios"]["HTTP / engine at batch 2 (base)"],
                                                                 abs=0.005)
    for r in result["engine"]:  # measured before and after the servers, the faster kept
        assert len(r["measurements"]) == 2 and r["tokens_per_s"] == max(r["measurements"]) > 0
        assert r["rounds"] == [r["tokens_per_s"]]
        # Each measurement: the median of as many windows as the HTTP cases' waves (as its waves' median).
        assert [len(w) for w in r["windows"]] == [2, 2] and r["measurements"] == [
            pytest.approx(sum(w) / 2) for w in r["windows"]]
    for r in result["http"]:
        assert len(r["rounds"][0]["waves_tokens_per_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(sum(r["rounds"][0]["waves_tokens_per_s"]) / 2)
    for front in ("python", "haproxy", "python, separate ingress"):
        cpu = result["cpu_us_per_token"][front]["base"]
        # Every serving process was found and measured; rank 0 does the engine's work in the group replica.
        assert set(cpu) == {"proxy", "ingress", "group replica (rank 0)", "rank > 0 workers", "client",
                            "group replica: engine thread", "group replica: gloo threads",
                            "group replica: other threads"}
        assert cpu["group replica (rank 0)"] > 0 and cpu["rank > 0 workers"] > 0
        # The one-group app has no ingress replica (its group's replica serves the API); asked for, it has one.
        assert (cpu["ingress"] is None) == (front != "python, separate ingress"), cpu
        # Its split by thread: each part measured, the engine thread busy, and the parts one process's
        # threads, not several processes': they add up to the whole within the kernel's rounding (CPU time
        # counted in ticks, each thread's apart, so up to a tick more for each thread that ran).
        split = [cpu[f"group replica: {part}"] for part in ("engine thread", "gloo threads", "other threads")]
        assert all(math.isfinite(v) and v >= 0 for v in split) and split[0] > 0
        sample = result["cpu_sample"][front]["base"]
        assert sample["tokens"] == 2 * 2 * 16 and sample["group_threads_ran"] >= 1  # 2 waves of 2 requests
        tick_us_per_token = 1e6 / os.sysconf("SC_CLK_TCK") / sample["tokens"]
        assert sum(split) <= cpu["group replica (rank 0)"] + (sample["group_threads_ran"] + 1) * tick_us_per_token
    # Which process held the HTTP port: HAProxy behind the haproxy front, Serve's Python proxy otherwise.
    assert result["front_processes"]["haproxy"] == ["haproxy"]
    assert result["front_processes"]["python"] and "haproxy" not in result["front_processes"]["python"]
    assert png.stat().st_size > 1000
