"""(d) First-token latency of a cold adapter vs the same adapter warm.

One server, `--adapters` BD-LoRA adapters in S3 that it has never loaded.
For each adapter in turn, with nothing else running, three short requests:
  cold   the first request for it: S3 -> adapter store (host cache) -> each
         TP rank's shard -> its unified pool, then prefill;
  warm   the same adapter again: resident in the pool;
  host   after DELETE /v1/adapters/<name> (evicted from the pool, still in
         the store's host cache): host -> pool, then prefill.
Then the base model for reference. TTFT percentiles per case and cold / warm.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx
from tqdm import tqdm

from bench import compare, runner
from bench.workload import PROMPT_TOKEN_RANGE, Request
from deploy.seed import DemoAdapter

NAME = "cold"
HELP = "(d) cold adapter first-token latency vs warm"
ANCHOR = "S-LoRA prefetches adapters from host memory to hide this; no published cold-from-S3 number"
CASES = ("cold", "host", "warm", "base model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--adapters", type=int, default=16, help="adapters, each requested cold then warm")
    p.add_argument("--rank", type=int, default=16, help="BD-LoRA rank")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per request at most")


def _request(i: int, adapter: str | None, args: argparse.Namespace) -> Request:
    lo, hi = PROMPT_TOKEN_RANGE
    prompt = tuple(lo + (7 * i + 13 * j) % (hi - lo) for j in range(args.prompt_len))
    return Request(i, 0.0, adapter, prompt, None, args.max_tokens)


def run(args: argparse.Namespace) -> dict:
    adapters = [DemoAdapter(f"c-{k}", args.rank, True, "bd", seed=k) for k in range(args.adapters)]
    server = compare.server_config(args)
    records: dict[str, list] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as d, \
            compare.local_server(Path(d), adapters, server, args.progress) as served:
        cfg = runner.RunnerConfig(served.url, served.base_model, time_limit_s=args.time_limit, progress=False)

        def one(case: str, i: int, adapter: str | None) -> None:
            res = runner.run([_request(i, adapter, args)], cfg)
            rec = res.records[0]
            if not rec.ok:
                raise RuntimeError(f"{case} request for {adapter}: {rec.error}")
            records[case].append(rec)

        one("base model", 0, None)  # the model's code paths warm before the first timed request
        for i, a in enumerate(tqdm(adapters, desc="cold/host/warm", disable=not args.progress)):
            one("cold", i, a.name)
            one("warm", i, a.name)
            unload(served.url, a.name)
            one("host", i, a.name)
            one("base model", i, None)
    rows = []
    for case in CASES:
        ttfts = [r.ttft for r in records[case][1 if case == "base model" else 0:]]
        rows.append({"name": case, "n": len(ttfts), "ttft_s": runner.distribution(ttfts), "ttfts": ttfts})
    by = {r["name"]: r["ttft_s"]["p50"] for r in rows}
    return {
        "comparison": NAME, "anchor": ANCHOR,
        "config": {"tp": args.tp, "adapters": args.adapters, "rank": args.rank, "mode": "bd",
                   "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "model": compare.model_info(args), "device": "cpu", "s3": "moto on 127.0.0.1"},
        "runs": rows,
        "ratios": {"cold / warm (p50 TTFT)": by["cold"] / by["warm"], "host / warm (p50 TTFT)": by["host"] / by["warm"]},
    }


def unload(url: str, name: str) -> None:
    r = httpx.delete(f"{url}/v1/adapters/{name}", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"unloading {name}: HTTP {r.status_code} {r.text[:200]}")


def report(result: dict) -> list[str]:
    c = result["config"]
    lines = [f"TP={c['tp']}, {c['adapters']} BD-LoRA adapters of rank {c['rank']}, one request at a time "
             f"({c['prompt_len']}-token prompt, {c['max_tokens']} tokens)", ""]
    lines += compare.markdown_table(
        ["case", "n", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "mean ms"],
        [[r["name"], r["n"], 1e3 * r["ttft_s"]["p50"], 1e3 * r["ttft_s"]["p90"], 1e3 * r["ttft_s"]["p99"],
          1e3 * r["ttft_s"]["mean"]] for r in result["runs"]], digits=1)
    r = result["ratios"]
    lines += ["", "cold: first request, adapter fetched from S3; host: evicted from the pool, in host memory; "
              "warm: resident in the pool",
              f"host / warm p50 TTFT: {r['host / warm (p50 TTFT)']:.2f}x",
              f"cold / warm p50 TTFT: {r['cold / warm (p50 TTFT)']:.2f}x"]
    return lines
