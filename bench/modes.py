"""(a) bd vs slora vs replicated at TP=2, at equal adapter parameter counts, through the HTTP server.

One server holds three sets of adapters: ordinary LoRAs of rank r pushed
`--mode slora` and the same LoRAs pushed `--mode replicated`, and BD-LoRAs
(nblocks = TP) of the rank r_bd whose parameter count is closest to the
LoRA's (a BD factor has 1/N of its block's entries, so r_bd > r; the counts
are computed from the adapters' tensor shapes and printed). The same seeded
open-loop workload runs against each set in turn (ABC then CBA order to
spread drift on a shared machine); throughput and latency per mode, and
bd / slora, bd / replicated throughput ratios.

Beside it, the same work as the engine-alone measurement, over HTTP: closed
waves of `--engine-batch` concurrent completions of `--wave-tokens` tokens
(greedy, EOS ignored) over each mode's adapters, in `--wave-rounds` rounds of
one wave per mode (ABC, CBA, ...): a round's bd / slora compares waves a few
seconds apart, so that the other work of a shared machine slows both alike;
the figure is the median round's. (The open-loop workload's throughput also
depends on its arrival rate: where the server keeps up, every mode completes
what arrives.)

Anchor: the BD-LoRA paper (arXiv 2510.23346) reports 1.3x-1.8x end-to-end
speed-ups over S-LoRA sharding on 8xA100 (1.63x Llama-3.1-8B, 1.79x 70B) at
similar parameter counts.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bdlora_ray.lora.layout import COLUMN_TARGETS, TARGETS
from bench import compare, engine_alone, runner
from bench.tax import one_request
from deploy.seed import TINY, DemoAdapter

NAME = "modes"
HELP = "(a) bd vs slora vs replicated at TP=2 at equal adapter parameter counts"
ANCHOR = "BD-LoRA paper: 1.3x-1.8x over S-LoRA sharding (8xA100; 1.63x 8B, 1.79x 70B)"
MODES = ("bd", "slora", "replicated")


def adapter_params(rank: int, nblocks: int | None, cfg=TINY) -> int:
    """Parameters of one adapter on every target of every layer, from the shapes PEFT saves: A (r, d_in),
    B (d_out, r); with BD-LoRA's nblocks = N, B of a column layer is (d_out, r/N) and A of a row
    layer (r, d_in/N)."""
    n = nblocks or 1
    per_layer = 0
    for t in TARGETS:
        column = t in COLUMN_TARGETS
        per_layer += rank * (cfg.in_features(t) // (1 if column else n))   # A
        per_layer += cfg.out_features(t) * (rank // n if column else rank)  # B
    return cfg.num_layers * per_layer


def equal_param_rank(lora_rank: int, tp: int, cfg=TINY) -> int:
    """The BD-LoRA rank (a multiple of tp) whose parameter count is closest to a rank-`lora_rank` LoRA's."""
    target = adapter_params(lora_rank, None, cfg)
    candidates = range(tp, 8 * lora_rank + 1, tp)
    return min(candidates, key=lambda r: (abs(adapter_params(r, tp, cfg) - target), r))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2, help="TP degree (N blocks of BD-LoRA)")
    p.add_argument("--adapters", type=int, default=16, help="distinct adapters per mode")
    p.add_argument("--lora-rank", type=int, default=16, help="rank r of the ordinary LoRAs (slora, replicated)")
    p.add_argument("--bd-rank", type=int, default=None, help="rank of the BD-LoRAs (default: equal parameters)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode (ABC CBA ... order)")
    p.add_argument("--pages", type=int, default=4096, help="pages per layer of each rank's unified pool")
    p.add_argument("--engine-batch", type=int, default=16,
                   help="batch of the engine-alone measurement (over the mode's adapters) in the same run")
    p.add_argument("--engine-steps", type=int, default=None,
                   help="decode steps of each timed engine-alone window (default: --wave-tokens, as long as a wave, "
                        "over the same context positions)")
    p.add_argument("--engine-rounds", type=int, default=5,
                   help="rounds of the engine-alone measurement (one batch per mode, ABC CBA ... order)")
    p.add_argument("--wave-rounds", type=int, default=6,
                   help="rounds of closed HTTP waves (one per mode, --engine-batch requests each)")
    p.add_argument("--wave-tokens", type=int, default=64, help="generated tokens per request of a closed wave")
    compare.add_workload_arguments(p, requests=96, rate=24.0)


