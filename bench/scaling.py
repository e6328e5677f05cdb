"""(b) Throughput with 1, 10, 100, 1000 distinct adapters in the workload vs the base model alone.

One server holds `max(--counts)` BD-LoRA adapters of a small rank (pushed in
parallel over one S3 client). For each count n the same seeded open-loop
workload (same arrivals and lengths) runs with its requests spread over n
adapters by the power law (`--alpha`), and once with no adapter at all.
Before each run the adapters it uses are loaded into host memory
(POST /v1/adapters; S-LoRA keeps all adapters in host memory), so the run
measures what S-LoRA measures: moving adapters between host and the unified
pool, and batching requests for many adapters together. The pool is sized
(`--pages`) so that KV blocks and the resident adapters of a batch fit; the
rest are evicted least-recently-used.

As bench/decode.py, for a shared, noisy machine: --rounds rounds, each running
every workload once, back to back (the order reversed every other round), and
each ratio to the base model is the median over rounds of the ratio of the
two throughputs measured in the same round. The table shows each workload's
median round.

Anchor: S-LoRA serves 2,000 adapters at ~95% of its throughput with few
adapters (A100, Llama-7B).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import compare, runner
from deploy.seed import DemoAdapter

NAME = "scaling"
HELP = "(b) 1..1000 distinct adapters vs the base model alone"
ANCHOR = "S-LoRA: ~95% of few-adapter throughput with 2,000 adapters (A100, Llama-7B)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--counts", default="1,10,100,1000", help="distinct adapters per run, comma-separated")
    p.add_argument("--rank", type=int, default=4, help="BD-LoRA rank of every adapter")
    p.add_argument("--pages", type=int, default=2048, help="pages per layer of each rank's unified pool")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved passes over the workloads; ratios are medians of per-round ratios")
    compare.add_workload_arguments(p, requests=96, rate=24.0)


def run(args: argparse.Namespace) -> dict:
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    if not counts or counts[0] < 1:
        raise ValueError(f"--counts must be positive integers, got {args.counts!r}")
    adapters = [DemoAdapter(f"s-{k}", args.rank, True, "bd", seed=k) for k in range(max(counts))]
    server = compare.server_config(args, num_pages=args.pages)
    workloads = [0, *counts]
    rounds: dict[int, list[dict]] = {n: [] for n in workloads}  # workload -> its run in each round
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as d, \
            compare.local_server(Path(d), adapters, server, args.progress) as served:
        compare.warm_up(served, [], args.progress)  # model code paths warm; no adapter yet
        for round_ in range(args.rounds):
            for n in workloads if round_ % 2 == 0 else workloads[::-1]:
                reqs = compare.workload(args, n, prefix="s")  # the same requests every round
                used = sorted({r.adapter for r in reqs if r.adapter})
                if used:
                    compare.load_adapters(served.url, used, progress=args.progress)
                label = "base model" if n == 0 else f"{n} adapter{'s' * (n > 1)}"
                res = runner.run(reqs, compare.runner_config(args, served, f"{label} #{round_}"))
                rounds[n].append({"name": label, "adapters": n, "adapters_used": len(used), **res.to_dict()})
    runs = []
    for n in workloads:
        rates = [r["summary"]["tokens_per_s"] for r in rounds[n]]
        median_round = sorted(rounds[n], key=lambda r: r["summary"]["tokens_per_s"])[len(rates) // 2]
        base = [r["summary"]["tokens_per_s"] for r in rounds[0]]
        runs.append({**median_round, "rounds_tokens_per_s": rates, "vs_base": runner.median_ratio(rates, base)})
    return {
        "comparison": NAME, "anchor": ANCHOR,
        "config": {"tp": args.tp, "counts": counts, "rank": args.rank, "mode": "bd", "pages": args.pages,
                   "rounds": args.rounds,
                   "requests": args.requests, "rate": args.rate, "cv": args.cv, "alpha": args.alpha,
                   "input_len": args.input_len, "output_len": args.output_len,
                   "model": compare.model_info(args), "device": "cpu"},
        "runs": runs,
        "ratios": {f"{r['name']} / base model": r["vs_base"] for r in runs[1:]},
    }


def report(result: dict) -> list[str]:
    c = result["config"]
    lines = [f"TP={c['tp']}, BD-LoRA rank {c['rank']}, {c['requests']} requests at {c['rate']} req/s, "
             f"popularity alpha {c['alpha']}, pool {c['pages']} pages/layer; {c.get('rounds', 1)} interleaved "
             "rounds, each workload's median round shown, ratios the medians of per-round ratios", ""]
    lines += compare.run_table([{**r, "name": f"{r['name']} ({r['adapters_used']} used)" if r["adapters"] else r["name"]}
                                for r in result["runs"]], "workload")
    lines += ["", "throughput vs the base model alone: " + ", ".join(
        f"{r['adapters']}: {r['vs_base']:.2f}x" for r in result["runs"][1:]), f"anchor: {result['anchor']}"]
    last = result["runs"][-1]
    lines.append(f"{last['name']} / base model throughput: {last['vs_base']:.2f}x")
    return lines