def run(args: argparse.Namespace) -> dict:
    cfg = compare.MODELS[args.model]
    bd_rank = args.bd_rank or equal_param_rank(args.lora_rank, args.tp, cfg)
    params = {"bd": adapter_params(bd_rank, args.tp, cfg), "lora": adapter_params(args.lora_rank, None, cfg)}
    adapters = []
    for k in range(args.adapters):
        adapters.append(DemoAdapter(f"bd-{k}", bd_rank, True, "bd", seed=1000 + k))
        for mode in ("slora", "replicated"):  # the same LoRA, sharded two ways
            adapters.append(DemoAdapter(f"{mode}-{k}", args.lora_rank, False, mode, seed=2000 + k))
    server = compare.server_config(args, num_pages=args.pages)
    engine_steps = args.engine_steps or args.wave_tokens  # by default as long as a wave
    order = [m for i in range(args.repeats) for m in (MODES if i % 2 == 0 else MODES[::-1])]
    runs: dict[str, list] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as d:
        # The engine alone first, on the same files, before the server exists (nothing else on the CPUs).
        model_dir, peft_dirs = compare.write_files(Path(d), adapters, args.tp, args.model)
        cases = {m: [f"{m}-{i % args.adapters}" for i in range(args.engine_batch)] for m in MODES}
        # Rounds of one batch per mode, as the HTTP waves below: a round's ratio compares batches measured
        # seconds apart, where one mode's batches after another's would meet different moments of a shared machine.
        rates = engine_alone.measure(model_dir, {a.name: (str(peft_dirs[a.name]), a.mode) for a in adapters},
                                     {f"{m} {k}": cases[m] for k in range(args.engine_rounds)
                                      for m in (MODES if k % 2 == 0 else MODES[::-1])},
                                     args.tp, engine_steps, dict(server.engine))
        engine_rounds = {m: [rates[f"{m} {k}"] for k in range(args.engine_rounds)] for m in MODES}
        engine = {m: runner.percentile(v, 50) for m, v in engine_rounds.items()}
        with compare.local_server(Path(d), adapters, server, args.progress) as served:
            compare.warm_up(served, [a.name for a in adapters], args.progress)
            for i, mode in enumerate(order):
                reqs = compare.workload(args, args.adapters, prefix=mode)
                runs[mode].append(runner.run(reqs, compare.runner_config(args, served,
                                                                         f"{mode} ({i + 1}/{len(order)})")))
            waves = asyncio.run(wave_rounds(served.url, {m: cases[m] for m in MODES}, args.wave_tokens,
                                            args.wave_rounds))
    merged = {m: runner.merge(rs, m, compare.slo(args)) for m, rs in runs.items()}
    tps = {m: r.summary["tokens_per_s"] for m, r in merged.items()}
    wave_ratio = runner.median_ratio(waves["bd"], waves["slora"])
    engine_ratio = {m: runner.median_ratio(engine_rounds["bd"], engine_rounds[m]) for m in ("slora", "replicated")}
    return {
        "comparison": NAME, "anchor": ANCHOR,
        "config": {"tp": args.tp, "adapters_per_mode": args.adapters, "lora_rank": args.lora_rank,
                   "bd_rank": bd_rank, "params_per_adapter": params, "repeats": args.repeats,
                   "requests": args.requests, "rate": args.rate, "cv": args.cv, "alpha": args.alpha,
                   "input_len": args.input_len, "output_len": args.output_len, "pages": args.pages,
                   "engine_batch": args.engine_batch, "engine_steps": engine_steps,
                   "engine_rounds": args.engine_rounds, "wave_rounds": args.wave_rounds,
                   "wave_tokens": args.wave_tokens,
                   "model": compare.model_info(args), "device": "cpu"},
        "runs": [{"name": m, "rank": bd_rank if m == "bd" else args.lora_rank,
                  "params": params["bd" if m == "bd" else "lora"], **merged[m].to_dict()} for m in MODES],
        "per_repeat_tokens_per_s": {m: [r.summary["tokens_per_s"] for r in rs] for m, rs in runs.items()},
        "engine_alone_tokens_per_s": engine,
        "engine_alone_rounds": engine_rounds,
        "wave_tokens_per_s": waves,
        "ratios": {"engine alone bd / slora": engine_ratio["slora"],
                   "engine alone bd / replicated": engine_ratio["replicated"],
                   "bd / slora": tps["bd"] / tps["slora"], "bd / replicated": tps["bd"] / tps["replicated"],
                   "HTTP bd/slora / engine bd/slora": (tps["bd"] / tps["slora"]) / engine_ratio["slora"],
                   "HTTP waves bd / slora": wave_ratio,
                   "HTTP waves bd/slora / engine bd/slora": wave_ratio / engine_ratio["slora"]},
    }


async def wave_rounds(url: str, batches: dict[str, list[str]], tokens: int, rounds: int) -> dict[str, list[float]]:
    """{mode: tokens/s of its wave in each round}: one untimed wave per mode, then `rounds` rounds of one
    closed wave per mode (one completion per adapter of its batch; ABC, CBA, ...), through one client
    whose connections stay open."""
    import aiohttp

    bodies = {m: [{"model": a, "prompt": list(engine_alone.PROMPT), "max_tokens": tokens, "temperature": 0,
                   "ignore_eos": True} for a in names] for m, names in batches.items()}
    rates: dict[str, list[float]] = {m: [] for m in batches}
    size = max(len(b) for b in bodies.values())
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=size + 4)) as session:
        for i in range(rounds + 1):
            for m in (list(bodies) if i % 2 == 0 else list(bodies)[::-1]):
                t0 = time.perf_counter()
                res = await asyncio.gather(*(one_request(session, b, False, t0) for b in bodies[m]))
                if i > 0:  # round 0 warms each mode's adapters and connections up
                    rates[m].append(sum(x["tokens"] for x in res) / (time.perf_counter() - t0))
    return rates


def report(result: dict) -> list[str]:
    c = result["config"]
    p = c["params_per_adapter"]
    lines = [f"TP={c['tp']}, {c['adapters_per_mode']} adapters per mode: LoRA rank {c['lora_rank']} "
             f"({p['lora']:,} params) vs BD-LoRA rank {c['bd_rank']} ({p['bd']:,} params, "
             f"{p['bd'] / p['lora']:.3f}x); {c['requests']} requests at {c['rate']} req/s x {c['repeats']} repeats",
             ""]
    lines += compare.run_table(result["runs"], "mode")
    r = result["ratios"]
    e = result.get("engine_alone_tokens_per_s")
    if e:
        lines += ["", f"engine alone, same run (batch {c.get('engine_batch', '?')}, decode tok/s, median of "
                  f"{c.get('engine_rounds', 1)} rounds; the ratios are the median round's): "
                  + ", ".join(f"{m} {e[m]:.0f}" for m in MODES),
                  f"engine alone bd / slora: {r['engine alone bd / slora']:.2f}x, bd / replicated: "
                  f"{r['engine alone bd / replicated']:.2f}x; over HTTP bd / slora is "
                  f"{r['HTTP bd/slora / engine bd/slora']:.2f}x of the engine's"]
    w = result.get("wave_tokens_per_s")
    if w:
        lines += [f"over HTTP, closed waves of the same batch ({c['wave_tokens']} tokens each, median of "
                  f"{len(w['bd'])} rounds, tok/s): " + ", ".join(f"{m} {runner.percentile(w[m], 50):.0f}" for m in MODES),
                  f"HTTP waves bd / slora (median round): {r['HTTP waves bd / slora']:.2f}x, "
                  f"{r['HTTP waves bd/slora / engine bd/slora']:.2f}x of the engine's"]
    lines += ["", f"anchor: {result['anchor']}",
              f"bd / replicated throughput: {r['bd / replicated']:.2f}x",
              f"bd / slora throughput: {r['bd / slora']:.2f}x"]
    return lines
